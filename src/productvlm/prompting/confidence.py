"""Per-field confidence of a generated answer, its calibration, and the figures that say whether it means
anything (expected calibration error, accuracy at a coverage). Pure math: no torch.

- `field_scores`: from the log-probability of each generated token and where the token ends in the
  answer text. Category: the probability of the title's words that name it (those that share a stem
  with a word of the category: Tote / TOTE, Scarf / SCARVES, Cap / CAPS) and of its own tokens. The
  title comes first, so the category is decided at the word that names the product ("Tote" or
  "Shoulder"); its own tokens are then near-certain copies, and the title's other words (colour,
  material) are doubts about other fields. On the demo model, the accuracy of the most confident 80%
  of rows: 92.2% by the category's tokens alone, 94.8% by the whole answer up to the category (vs
  91.7% overall), 97.4% by the naming words. When no title word names the category, the answer up
  to the category's end. Title and price: the geometric mean of their tokens' probabilities. A field
  the answer lacks scores 0.
- `Calibrator`: raw score -> probability that the field is right (`field_correct`), fitted on the
  validation split: Platt scaling (a logistic regression on the score's log-odds: temperature
  scaling with a bias), isotonic regression (a monotone step function: it fits the category's
  score, whose accuracy levels off near 97% however close to 1 the score gets, where Platt's sigmoid
  cannot), or "auto" (the default): whichever of the two has the lower 5-fold cross-validated Brier
  score on the validation rows, per field.
- `Calibration`: a calibrator per field plus the validation risk-coverage curve (so that
  `--target-accuracy` can pick a threshold), saved as `calibration.json` beside the weights.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from productvlm.errors import UserError
from productvlm.prompting.metrics import token_f1, truth
from productvlm.prompting.parse import field_spans, parse_answer

FIELDS = ("title", "category", "price")
CALIBRATION_FILE = "calibration.json"
COVERAGES = (0.5, 0.8, 1.0)
TITLE_F1_OK, PRICE_APE_OK = 0.8, 0.10  # what counts as a right title / price (see field_correct)
EPS = 1e-6
_WORD = re.compile(r"[^\W\d_]+")  # a run of letters


def names_category(word: str, category: str) -> bool:
    """Whether a title word names the category: one is a prefix of the other (Cap / CAPS) or they share
    their first four letters (Scarf / SCARVES), ignoring case; words under three letters on either
    side never do (the T of T-SHIRTS names no Tee)."""
    w = word.lower()
    words = [c.lower() for c in _WORD.findall(category) if len(c) >= 3]
    return len(w) >= 3 and any(c.startswith(w) or w.startswith(c) or w[:4] == c[:4] for c in words)


def field_scores(text: str, logprobs: Sequence[float], ends: Sequence[int]) -> dict[str, float]:
    """Raw confidence per field in [0, 1] from the answer's tokens: `logprobs[k]` of token k, which ends
    at character `ends[k]` of `text`. A token belongs to a span when it overlaps it."""
    spans = field_spans(text)
    starts = [0, *ends[:-1]]

    def tokens_in(*ranges: tuple[int, int]) -> list[float]:
        return [lp for lp, s, e in zip(logprobs, starts, ends) if any(s < b and e > a for a, b in ranges)]

    out = {}
    for name in FIELDS:
        a, b = spans.get(name, (0, 0))
        lps = tokens_in((a, b)) if b > a else []
        if not lps:
            out[name] = 0.0
        elif name == "category":
            ta, tb = spans.get("title", (0, 0))
            naming = [
                (ta + m.start(), ta + m.end())
                for m in _WORD.finditer(text[ta:tb])
                if names_category(m.group(), text[a:b])
            ]
            if naming:
                out[name] = math.exp(sum(tokens_in((a, b), *naming)))
            else:  # the title does not name it: everything up to its end
                out[name] = math.exp(sum(lp for lp, s in zip(logprobs, starts) if s < b))
        else:
            out[name] = math.exp(sum(lps) / len(lps))
    return out


def field_correct(raw: str, row: dict[str, Any]) -> dict[str, bool]:
    """Whether each field of the answer is right: the category exactly, the title with a token F1 of at
    least 0.8 (one word off in five), the price within 10% of the truth."""
    t, a = truth(row), parse_answer(raw)
    price_ok = a.price is not None and math.isfinite(a.price) and t.price > 0
    return {
        "title": a.title is not None and token_f1(a.title, t.title) >= TITLE_F1_OK,
        "category": a.category == t.category,
        "price": price_ok and abs(a.price - t.price) / t.price <= PRICE_APE_OK,
    }


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=float), EPS, 1 - EPS)
    return np.log(p / (1 - p))


@dataclass
class Calibrator:
    """Raw score -> calibrated probability. "platt": sigmoid(a * logit(s) + b); "isotonic": a monotone
    step function (knots `xs` -> `ys`, interpolated); "identity": the score itself. `fit` with "auto"
    returns the platt or isotonic one."""

    method: str = "identity"
    a: float = 1.0
    b: float = 0.0
    xs: list[float] = field(default_factory=list)
    ys: list[float] = field(default_factory=list)

    def __call__(self, scores: Sequence[float] | np.ndarray) -> np.ndarray:
        s = np.asarray(scores, dtype=float)
        if self.method == "platt":
            return 1 / (1 + np.exp(-(self.a * _logit(s) + self.b)))
        if self.method == "isotonic":
            return np.interp(s, self.xs, self.ys)
        return np.clip(s, 0.0, 1.0)

    @classmethod
    def fit(cls, scores: Sequence[float], correct: Sequence[bool], method: str = "auto") -> Calibrator:
        s, y = np.asarray(scores, dtype=float), np.asarray(correct, dtype=bool)
        if len(s) == 0:
            return cls()
        if y.all() or not y.any():  # one class: the base rate is all there is to learn
            return cls("platt", 0.0, float(_logit(np.array([y.mean()]))[0]))
        if method == "auto":
            method = min(("platt", "isotonic"), key=lambda m: cross_validated_brier(s, y, m))
        if method == "isotonic":
            from sklearn.isotonic import IsotonicRegression

            iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(s, y)
            return cls("isotonic", xs=iso.X_thresholds_.tolist(), ys=iso.y_thresholds_.tolist())
        if method != "platt":
            raise UserError(f"unknown calibration method {method!r}: use auto, platt or isotonic")
        from sklearn.linear_model import LogisticRegression

        lr = LogisticRegression(C=1e4).fit(_logit(s)[:, None], y)
        return cls("platt", float(lr.coef_[0, 0]), float(lr.intercept_[0]))


def cross_validated_brier(scores: np.ndarray, correct: np.ndarray, method: str, folds: int = 5) -> float:
    """Mean squared error of `method`'s calibrated probability on each row, fitted without the row's fold
    (row i in fold i mod `folds`: the rows' order is the split's, which the product_code hash drew)."""
    fold = np.arange(len(scores)) % folds
    error = 0.0
    for k in range(min(folds, len(scores))):
        out = fold == k
        fitted = Calibrator.fit(scores[~out], correct[~out], method)
        error += float(((fitted(scores[out]) - correct[out]) ** 2).sum())
    return error / len(scores)


def expected_calibration_error(conf: Sequence[float], correct: Sequence[bool], bins: int = 10) -> float:
    """Sum over equal-width confidence bins of |accuracy - mean confidence|, weighted by the bin's share."""
    c, y = np.asarray(conf, dtype=float), np.asarray(correct, dtype=float)
    if len(c) == 0:
        return float("nan")
    which = np.minimum((c * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            total += mask.mean() * abs(y[mask].mean() - c[mask].mean())
    return float(total)


def _ranked(conf: Sequence[float], correct: Sequence[bool]) -> np.ndarray:
    """Correctness sorted by confidence, most confident first (ties keep the input order)."""
    order = np.argsort(-np.asarray(conf, dtype=float), kind="stable")
    return np.asarray(correct, dtype=float)[order]


def accuracy_at_coverage(conf: Sequence[float], correct: Sequence[bool], coverage: float) -> float:
    """Accuracy over the most confident `coverage` share of rows (at least one row)."""
    ranked = _ranked(conf, correct)
    if len(ranked) == 0:
        return float("nan")
    return float(ranked[: max(1, math.ceil(coverage * len(ranked)))].mean())


def risk_coverage(conf: Sequence[float], correct: Sequence[bool], points: int = 100) -> list[list[float]]:
    """[[threshold, accuracy of the rows at or above it, their share]], from the most confident row down,
    at most `points` points (for a plot, and for `threshold_for_accuracy`)."""
    c = np.asarray(conf, dtype=float)
    order = np.argsort(-c, kind="stable")
    accepted = np.cumsum(np.asarray(correct, dtype=float)[order]) / np.arange(1, len(c) + 1)
    picks = sorted(set(np.linspace(0, len(c) - 1, min(points, len(c))).round().astype(int).tolist()))
    return [[float(c[order][k]), float(accepted[k]), (k + 1) / len(c)] for k in picks]


def threshold_for_accuracy(curve: list[list[float]], target: float) -> float:
    """The lowest confidence threshold whose accepted rows reached `target` accuracy on the curve's
    split; above 1 (accept nothing) when none did."""
    ok = [t for t, acc, _ in curve if acc >= target]
    return min(ok) if ok else 1.0 + EPS


def bootstrap_ci(
    conf: Sequence[float], correct: Sequence[bool], statistic, n: int = 1000, seed: int = 0
) -> list[float]:
    """Seeded percentile-bootstrap 95% interval of `statistic(conf, correct)` over rows."""
    c, y = np.asarray(conf, dtype=float), np.asarray(correct, dtype=bool)
    if len(c) < 2:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    stats = [statistic(c[i], y[i]) for i in rng.integers(0, len(c), (n, len(c)))]
    return [float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))]


def confidence_report(conf: Sequence[float], correct: Sequence[bool], seed: int = 0) -> dict[str, Any]:
    """ECE and accuracy at 50 / 80 / 100% coverage, each with its 95% interval."""
    out: dict[str, Any] = {
        "ece": expected_calibration_error(conf, correct),
        "ece_ci95": bootstrap_ci(conf, correct, expected_calibration_error, seed=seed),
    }
    for cov in COVERAGES:
        key = f"accuracy_at_{round(cov * 100)}"
        out[key] = accuracy_at_coverage(conf, correct, cov)
        out[f"{key}_ci95"] = bootstrap_ci(
            conf, correct, lambda c, y, v=cov: accuracy_at_coverage(c, y, v), seed=seed
        )
    return out


@dataclass
class Calibration:
    """A calibrator per field, fitted on `split` of `data`, with that split's risk-coverage curves."""

    calibrators: dict[str, Calibrator]
    curves: dict[str, list[list[float]]] = field(default_factory=dict)
    split: str = "validation"
    data: str = ""
    rows: int = 0
    constrained: bool = False  # fitted on answers decoded with --constrained (their scores differ)

    def __call__(self, scores: dict[str, float]) -> dict[str, float]:
        return {
            f: float(self.calibrators[f]([s])[0]) if f in self.calibrators else s for f, s in scores.items()
        }

    @classmethod
    def fit(
        cls,
        scores: Sequence[dict[str, float]],
        correct: Sequence[dict[str, bool]],
        method: str = "auto",
        **info,
    ) -> Calibration:
        calibrators, curves = {}, {}
        for f in FIELDS:
            s, y = [r[f] for r in scores], [r[f] for r in correct]
            calibrators[f] = Calibrator.fit(s, y, method)
            curves[f] = risk_coverage(calibrators[f](s), y)
        return cls(calibrators, curves, rows=len(scores), **info)

    def to_json(self) -> str:
        body = {
            "fields": {f: asdict(c) for f, c in self.calibrators.items()},
            "curves": self.curves,
            "split": self.split,
            "data": self.data,
            "rows": self.rows,
            "constrained": self.constrained,
            "correct_means": {
                "title": f"token F1 >= {TITLE_F1_OK}",
                "category": "exact",
                "price": f"within {PRICE_APE_OK:.0%}",
            },
        }
        return json.dumps(body, indent=2) + "\n"

    def save(self, folder: str | Path) -> Path:
        """FOLDER/calibration.json, written atomically (eval writes it into an existing model folder)."""
        path = Path(folder) / CALIBRATION_FILE
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(self.to_json(), encoding="utf-8")
        os.replace(tmp, path)
        return path


def load_calibration(model_dir: str | Path) -> Calibration | None:
    """MODEL/calibration.json, or None when the model has not been calibrated (or is a hub id)."""
    path = Path(model_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
        calibrators = {f: Calibrator(**c) for f, c in body["fields"].items()}
        info = {k: body[k] for k in ("split", "data", "rows", "constrained") if k in body}
        return Calibration(calibrators, body.get("curves", {}), **info)
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(
            f"{path}: not a calibration file ({e}); run `productvlm eval` again or delete it"
        ) from e


def review_thresholds(
    calibration: Calibration | None, review_below: float | None, target_accuracy: float | None
) -> dict[str, float]:
    """Per field, the confidence under which a row goes to review: `review_below` for every field, or,
    with `target_accuracy`, the lowest threshold at which that field's accepted validation rows reached it."""
    if target_accuracy is None:
        return dict.fromkeys(FIELDS, 0.5 if review_below is None else review_below)
    if calibration is None or not calibration.curves:
        raise UserError(
            "--target-accuracy needs a calibrated model (calibration.json): run `productvlm eval` on it first"
        )
    return {f: threshold_for_accuracy(calibration.curves.get(f, []), target_accuracy) for f in FIELDS}


def needs_review(confidence: dict[str, float | None], thresholds: dict[str, float]) -> bool:
    return any(confidence.get(f) is None or confidence[f] < t for f, t in thresholds.items())


__all__ = [
    "FIELDS",
    "CALIBRATION_FILE",
    "Calibrator",
    "Calibration",
    "field_scores",
    "names_category",
    "field_correct",
    "expected_calibration_error",
    "accuracy_at_coverage",
    "risk_coverage",
    "threshold_for_accuracy",
    "confidence_report",
    "load_calibration",
    "review_thresholds",
    "needs_review",
]
