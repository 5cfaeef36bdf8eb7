"""Scores for generated catalog entries, and the baselines a model must beat, nested by field.

- category: accuracy and macro-F1 (sklearn; classes = the true categories, so a made-up category only
  costs recall). A missing category is wrong.
- price: MAE, MAPE and median APE over the `n` answers that have a price; `within_10pct` /
  `within_25pct` over *all* rows (no price = a miss), so omitting prices cannot look accurate.
- title: exact match (case and spacing ignored), token F1, corpus chrF (sacrebleu). A missing title is "".
- `*_ci95`: seeded percentile-bootstrap 95% intervals over rows (scipy.stats.bootstrap).

Every figure is a plain number or None (undefined, e.g. MAPE with no price at all): JSON-ready.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sacrebleu.metrics import CHRF

from productvlm.prompting.parse import Answer, parse_answer

CATEGORY, PRICE, TITLE = "category3_code", "full_price", "title"
N_BOOTSTRAP = 1000


def truth(row: dict[str, Any]) -> Answer:
    return Answer(title=str(row[TITLE]), category=str(row[CATEGORY]).upper(), price=float(row[PRICE]))


def _tokens(text: str | None) -> list[str]:
    return re.findall(r"\w+", (text or "").lower())


def token_f1(pred: str | None, truth: str) -> float:
    """SQuAD-style bag-of-words F1 between two titles."""
    p, t = _tokens(pred), _tokens(truth)
    if not p or not t:
        return float(p == t)
    common = sum((Counter(p) & Counter(t)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(t)
    return 2 * precision * recall / (precision + recall)


def _norm(text: str | None) -> str:
    return " ".join((text or "").lower().split())


def ci95(values: Sequence[float], statistic: Callable = np.mean, seed: int = 0) -> list[float]:
    """Percentile-bootstrap 95% interval of `statistic` over `values` (a single value: a point)."""
    from scipy.stats import bootstrap  # here: scipy.stats and sklearn cost ~2 s at every `predict` start

    data = np.asarray(values, dtype=float)
    if len(data) < 2 or np.all(data == data[0]):
        point = float(statistic(data)) if len(data) else math.nan
        return [point, point]
    res = bootstrap(
        (data,),
        statistic,
        n_resamples=N_BOOTSTRAP,
        confidence_level=0.95,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return [float(res.confidence_interval.low), float(res.confidence_interval.high)]


def _number(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def category_metrics(
    preds: Sequence[str | None], truths: Sequence[str], ci: bool = False, seed: int = 0
) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, f1_score

    y_pred = [p if p is not None else "<none>" for p in preds]
    labels = sorted(set(truths))
    out: dict[str, Any] = {
        "accuracy": float(accuracy_score(truths, y_pred)),
        "macro_f1": float(f1_score(truths, y_pred, labels=labels, average="macro", zero_division=0)),
    }
    if ci:
        out["accuracy_ci95"] = ci95([p == t for p, t in zip(y_pred, truths)], seed=seed)
        out["macro_f1_ci95"] = macro_f1_ci95(y_pred, truths, seed)
    return out


def macro_f1_ci95(preds: Sequence[str], truths: Sequence[str], seed: int = 0) -> list[float]:
    """Bootstrap interval of the macro-F1 over rows (each resample averages over the categories it holds).
    The long tail makes it the figure to read there: a model that only says the head category scores its
    accuracy but a macro-F1 near 0."""
    names = {name: i for i, name in enumerate(sorted(set(truths) | set(preds)))}
    t = np.array([names[x] for x in truths])
    p = np.array([names[x] for x in preds])

    def macro_f1(rows: np.ndarray) -> float:
        rows = rows.astype(int)
        tr, pr = t[rows], p[rows]
        hits = np.bincount(tr[tr == pr], minlength=len(names))
        support, predicted = np.bincount(tr, minlength=len(names)), np.bincount(pr, minlength=len(names))
        present = support > 0
        return float(np.mean(2 * hits[present] / (support[present] + predicted[present])))

    return ci95(np.arange(len(t)), macro_f1, seed)


def price_metrics(
    preds: Sequence[float | None], truths: Sequence[float], ci: bool = False, seed: int = 0
) -> dict[str, Any]:
    pairs = [(p, t) for p, t in zip(preds, truths) if p is not None and math.isfinite(p)]
    abs_err = [abs(p - t) for p, t in pairs]
    ape = [abs(p - t) / t for p, t in pairs if t > 0]
    hits = {
        k: [p is not None and t > 0 and abs(p - t) / t <= k for p, t in zip(preds, truths)]
        for k in (0.1, 0.25)
    }
    out: dict[str, Any] = {
        "n": len(pairs),
        "mae": _number(statistics.fmean(abs_err)) if abs_err else None,
        "mape": _number(statistics.fmean(ape)) if ape else None,
        "median_ape": _number(statistics.median(ape)) if ape else None,
        "within_10pct": statistics.fmean(hits[0.1]) if truths else None,
        "within_25pct": statistics.fmean(hits[0.25]) if truths else None,
    }
    if ci and ape:
        out["mae_ci95"] = ci95(abs_err, seed=seed)
        out["mape_ci95"] = ci95(ape, seed=seed)
        out["median_ape_ci95"] = ci95(ape, np.median, seed=seed)
        out["within_10pct_ci95"] = ci95(hits[0.1], seed=seed)
    return out


def title_metrics(
    preds: Sequence[str | None], truths: Sequence[str], ci: bool = False, seed: int = 0
) -> dict:
    exact = [_norm(p) == _norm(t) for p, t in zip(preds, truths)]
    f1 = [token_f1(p, t) for p, t in zip(preds, truths)]
    chrf = CHRF().corpus_score([p or "" for p in preds], [list(truths)]).score
    out: dict[str, Any] = {
        "exact_match": statistics.fmean(exact),
        "token_f1": statistics.fmean(f1),
        "chrf": float(chrf),
    }
    if ci:
        out["exact_match_ci95"] = ci95(exact, seed=seed)
        out["token_f1_ci95"] = ci95(f1, seed=seed)
    return out


def score_answers(
    rows: Sequence[dict[str, Any]], parsed: Sequence[Answer], ci: bool = False, seed: int = 0
) -> dict[str, Any]:
    """The model's figures: n, parse_rate and one block per field (see the module docstring)."""
    if not rows:
        return {"n": 0}
    truths = [truth(r) for r in rows]
    complete = [p.complete for p in parsed]
    out: dict[str, Any] = {"n": len(rows), "parse_rate": statistics.fmean(complete)}
    if ci:
        out["parse_rate_ci95"] = ci95(complete, seed=seed)
    out["category"] = category_metrics([p.category for p in parsed], [t.category for t in truths], ci, seed)
    out["price"] = price_metrics([p.price for p in parsed], [t.price for t in truths], ci, seed)
    out["title"] = title_metrics([p.title for p in parsed], [t.title for t in truths], ci, seed)
    return out


def baselines(train_rows: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What knowing only the train split gets on `rows`.

    majority_category: always the most frequent train category (ties: alphabetical first).
    mean_price: always the train mean price.
    median_price_per_true_category: the train median price of the row's *true* category (the overall
    median for a category unseen in train): an upper bound for any price guess that uses the category only.
    """
    if not train_rows:
        raise ValueError("baselines need train rows")
    train = [truth(r) for r in train_rows]
    test = [truth(r) for r in rows]
    counts = Counter(t.category for t in train)
    majority = min(counts, key=lambda c: (-counts[c], c))
    mean_price = statistics.fmean(t.price for t in train)
    overall = statistics.median(t.price for t in train)
    by_cat = {c: statistics.median(t.price for t in train if t.category == c) for c in counts}
    truths_cat, truths_price = [t.category for t in test], [t.price for t in test]
    return {
        "majority_category": {
            "value": majority,
            "category": category_metrics([majority] * len(test), truths_cat),
        },
        "mean_price": {"value": mean_price, "price": price_metrics([mean_price] * len(test), truths_price)},
        "median_price_per_true_category": {
            "price": price_metrics([by_cat.get(t.category, overall) for t in test], truths_price)
        },
    }


def evaluate(
    rows: Sequence[dict[str, Any]],
    answers: Sequence[str],
    train_rows: Sequence[dict[str, Any]] | None = None,
    ci: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Parse `answers` (one per row, in order), score them, and add the train-split baselines."""
    if len(rows) != len(answers):
        raise ValueError(f"{len(rows)} rows but {len(answers)} answers")
    metrics = score_answers(rows, [parse_answer(a) for a in answers], ci=ci, seed=seed)
    if train_rows and rows:
        metrics["baselines"] = baselines(train_rows, rows)
    return metrics


__all__ = [
    "evaluate",
    "score_answers",
    "baselines",
    "category_metrics",
    "price_metrics",
    "title_metrics",
    "token_f1",
    "ci95",
    "truth",
]
