"""RUN/checkpoints: complete checkpoints (renamed into place), rotation that keeps the best one, the
ranking of evaluations that picks it, loading its weights, and the log lines a resumed run drops.

The Trainer writes a checkpoint as `checkpoint-N` (its own name, our staging name); once every process
has written its part, `callbacks.AtomicCheckpoints` renames it to `step-N`, the only name we read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

STEP_DIR = re.compile(r"^step-(\d+)$")
STAGING_DIR = re.compile(r"^checkpoint-(\d+)$")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def publish(root: Path, step: int) -> Path:
    """Rename the Trainer's complete `checkpoint-<step>` to `step-<step>` (replacing an older one)."""
    target = step_dir(root, step)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(root / f"checkpoint-{step}", target)
    return target


def drop_staging(root: Path) -> None:
    """Remove `checkpoint-N` folders an interrupted save left behind."""
    if root.is_dir():
        for p in root.iterdir():
            if STAGING_DIR.match(p.name):
                shutil.rmtree(p, ignore_errors=True)


def rotate(root: Path, limit: int | None, keep: Path | None = None) -> None:
    """Delete all but the newest `limit` checkpoints, never `keep` (the best one)."""
    if not limit:
        return
    for old in [p for p in complete_checkpoints(root) if p != keep][:-limit]:
        shutil.rmtree(old, ignore_errors=True)


def _finite(x: Any, worst: float) -> float:
    return worst if x is None or x != x else float(x)  # NaN (no parsable price) ranks last


def selection_key(entry: dict[str, Any], metric: str) -> tuple[float, float, int]:
    """Sort key, best first: the metric (accuracy/F1 up, MAPE down), then price MAPE, then the earlier step."""
    value = entry[f"eval_{metric}"]
    main = _finite(value, float("inf")) if metric == "price_mape" else -_finite(value, float("-inf"))
    return main, _finite(entry.get("eval_price_mape"), float("inf")), entry["step"]


def ranked_evals(history: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """The eval log entries (one per step), best first. A pure function of the log, so a resumed run
    (whose log_history comes back from the checkpoint) ranks exactly as the uninterrupted one."""
    evals = {e["step"]: e for e in history if f"eval_{metric}" in e}
    return sorted(evals.values(), key=lambda e: selection_key(e, metric))


def best_checkpoint(
    root: Path, history: list[dict[str, Any]], metric: str
) -> tuple[Path, dict[str, Any]] | None:
    """(checkpoint folder, its eval log entry) of the best evaluated step that has a checkpoint."""
    for entry in ranked_evals(history, metric):
        path = step_dir(root, entry["step"])
        if path.is_dir():
            return path, entry
    return None


def load_weights(model, folder: Path) -> None:
    """The trained weights of checkpoint `folder` into `model`, in place: a peft model's adapter (and
    the trainables beside it), else the whole state dict (one safetensors file or shards). Each process
    must hold whole weights (one process, DDP, DeepSpeed ZeRO-1/2; not FSDP or ZeRO-3)."""
    from peft import PeftModel

    from productvlm.models.loading import load_extra_trainables

    if isinstance(model, PeftModel):
        from peft import load_peft_weights, set_peft_model_state_dict

        set_peft_model_state_dict(model, load_peft_weights(str(folder)), model.active_adapter)
        load_extra_trainables(model, folder)
        return
    from safetensors.torch import load_file
    from transformers.trainer_utils import load_sharded_checkpoint

    single = folder / "model.safetensors"
    if single.is_file():
        model.load_state_dict(load_file(single), strict=True)
    else:
        load_sharded_checkpoint(model, str(folder), strict=True)


def evals_since_best(history: list[dict[str, Any]], metric: str) -> int:
    ranked = ranked_evals(history, metric)
    if not ranked:
        return 0
    return sum(1 for e in ranked if e["step"] > ranked[0]["step"])


def complete_checkpoints(root: Path) -> list[Path]:
    """Renamed-into-place checkpoints, oldest first (staging leftovers are ignored)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def truncate_log(path: Path, step: int) -> None:
    """On resume, drop log lines written after the checkpoint we resume from."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
    path.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")
