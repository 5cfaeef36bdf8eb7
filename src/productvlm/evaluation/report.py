"""The evaluation report: one self-contained HTML page (plots and thumbnails embedded, no external URL).

Top: the metrics table, model vs baselines. Then predicted vs true price, the error histogram, the
category confusion matrix, the training curves (when the model sits in a run folder with
RUN/train_log.jsonl), per-category accuracy and price error, and the worst examples with their photos.

The data and the plots (matplotlib Figures) are made here; `render` hands them to
`templates/report.html.j2` (escaped by the template engine, see `productvlm.pages`). A new plot is one
more `PageFigure` in `figure_sections`.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import ConfusionMatrixDisplay

from productvlm.data.images import BadImage, load_photo
from productvlm.pages import PageFigure, render_page
from productvlm.run_folder import LOG, find_run

N_WORST = 12
THUMB = 160
NONE_LABEL = "(none)"
OTHER_LABEL = "(other)"

# ------------------------------------------------------------------ plots


def _no_price(fig: Figure, ax, title: str) -> Figure:
    """The figure of a price plot with nothing to plot (an untrained model answers "0"), saying why."""
    ax.text(0.5, 0.5, "no answer has a price above 0", ha="center", va="center", color="#666")
    ax.set_axis_off()
    ax.set_title(title)
    return fig


def price_scatter(preds: list[dict[str, Any]]) -> Figure:
    pairs = [(p["truth"]["price"], p["pred"]["price"]) for p in preds if _positive(p["pred"]["price"])]
    pairs = [(t, q) for t, q in pairs if t > 0]
    fig = Figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    if not pairs:
        return _no_price(fig, ax, "Predicted vs true price")
    t, q = np.array(pairs).T
    ax.scatter(t, q, s=14, alpha=0.6, color="#3366cc", edgecolors="none")
    lo, hi = min(t.min(), q.min()) * 0.8, max(t.max(), q.max()) * 1.25
    ax.plot([lo, hi], [lo, hi], color="#999", lw=1, ls="--", label="perfect")
    ax.fill_between(
        [lo, hi], [lo * 0.9, hi * 0.9], [lo * 1.1, hi * 1.1], color="#0a7", alpha=0.12, label="±10%"
    )
    ax.set(
        xscale="log",
        yscale="log",
        xlim=(lo, hi),
        ylim=(lo, hi),
        xlabel="true price",
        ylabel="predicted price",
    )
    ax.set_title("Predicted vs true price")
    ax.legend(loc="upper left")
    return fig


def error_histogram(preds: list[dict[str, Any]]) -> Figure:
    errs = [
        100 * (p["pred"]["price"] / p["truth"]["price"] - 1)
        for p in preds
        if _positive(p["pred"]["price"]) and p["truth"]["price"] > 0
    ]
    fig = Figure(figsize=(5.5, 4))
    ax = fig.add_subplot()
    if not errs:
        return _no_price(fig, ax, "Price error")
    ax.hist(np.clip(errs, -100, 200), bins=40, color="#3366cc", alpha=0.8)
    ax.axvline(0, color="#333", lw=1)
    ax.set(xlabel="price error, % of true (clipped to -100..200)", ylabel="answers")
    ax.set_title("Price error")
    return fig


def confusion(preds: list[dict[str, Any]]) -> Figure | None:
    truths = [p["truth"]["category"] for p in preds]
    labels = sorted(set(truths))
    if not labels:
        return None
    known = set(labels)
    pred = [
        c if c in known else (NONE_LABEL if c is None else OTHER_LABEL)
        for c in (p["pred"]["category"] for p in preds)
    ]
    extra = [x for x in (OTHER_LABEL, NONE_LABEL) if x in pred]
    size = 2.5 + 0.55 * (len(labels) + len(extra))
    fig = Figure(figsize=(size, size))
    ax = fig.add_subplot()
    ConfusionMatrixDisplay.from_predictions(
        truths, pred, labels=labels + extra, ax=ax, colorbar=False, cmap="Blues", xticks_rotation=60
    )
    ax.set_title("Category confusion (rows: true)")
    return fig


def training_curves(log: Path | None) -> Figure | None:
    if log is None or not log.is_file():
        return None
    events = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    loss = [(e["step"], e["loss"]) for e in events if "loss" in e]
    evals = [e for e in events if "eval_category_accuracy" in e]
    if not loss and not evals:
        return None
    fig = Figure(figsize=(10, 3.6))
    ax1, ax2 = fig.subplots(1, 2)
    if loss:
        ax1.plot(*zip(*loss), color="#3366cc")
    ax1.set(xlabel="step", ylabel="train loss", yscale="log", title="Training loss")
    if evals:
        steps = [e["step"] for e in evals]
        ax2.plot(steps, [e["eval_category_accuracy"] for e in evals], "o-", label="category accuracy")
        mape = [e.get("eval_price_mape") for e in evals]
        ax2.plot(steps, [m if m is not None else np.nan for m in mape], "s-", label="price MAPE")
        ax2.plot(steps, [e.get("eval_parse_rate", np.nan) for e in evals], "^-", label="parse rate")
        ax2.legend()
    ax2.set(xlabel="step", title="Validation (generation)")
    return fig


def risk_coverage_plot(preds: list[dict[str, Any]]) -> Figure | None:
    """Accuracy of the most confident share of rows, per field (one line each; flat = confidence ranks
    nothing), from each record's calibrated `confidence` and `field_correct`."""
    from productvlm.prompting.confidence import FIELDS, risk_coverage

    if not preds or "confidence" not in preds[0]:
        return None
    fig = Figure(figsize=(5.2, 3.4))
    ax = fig.add_subplot()
    for f in FIELDS:
        curve = risk_coverage([p["confidence"][f] for p in preds], [p["field_correct"][f] for p in preds])
        ax.plot([100 * c for _, _, c in curve], [100 * a for _, a, _ in curve], label=f)
    ax.set_xlabel("coverage: most confident % of rows kept")
    ax.set_ylabel("accuracy of the kept rows (%)")
    ax.set_xlim(0, 100)
    ax.legend(loc="lower left")
    ax.grid(alpha=0.3)
    return fig


def confidence_rows(metrics: dict[str, Any]) -> list[dict[str, str]]:
    """The confidence table: per field, ECE before/after calibration and accuracy at 50 / 80 / 100% coverage."""
    block = metrics.get("confidence") or {}
    keys = ("ece_raw", "ece", "accuracy_at_50", "accuracy_at_80", "accuracy_at_100")
    return [
        {"field": f, **{k: _fmt(b.get(k), True) for k in keys}}
        for f, b in block.items()
        if f != "calibrated_on"
    ]


def figure_sections(
    predictions: list[dict[str, Any]], train_log: Path | None = None
) -> dict[str, list[PageFigure]]:
    """The report's plots: section title -> figures, in page order; a plot with nothing to show (no
    category, no training log) is left out, and so is a section left empty."""
    sections = {
        "Price": [
            PageFigure("price-scatter", "log scale; band: within 10%", price_scatter(predictions)),
            PageFigure("error-hist", "signed error of answers with a price", error_histogram(predictions)),
        ],
        "Category": [PageFigure("confusion", "counts; (none): no category parsed", confusion(predictions))],
        "Confidence": [
            PageFigure(
                "risk-coverage", "risk-coverage, calibrated confidence", risk_coverage_plot(predictions)
            )
        ],
        "Training": [PageFigure("curves", str(train_log), training_curves(train_log))],
    }
    shown = {title: [f for f in figures if f.picture is not None] for title, figures in sections.items()}
    return {title: figures for title, figures in shown.items() if figures}


def _positive(x: float | None) -> bool:
    return x is not None and math.isfinite(x) and x > 0


# ------------------------------------------------------------------ tables


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if pct:
        return f"{100 * x:.1f}%"
    return f"{x:,.2f}" if isinstance(x, float) else str(x)


# (label, field, key, as percent, higher is better)
ROWS = [
    ("parse rate", None, "parse_rate", True, True),
    ("category accuracy", "category", "accuracy", True, True),
    ("category macro-F1", "category", "macro_f1", True, True),
    ("price MAE", "price", "mae", False, False),
    ("price MAPE", "price", "mape", True, False),
    ("price median APE", "price", "median_ape", True, False),
    ("price within 10%", "price", "within_10pct", True, True),
    ("price within 25%", "price", "within_25pct", True, True),
    ("title exact match", "title", "exact_match", True, True),
    ("title token F1", "title", "token_f1", True, True),
    ("title chrF", "title", "chrf", False, True),
]
BASELINES = {
    "majority_category": "majority category",
    "mean_price": "mean train price",
    "median_price_per_true_category": "median price of the true category¹",
}


def _get(block: dict[str, Any], field: str | None, key: str) -> Any:
    return (block if field is None else block.get(field, {})).get(key)


def metric_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The metrics table as text: label, model value, its 95% CI (or None), one value per baseline."""
    base = metrics.get("baselines", {})
    rows = []
    for label, field, key, pct, _ in ROWS:
        ci = _get(metrics, field, f"{key}_ci95")
        rows.append(
            {
                "label": label,
                "model": _fmt(_get(metrics, field, key), pct),
                "ci": (_fmt(ci[0], pct), _fmt(ci[1], pct)) if ci else None,
                "baselines": [_fmt(_get(b, field, key), pct) for b in base.values()],
            }
        )
    return rows


def per_category(preds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for p in preds:
        groups[p["truth"]["category"]].append(p)
    out = []
    for cat, items in sorted(groups.items()):
        apes = [p["price_ape"] for p in items if p["price_ape"] is not None]
        out.append(
            {
                "category": cat,
                "n": len(items),
                "accuracy": sum(p["category_correct"] for p in items) / len(items),
                "mape": float(np.mean(apes)) if apes else None,
                "median_ape": float(np.median(apes)) if apes else None,
            }
        )
    return out


def badness(p: dict[str, Any]) -> tuple:
    """Unparsed first, then wrong category, then the largest price error."""
    ape = p["price_ape"] if p["price_ape"] is not None else math.inf
    return (not p["parsed"], not p["category_correct"], ape)


def _short(text: str | None, n: int = 90) -> str | None:
    return text if text is None or len(text) <= n else text[: n - 1] + "…"


def thumbnail(path: str | None) -> Image.Image | None:
    """The row's photo through the one photo decoder, shrunk to THUMB px; None when unreadable."""
    if not path:
        return None
    try:
        im = load_photo(path)
    except (BadImage, OSError):
        return None
    im.thumbnail((THUMB, THUMB))
    return im


def worst(preds: list[dict[str, Any]], n: int = N_WORST) -> list[dict[str, Any]]:
    """The `n` worst answers (`badness`) as text and a thumbnail."""
    out = []
    for p in sorted(preds, key=badness, reverse=True)[:n]:
        t, q = p["truth"], p["pred"]
        out.append(
            {
                "photo": thumbnail(p.get("image_path")),
                "photo_name": Path(p["image_path"]).name if p.get("image_path") else "",
                "truth": (t["title"], t["category"], _fmt(t["price"])),
                "pred": (_short(q["title"]) or "—", q["category"] or "—", _fmt(q["price"])),
                "category_correct": p["category_correct"],
                "price_error": _fmt(p["price_ape"], True),
                "raw": _short(p["raw"], 240),
            }
        )
    return out


def find_train_log(model_dir: str | Path) -> Path | None:
    """RUN/train_log.jsonl when the model is RUN, RUN/final or RUN/final/adapter."""
    run = find_run(model_dir)
    return run / LOG if run and (run / LOG).is_file() else None


def render(metrics: dict[str, Any], predictions: list[dict[str, Any]], train_log: Path | None = None) -> str:
    return render_page(
        "report.html.j2",
        model=str(metrics.get("model")),
        split=str(metrics.get("split")),
        n=metrics.get("n"),
        num_crops=metrics.get("num_crops"),
        decoding="constrained" if metrics.get("constrained") else "free",
        price_n=metrics.get("price", {}).get("n"),
        baselines=[BASELINES[b] for b in metrics.get("baselines", {})],
        metric_rows=metric_rows(metrics),
        sections=figure_sections(predictions, train_log),
        per_category=[
            {
                **c,
                "accuracy": _fmt(c["accuracy"], True),
                "mape": _fmt(c["mape"], True),
                "median_ape": _fmt(c["median_ape"], True),
            }
            for c in per_category(predictions)
        ],  # fmt: skip
        worst=worst(predictions),
        confidence=confidence_rows(metrics),
        calibrated_on=(metrics.get("confidence") or {}).get("calibrated_on") or {},
    )


__all__ = ["render", "find_train_log", "metric_rows", "per_category", "figure_sections", "ROWS"]
