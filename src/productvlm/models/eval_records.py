"""Where `productvlm eval` puts a model's results, and what the model's last held-out evaluation said.

`eval_dir(model, split)` is the one rule (evaluation's default output folder): RUN/eval-<split> for a
model inside a run folder, else ./eval-<split>. `last_evaluation(model)` reads the newest metrics.json
of a held-out split that was written for this model; the serving page and the model card show it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from productvlm.run_folder import CONFIG, find_run

HELD_OUT = ("test", "validation")
METRICS = "metrics.json"
CARRIED = "evaluation.json"  # an export's copy of its source's last evaluation

# (field, key in metrics.json, Hub metric type, name shown)
CARD_METRICS = [
    (None, "parse_rate", "parse_rate", "answers parsed"),
    ("category", "accuracy", "accuracy", "category accuracy"),
    ("category", "macro_f1", "f1", "category macro F1"),
    ("price", "mape", "mape", "price MAPE"),
    ("price", "within_10pct", "accuracy", "price within 10%"),
    ("title", "exact_match", "exact_match", "title exact match"),
    ("title", "token_f1", "f1", "title token F1"),
    ("title", "chrf", "chrf", "title chrF"),
]


def eval_dir(model_dir: Path | str, split: str) -> Path:
    """RUN/eval-<split> for a model inside a run folder, else ./eval-<split>."""
    run = find_run(model_dir)
    return run / f"eval-{split}" if run is not None else Path(f"eval-{split}")


def last_evaluation(model_dir: Path | str) -> dict[str, Any] | None:
    """The newest held-out metrics.json (test or validation) written for `model_dir`, or None.

    A ./eval-<split> folder outside a run counts only when its metrics name this very model; an
    export's `evaluation.json` (its source's last evaluation) counts too."""
    found = []
    carried = Path(model_dir) / CARRIED
    if (metrics := _read(carried)) is not None and metrics.get("split") in HELD_OUT:
        found.append((carried.stat().st_mtime, metrics))
    for split in HELD_OUT:
        path = eval_dir(model_dir, split) / METRICS
        metrics = _read(path)
        if metrics is None or metrics.get("split", split) != split:
            continue
        if find_run(model_dir) is None and not _same_model(metrics.get("model"), model_dir):
            continue
        found.append((path.stat().st_mtime, metrics))
    return max(found, key=lambda f: f[0])[1] if found else None


def held_out_metrics(evaluation: dict[str, Any] | None) -> list[dict[str, Any]]:
    """[{type, name, value}] of the figures a card and the serving page show (those present)."""
    found = []
    for field, key, kind, name in CARD_METRICS:
        value = (
            (evaluation or {}).get(key) if field is None else ((evaluation or {}).get(field) or {}).get(key)
        )
        if isinstance(value, (int, float)):
            found.append({"type": kind, "name": name, "value": round(float(value), 4)})
    return found


def model_dataset(model_dir: Path | str, evaluation: dict[str, Any] | None = None) -> str | None:
    """The dataset folder the model was evaluated on, else the one its run trained on."""
    if evaluation and evaluation.get("data"):
        return str(evaluation["data"])
    run = find_run(model_dir)
    config = _read_yaml(run / CONFIG) if run is not None else {}
    return (config.get("data") or {}).get("dir")


def model_summary(model_dir: Path | str) -> dict[str, Any]:
    """What the serving page shows about a model: its last held-out evaluation and its prices' currency."""
    evaluation = last_evaluation(model_dir)
    summary = None
    if evaluation is not None:
        summary = {
            "split": evaluation.get("split"),
            "n": evaluation.get("n"),
            "metrics": held_out_metrics(evaluation),
        }
    return {"evaluation": summary, "currency": dataset_currency(model_dataset(model_dir, evaluation))}


def dataset_currency(dataset_dir: Path | str | None) -> str | None:
    """The prices' currency: dataset.json's `currency`, else the `currency_code` every train row shares."""
    if not dataset_dir:
        return None
    folder = Path(dataset_dir)
    info = _read(folder / "dataset.json") or {}
    if info.get("currency"):
        return str(info["currency"])
    codes = set()
    try:
        with open(folder / "train" / "metadata.jsonl", encoding="utf-8") as rows:
            for _, line in zip(range(1000), rows):
                codes.add(json.loads(line).get("currency_code"))
    except (OSError, ValueError):
        return None
    return str(codes.pop()) if len(codes) == 1 and None not in codes else None


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _same_model(recorded: str | None, model_dir: Path | str) -> bool:
    if not recorded:
        return False
    return Path(recorded).resolve() == Path(model_dir).resolve()


__all__ = [
    "eval_dir",
    "last_evaluation",
    "held_out_metrics",
    "model_dataset",
    "model_summary",
    "dataset_currency",
    "HELD_OUT",
    "CARRIED",
]
