"""The evaluation report: one self-contained HTML page (plots and thumbnails embedded, no external URL).

Top: the metrics table, model vs baselines. Then predicted vs true price, the error histogram, the
category confusion matrix, per-category accuracy and price error, the training curves (when the model
sits in a run folder with RUN/train_log.jsonl), and the worst examples with their photos.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import ConfusionMatrixDisplay

from productvlm.data.images import normalize_photo
from productvlm.run_folder import LOG, find_run

N_WORST = 12
THUMB = 160
NONE_LABEL = "(none)"
OTHER_LABEL = "(other)"

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;
color:#222;padding:0 1rem;line-height:1.4}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{margin-top:2.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
.meta{color:#666;font-size:.9rem}
table{border-collapse:collapse;margin:.8rem 0;font-size:.92rem}
th,td{border:1px solid #ddd;padding:.35rem .6rem;text-align:right;vertical-align:top}
th{background:#f5f5f7}td.l,th.l{text-align:left}
tr:nth-child(even) td{background:#fafafa}
.ci{color:#888;font-size:.8rem}.best{font-weight:600;color:#0a7}
.plots{display:flex;flex-wrap:wrap;gap:1rem}.plots figure{margin:0}
.plots img{max-width:100%;border:1px solid #eee}
#worst td.l{min-width:170px;max-width:300px;overflow-wrap:anywhere}#worst code{display:block;max-width:380px}
figcaption{color:#666;font-size:.85rem}
img.thumb{width:110px;height:auto;border:1px solid #ddd}
.bad{color:#c33}.ok{color:#0a7}code{font-size:.85rem;white-space:pre-wrap}
"""


# ------------------------------------------------------------------ plots


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _no_price(fig: Figure, ax, title: str) -> str:
    """The figure of a price plot with nothing to plot (an untrained model answers "0"), saying why."""
    ax.text(0.5, 0.5, "no answer has a price above 0", ha="center", va="center", color="#666")
    ax.set_axis_off()
    ax.set_title(title)
    return _png(fig)


def price_scatter(preds: list[dict[str, Any]]) -> str:
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
    return _png(fig)


def error_histogram(preds: list[dict[str, Any]]) -> str:
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
    return _png(fig)


def confusion(preds: list[dict[str, Any]]) -> str | None:
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
    return _png(fig)


def training_curves(log: Path | None) -> str | None:
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
    return _png(fig)


def _positive(x: float | None) -> bool:
    return x is not None and math.isfinite(x) and x > 0


# ------------------------------------------------------------------ tables


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if pct:
        return f"{100 * x:.1f}%"
    return f"{x:,.2f}" if isinstance(x, float) else html.escape(str(x))


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


def metrics_table(metrics: dict[str, Any]) -> str:
    base = metrics.get("baselines", {})
    head = "".join(f"<th>{html.escape(BASELINES[b])}</th>" for b in base)
    body = []
    for label, field, key, pct, _ in ROWS:
        model = _get(metrics, field, key)
        ci = _get(metrics, field, f"{key}_ci95")
        cell = _fmt(model, pct) + (
            f' <span class="ci">[{_fmt(ci[0], pct)}, {_fmt(ci[1], pct)}]</span>' if ci else ""
        )
        others = "".join(f"<td>{_fmt(_get(b, field, key), pct)}</td>" for b in base.values())
        body.append(f'<tr><td class="l">{label}</td><td>{cell}</td>{others}</tr>')
    return (
        f'<table id="metrics"><tr><th class="l">metric</th><th>model <span class="ci">[95% CI]</span></th>{head}</tr>'
        + "".join(body)
        + "</table>"
    )


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


def per_category_table(preds: list[dict[str, Any]]) -> str:
    rows = "".join(
        f'<tr><td class="l">{html.escape(c["category"])}</td><td>{c["n"]}</td><td>{_fmt(c["accuracy"], True)}</td>'
        f"<td>{_fmt(c['mape'], True)}</td><td>{_fmt(c['median_ape'], True)}</td></tr>"
        for c in per_category(preds)
    )
    return (
        '<table id="per-category"><tr><th class="l">true category</th><th>n</th><th>accuracy</th>'
        f"<th>price MAPE</th><th>price median APE</th></tr>{rows}</table>"
    )


def badness(p: dict[str, Any]) -> tuple:
    """Unparsed first, then wrong category, then the largest price error."""
    ape = p["price_ape"] if p["price_ape"] is not None else math.inf
    return (not p["parsed"], not p["category_correct"], ape)


def _short(text: str | None, n: int = 90) -> str | None:
    return text if text is None or len(text) <= n else text[: n - 1] + "…"


def thumbnail(path: str | None) -> str:
    if not path:
        return ""
    try:
        with Image.open(path) as im:
            im = normalize_photo(im)
            im.thumbnail((THUMB, THUMB))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=80)
    except (OSError, ValueError):
        return "(image unreadable)"
    b64 = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img class="thumb" alt="{html.escape(Path(path).name)}" src="data:image/jpeg;base64,{b64}">'


def worst_table(preds: list[dict[str, Any]], n: int = N_WORST) -> str:
    worst = sorted(preds, key=badness, reverse=True)[:n]
    rows = []
    for p in worst:
        t, q = p["truth"], p["pred"]
        ok = p["category_correct"]
        rows.append(
            f"<tr><td>{thumbnail(p.get('image_path'))}</td>"
            f'<td class="l">{html.escape(t["title"])}<br>{html.escape(t["category"])} · {_fmt(t["price"])}</td>'
            f'<td class="l">{html.escape(_short(q["title"]) or "—")}<br>'
            f'<span class="{"ok" if ok else "bad"}">{html.escape(q["category"] or "—")}</span> · {_fmt(q["price"])}</td>'
            f"<td>{_fmt(p['price_ape'], True)}</td>"
            f'<td class="l"><code>{html.escape(_short(p["raw"], 240))}</code></td></tr>'
        )
    return (
        '<table id="worst"><tr><th>photo</th><th class="l">truth</th><th class="l">prediction</th>'
        f'<th>price error</th><th class="l">raw answer</th></tr>{"".join(rows)}</table>'
    )


def find_train_log(model_dir: str | Path) -> Path | None:
    """RUN/train_log.jsonl when the model is RUN, RUN/final or RUN/final/adapter."""
    run = find_run(model_dir)
    return run / LOG if run and (run / LOG).is_file() else None


def _figure(b64: str | None, caption: str, fig_id: str) -> str:
    if b64 is None:
        return ""
    return (
        f'<figure id="{fig_id}"><img alt="{html.escape(caption)}" src="data:image/png;base64,{b64}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def risk_coverage_plot(preds: list[dict[str, Any]]) -> str | None:
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
    return _png(fig)


def confidence_section(metrics: dict[str, Any], preds: list[dict[str, Any]]) -> list[str]:
    """The report's confidence part: ECE and accuracy at 50 / 80 / 100% coverage, and the plot."""
    block = metrics.get("confidence")
    if not block:
        return []
    pct = lambda x: "—" if x is None or x != x else f"{100 * x:.1f}%"  # noqa: E731
    head = (
        "<tr><th>field</th><th>ECE (raw)</th><th>ECE</th><th>acc. @50%</th><th>@80%</th><th>@100%</th></tr>"
    )
    body = "".join(
        f"<tr><td>{f}</td><td>{pct(b['ece_raw'])}</td><td>{pct(b['ece'])}</td>"
        f"<td>{pct(b['accuracy_at_50'])}</td><td>{pct(b['accuracy_at_80'])}</td><td>{pct(b['accuracy_at_100'])}</td></tr>"
        for f, b in block.items()
        if f != "calibrated_on"
    )
    cal = block.get("calibrated_on", {})
    return [
        "<h2>Confidence</h2>",
        f'<table id="confidence">{head}{body}</table>',
        f"<p class='meta'>Calibrated on the {html.escape(str(cal.get('split')))} split ({cal.get('rows')} rows). "
        "Right means: category exact, title token F1 ≥ 0.8, price within 10%. acc. @80%: accuracy of the 80% "
        "of rows with the highest confidence.</p>",
        f'<div class="plots">{_figure(risk_coverage_plot(preds), "risk-coverage, calibrated confidence", "risk-coverage")}</div>',
    ]


def render(metrics: dict[str, Any], predictions: list[dict[str, Any]], train_log: Path | None = None) -> str:
    price_plots = _figure(
        price_scatter(predictions), "log scale; band: within 10%", "price-scatter"
    ) + _figure(error_histogram(predictions), "signed error of answers with a price", "error-hist")
    curves = training_curves(train_log)
    meta = (
        f"model <b>{html.escape(str(metrics.get('model')))}</b> · split <b>{html.escape(str(metrics.get('split')))}</b>"
        f" · {metrics.get('n')} rows · num_crops {metrics.get('num_crops')} · "
        f"{'constrained' if metrics.get('constrained') else 'free'} decoding"
    )
    sections = [
        f"<h1>productvlm evaluation</h1><p class='meta'>{meta}</p>",
        "<h2>Metrics</h2>",
        metrics_table(metrics),
        "<p class='meta'>Baselines use the train split only. ¹ knows each row's true category: an upper bound "
        "for a price guess from the category alone. Price MAE/MAPE/median APE are over the answers with a "
        f"price ({metrics.get('price', {}).get('n')} of {metrics.get('n')}); within-x% counts a missing price "
        "as a miss. CIs: seeded percentile bootstrap over rows.</p>",
        "<h2>Price</h2>",
        f'<div class="plots">{price_plots or "<p>No answer had a price.</p>"}</div>',
        "<h2>Category</h2>",
        f'<div class="plots">{_figure(confusion(predictions), "counts; (none): no category parsed", "confusion")}</div>',
        "<h2>Per category</h2>",
        per_category_table(predictions),
        *confidence_section(metrics, predictions),
    ]
    if curves:
        sections += [
            "<h2>Training</h2>",
            f'<div class="plots">{_figure(curves, str(train_log), "curves")}</div>',
        ]
    sections += [f"<h2>Worst {min(N_WORST, len(predictions))} examples</h2>", worst_table(predictions)]
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>productvlm evaluation: {html.escape(str(metrics.get('model')))}</title>"
        f"<style>{STYLE}</style></head><body>{''.join(sections)}</body></html>"
    )


__all__ = ["render", "find_train_log", "metrics_table", "per_category"]
