"""`run_eval`: generate on a split, score against the truth and the train-split baselines, write
OUT/metrics.json, OUT/predictions.jsonl and OUT/report.html (formats: README, "Evaluate and predict")."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from productvlm.data.folder import read_split
from productvlm.errors import UserError
from productvlm.evaluation import report
from productvlm.inference.predictor import Predictor
from productvlm.models.eval_records import eval_dir
from productvlm.prompting.confidence import (
    FIELDS,
    confidence_report,
    expected_calibration_error,
    field_correct,
    field_scores,
)
from productvlm.prompting.metrics import evaluate, token_f1, truth
from productvlm.prompting.parse import parse_answer

METRICS, PREDICTIONS, REPORT = "metrics.json", "predictions.jsonl", "report.html"
CALIBRATION_COPY = "calibration.json"


@dataclass
class EvalResult:
    out_dir: Path
    metrics: dict[str, Any]
    predictions: list[dict[str, Any]]
    seconds: float

    @property
    def files(self) -> list[Path]:
        return [self.out_dir / f for f in (METRICS, PREDICTIONS, REPORT)]


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def default_out_dir(model_dir: Path | str, split: str) -> Path:
    """RUN/eval-<split> for a model inside a run folder, else ./eval-<split>."""
    return eval_dir(model_dir, split)


def prediction_record(row: dict[str, Any], raw: str) -> dict[str, Any]:
    """One line of predictions.jsonl: the truth, the raw answer, the parsed fields and per-row scores."""
    t, a = truth(row), parse_answer(raw)
    price = a.price if a.price is not None and math.isfinite(a.price) else None  # "9"*400 parses to inf
    ape = abs(price - t.price) / t.price if price is not None and t.price > 0 else None
    return {
        "file_name": row.get("file_name"),
        "product_code": row.get("product_code"),
        "image_path": row.get("image_path"),
        "truth": {"title": t.title, "category": t.category, "price": t.price},
        "raw": raw,
        "pred": {"title": a.title, "category": a.category, "price": price},
        "parsed": a.complete,
        "category_correct": a.category == t.category,
        "price_ape": ape,
        "title_token_f1": token_f1(a.title, t.title),
    }


def calibrate(predictor: Predictor, data: Path, batch_size: int, progress: bool, evaluated=None) -> None:
    """Fit the confidence calibration on the validation split unless the model already has one made the
    same way (or `evaluated` = (rows, answers) of the validation split itself); saved beside the weights."""
    constrained = predictor.constraint is not None
    if evaluated is None and predictor.calibration and predictor.calibration.constrained == constrained:
        return
    rows, answers = evaluated or (read_split(data, "validation"), None)
    if not rows:
        raise UserError(f"{data}: the validation split has no rows; confidence calibration needs it")
    predictor.calibrate(rows, batch_size, progress, answers, data=str(data))
    if isinstance(predictor.model_dir, Path):
        predictor.calibration.save(predictor.model_dir)


def confidence_metrics(records: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    """Per field: ECE before and after calibration, accuracy at 50 / 80 / 100% coverage (95% CIs)."""
    out = {}
    for f in FIELDS:
        conf = [r["confidence"][f] for r in records]
        correct = [r["field_correct"][f] for r in records]
        raw = [r["confidence_raw"][f] for r in records]
        out[f] = {
            **confidence_report(conf, correct, seed),
            "ece_raw": expected_calibration_error(raw, correct),
        }
    return out


def load_rows(data: Path, split: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows = read_split(data, split)
    if not rows:
        raise UserError(f"{data}: split {split!r} has no rows; choose another with --split")
    train_rows = read_split(data, "train") if split != "train" else rows
    if not train_rows:
        raise UserError(f"{data}: the train split has no rows; the baselines and --constrained need it")
    return rows, train_rows


def run_eval(
    model: str | Path,
    data: str | Path,
    split: str = "test",
    out: str | Path | None = None,
    num_crops: int | None = None,
    batch_size: int = 16,
    constrained: bool = False,
    max_new_tokens: int = 64,
    limit: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    seed: int = 0,
    progress: bool = True,
    compiled: bool | None = None,
) -> EvalResult:
    t0 = time.perf_counter()
    data = Path(data)
    rows, train_rows = load_rows(data, split)
    rows = rows[:limit] if limit else rows
    predictor = Predictor(model, num_crops, device, dtype, max_new_tokens, compiled)
    if constrained:
        predictor.constrain(train_rows)
    if split != "validation":
        calibrate(predictor, data, batch_size, progress)
    generated = predictor.answers(rows, batch_size, progress, what=f"eval {split}", with_logprobs=True)
    if split == "validation":
        calibrate(predictor, data, batch_size, progress, (rows, generated))
    answers = [g.text for g in generated]
    metrics = evaluate(rows, answers, train_rows, ci=True, seed=seed)
    metrics = {
        "split": split,
        **metrics,
        "model": str(predictor.model_dir),
        "data": str(data),
        "num_crops": predictor.num_crops,
        "constrained": constrained,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
    }
    records = [prediction_record(r, a) for r, a in zip(rows, answers)]
    for record, row, g in zip(records, rows, generated):
        raw = field_scores(g.text, g.logprobs, g.ends)
        record["confidence_raw"], record["confidence"] = raw, predictor.calibration(raw)
        record["field_correct"] = field_correct(g.text, row)
    calibration = predictor.calibration
    metrics["confidence"] = {
        **confidence_metrics(records, seed),
        "calibrated_on": {"split": calibration.split, "rows": calibration.rows, "data": calibration.data},
    }
    out_dir = Path(out) if out is not None else default_out_dir(predictor.model_dir, split)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / METRICS, json.dumps(metrics, indent=2) + "\n")
    write_atomic(out_dir / PREDICTIONS, "".join(json.dumps(r) + "\n" for r in records))
    html = report.render(metrics, records, report.find_train_log(predictor.model_dir))
    write_atomic(out_dir / REPORT, html)
    return EvalResult(out_dir, metrics, records, time.perf_counter() - t0)


__all__ = [
    "run_eval",
    "EvalResult",
    "prediction_record",
    "default_out_dir",
    "METRICS",
    "PREDICTIONS",
    "REPORT",
]
