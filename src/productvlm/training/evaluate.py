"""Evaluation by generation: greedy answers on left-padded batches, parsed and scored against the rows.

Teacher-forced argmax is not a prediction (it sees the true prefix), so we generate as at inference.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import torch

from productvlm.evaluation.parse import Answer, parse_answer
from productvlm.training.data import Encoder, load_image


@torch.no_grad()
def generate_answers(
    model,
    processor,
    encoder: Encoder,
    rows: list[dict[str, Any]],
    max_new_tokens: int,
    batch_size: int = 8,
    blank_images: bool = False,
    advance: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy answers for `rows`, in order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    answers: list[str] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = processor.pad([encoder.prompt_ids(r) for r in chunk], "left")
        images = processor.image_processor(
            [load_image(r["image_path"], blank_images) for r in chunk], num_crops=encoder.num_crops
        )
        inputs = {**batch, "pixel_values": images["pixel_values"], "image_sizes": images["image_sizes"]}
        inputs = {k: v.to(device) for k, v in inputs.items()}
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1] :]
        answers += processor.batch_decode(new, skip_special_tokens=True)
        if advance:
            advance(len(chunk))
    model.train(was_training)
    return answers


def _tokens(text: str | None) -> list[str]:
    return re.findall(r"\w+", (text or "").lower())


def token_f1(pred: str | None, truth: str) -> float:
    p, t = _tokens(pred), _tokens(truth)
    if not p or not t:
        return float(p == t)
    common = sum(min(p.count(w), t.count(w)) for w in set(p))
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(t)
    return 2 * precision * recall / (precision + recall)


def score(rows: list[dict[str, Any]], answers: list[str]) -> dict[str, float]:
    """Category accuracy, price MAPE/MAE (over answers with a price), title token-F1, parse rate.

    A missing category counts as wrong, a missing title scores F1 0; `price_n` says how many
    answers had a price, so a model that omits prices cannot look accurate unnoticed.
    """
    parsed: list[Answer] = [parse_answer(a) for a in answers]
    n = len(rows)
    if n == 0:
        return {}
    correct = sum(p.category == str(r["category3_code"]).upper() for p, r in zip(parsed, rows))
    errors = [
        (abs(p.price - float(r["full_price"])), float(r["full_price"]))
        for p, r in zip(parsed, rows)
        if p.price is not None and math.isfinite(p.price)
    ]
    ape = [e / t for e, t in errors if t > 0]
    return {
        "n": n,
        "parse_rate": sum(p.complete for p in parsed) / n,
        "category_accuracy": correct / n,
        "price_mape": sum(ape) / len(ape) if ape else float("nan"),
        "price_mae": sum(e for e, _ in errors) / len(errors) if errors else float("nan"),
        "price_n": len(errors),
        "title_token_f1": sum(token_f1(p.title, str(r["title"])) for p, r in zip(parsed, rows)) / n,
    }


def baselines(train_rows: list[dict[str, Any]], rows: list[dict[str, Any]]) -> dict[str, float]:
    """Majority-category accuracy and train-mean-price MAPE on `rows`: what a model must beat."""
    cats = [r["category3_code"] for r in train_rows]
    majority = max(set(cats), key=cats.count)
    mean_price = sum(float(r["full_price"]) for r in train_rows) / len(train_rows)
    return {
        "majority_category_accuracy": sum(r["category3_code"] == majority for r in rows) / len(rows),
        "mean_price_mape": sum(
            abs(mean_price - float(r["full_price"])) / float(r["full_price"]) for r in rows
        )
        / len(rows),
    }
