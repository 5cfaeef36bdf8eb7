"""Evaluation by generation: greedy answers on left-padded batches, parsed and scored against the rows.

Teacher-forced argmax is not a prediction (it sees the true prefix), so we generate as at inference.
The scoring itself lives in `productvlm.evaluation.metrics`; here it is flattened for the trainer's logs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import LogitsProcessorList

from productvlm.evaluation import metrics as M
from productvlm.evaluation.parse import parse_answer
from productvlm.training.data import Encoder, load_image

token_f1 = M.token_f1


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
    constraint=None,
) -> list[str]:
    """Greedy answers for `rows`, in order. `constraint` (an evaluation.constrained.AnswerConstraint)
    restricts decoding to the answer template."""
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
        extra = (
            {"logits_processor": LogitsProcessorList([constraint.logits_processor()])} if constraint else {}
        )
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **extra)
        new = out[:, inputs["input_ids"].shape[1] :]
        answers += processor.batch_decode(new, skip_special_tokens=True)
        if advance:
            advance(len(chunk))
    model.train(was_training)
    return answers


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
