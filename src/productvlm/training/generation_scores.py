"""Eval by generation during training, flattened for the trainer's logs.

Teacher-forced argmax is not a prediction (it sees the true prefix), so the trainer generates as at
inference (`inference.generate.generate_answers`); the scoring is `prompting.metrics`.
"""

from __future__ import annotations

from typing import Any

from productvlm.prompting import metrics as M
from productvlm.prompting.parse import parse_answer


def _nan(x: float | None) -> float:
    return float("nan") if x is None else x


def score(rows: list[dict[str, Any]], answers: list[str]) -> dict[str, float]:
    """Flat figures for the training log: category accuracy, price MAPE/MAE (over answers with a
    price; `price_n` says how many), title token-F1, parse rate. No bootstrap: this runs during training."""
    if not rows:
        return {}
    m = M.score_answers(rows, [parse_answer(a) for a in answers])
    return {
        "n": m["n"],
        "parse_rate": m["parse_rate"],
        "category_accuracy": m["category"]["accuracy"],
        "price_mape": _nan(m["price"]["mape"]),
        "price_mae": _nan(m["price"]["mae"]),
        "price_n": m["price"]["n"],
        "title_token_f1": m["title"]["token_f1"],
    }


def baselines(train_rows: list[dict[str, Any]], rows: list[dict[str, Any]]) -> dict[str, float]:
    """Majority-category accuracy and train-mean-price MAPE on `rows` (plus the per-true-category median
    price MAPE): what a model must beat."""
    b = M.baselines(train_rows, rows)
    return {
        "majority_category_accuracy": b["majority_category"]["category"]["accuracy"],
        "mean_price_mape": _nan(b["mean_price"]["price"]["mape"]),
        "median_price_per_category_mape": _nan(b["median_price_per_true_category"]["price"]["mape"]),
    }
