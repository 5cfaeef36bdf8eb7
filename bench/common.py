"""Shared pieces of the tiny-model benchmarks: a cached sample catalog, the tiny-cpu config, a training meter.

The catalog and the tiny model are made once per (rows, seed, source of the code that makes them)
under the temp folder and reused by every benchmark and test (both are deterministic; synthesis
takes ~15 s for 200 rows on 2 busy cores).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny-cpu.yaml"
CACHE = Path(tempfile.gettempdir()) / "productvlm-bench"


def _source_hash(module: str) -> str:
    """Short hash of a module's source: the cache key changes when the code that made an entry does."""
    spec = importlib.util.find_spec(module)
    return hashlib.sha1(Path(spec.origin).read_bytes()).hexdigest()[:8]


def catalog(rows: int = 200, seed: int = 0) -> Path:
    """A synthetic dataset folder, made once per (rows, seed) and renamed into place when complete."""
    from productvlm.data.synth import synthesize

    target = CACHE / f"catalog-{rows}-{seed}-{_source_hash('productvlm.data.synth')}"
    if not target.is_dir():
        tmp = _staging(target)
        synthesize(tmp, rows=rows, seed=seed, overwrite=True, progress=False)
        _publish(tmp, target)
    return target


def tiny_model(seed: int = 0) -> Path:
    """The random tiny preset (the model configs/tiny-cpu.yaml starts from), made once per seed."""
    from productvlm.models.phi3v.presets import init_model

    target = CACHE / f"tiny-{seed}-{_source_hash('productvlm.models.phi3v.presets')}"
    if not target.is_dir():
        tmp = _staging(target)
        init_model("tiny", tmp, seed=seed)
        _publish(tmp, target)
    return target


def _staging(target: Path) -> Path:
    return target.with_name(f".{target.name}-{os.getpid()}")


def _publish(tmp: Path, target: Path) -> None:
    """Rename a finished folder into place; if another process got there first, keep theirs."""
    try:
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def tiny_config(data_dir: Path, output_dir: Path, *overrides: str):
    """configs/tiny-cpu.yaml with no eval, no tracking, no checkpoints and no merged copy: only training."""
    from productvlm.config import load_config

    return load_config(
        TINY_CONFIG,
        [
            f"data.dir={data_dir}",
            f"output_dir={output_dir}",
            "eval.subset=0",
            "tracking.backend=none",
            "train.save_steps=1000000",
            "train.merge_final=false",
            "train.vision_pretrain.epochs=0",  # the benches time the VLM step
            *overrides,
        ],
    )


def result(
    name: str,
    value,
    unit: str,
    baseline: str | None,
    baseline_value,
    aim: str,
    notes: str,
    *,
    higher_is_better: bool = True,
) -> dict[str, Any]:
    """One table row; the ratio is "how many times better than the baseline"."""
    ratio = None
    if (
        isinstance(value, (int, float))
        and isinstance(baseline_value, (int, float))
        and value
        and baseline_value
    ):
        ratio = value / baseline_value if higher_is_better else baseline_value / value
    return {
        "name": name,
        "value": value,
        "unit": unit,
        "baseline": baseline,
        "baseline_value": baseline_value,
        "ratio": ratio,
        "aim": aim,
        "notes": notes,
    }


@dataclass
class Step:
    """One optimizer step: how long it waited for its batch, when it ran, and what it was fed."""

    wait: float
    begin: float
    end: float = 0.0
    samples: int = 0
    answer_tokens: int = 0
    slots: int = 0


class Meter(TrainerCallback):
    """Times each step of transformers' training loop and counts what the model is fed (forward pre-hook).

    In that loop the time from the end of one step to the start of the next is spent fetching the
    next batch (`Step.wait`). The `warm` figures leave out the first step, whose fetch starts the
    DataLoader workers and whose step allocates: one-off costs that a long run does not see.
    """

    def __init__(self) -> None:
        self.steps: list[Step] = []
        self._last = 0.0
        self._hook = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)
        self._last = time.perf_counter()

    def _count(self, module, args, kwargs) -> None:
        if module.training and self.steps:
            step = self.steps[-1]
            step.samples += len(kwargs["image_sizes"])  # one photo per sample, packed or not
            step.answer_tokens += int((kwargs["labels"] != -100).sum())
            step.slots += kwargs["input_ids"].numel()

    def on_step_begin(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.steps.append(Step(wait=now - self._last, begin=now))

    def on_step_end(self, args, state, control, **kwargs):
        self._last = self.steps[-1].end = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()

    @property
    def warm(self) -> list[Step]:
        return self.steps[1:]

    @property
    def warm_seconds(self) -> float:
        return self.steps[-1].end - self.steps[0].end

    def rate(self, what: str = "samples") -> float:
        """`samples`, `answer_tokens` or `slots` per second after the first step."""
        return sum(getattr(s, what) for s in self.warm) / self.warm_seconds

    @property
    def wait_share(self) -> float:
        """Share of the time after the first step spent waiting for a batch."""
        return sum(s.wait for s in self.warm) / self.warm_seconds


def train_metered(cfg) -> Meter:
    """The real `productvlm.training.run.train(cfg)`, measured by a `Meter`."""
    from productvlm.training.run import train

    meter = Meter()
    train(cfg, callbacks=[meter], progress=False)
    return meter
