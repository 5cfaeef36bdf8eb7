"""`data stats`: what is in a dataset folder, printed with rich and written as a self-contained HTML page."""

from __future__ import annotations

import base64
import html
import io
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from rich.console import Console
from rich.table import Table

from productvlm.data import folder
from productvlm.data.images import PIL_ERRORS
from productvlm.models.phi3v.image_tokens import num_image_tokens

NUM_CROPS: tuple[int, ...] = (1, 4, 16)
TERMINAL_CATEGORIES = 25  # the terminal lists the largest categories and sums up the rest
PLOT_CATEGORIES = 40
RARE_ROWS = 5  # a category with fewer rows is counted as rare ("the long tail")


@dataclass
class DatasetStats:
    """`summary` holds plain numbers (JSON-ready); the lists are kept for the plots."""

    summary: dict[str, Any]
    prices: list[float] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    tokens: dict[int, list[int]] = field(default_factory=dict)


def _describe(values: list[float]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {
        "count": len(values),
        "min": min(values),
        "p25": q[0],
        "median": q[1],
        "mean": statistics.fmean(values),
        "p75": q[2],
        "max": max(values),
    }


def image_size(path: Path) -> tuple[int, int] | None:
    """Width and height from the file header (no pixel decoding); None if unreadable."""
    try:
        with Image.open(path) as im:
            return im.size
    except PIL_ERRORS:  # a hostile header (a bomb, garbage) counts as unreadable, never a traceback
        return None


def compute_stats(dataset_dir: str | Path) -> DatasetStats:
    dataset_dir = folder.check_dataset_dir(Path(dataset_dir))
    info = folder.read_dataset_info(dataset_dir)
    split_rows = {s: folder.read_metadata(dataset_dir, s) for s in folder.SPLITS}
    stats = DatasetStats({}, tokens={n: [] for n in NUM_CROPS})
    size_cache: dict[Path, tuple[int, int] | None] = {}
    categories: dict[str, Counter[str]] = {}
    splits: dict[str, dict[str, int]] = {}
    token_totals = {n: dict.fromkeys(folder.SPLITS, 0) for n in NUM_CROPS}
    missing = discounted = 0
    for split, rows in split_rows.items():
        files = set()
        for row in rows:
            categories.setdefault(str(row.get("category3_code")), Counter())[split] += 1
            if isinstance(row.get("full_price"), (int, float)):
                stats.prices.append(float(row["full_price"]))
            discounted += bool(row.get("flg_discount"))
            path = dataset_dir / split / str(row.get("file_name"))
            files.add(path)
            if path not in size_cache:
                size_cache[path] = image_size(path)
            size = size_cache[path]
            if size is None:
                missing += 1
                continue
            stats.sizes.append(size)
            for n in NUM_CROPS:
                t = num_image_tokens(size[0], size[1], n)
                stats.tokens[n].append(t)
                token_totals[n][split] += t
        splits[split] = {"rows": len(rows), "images": len(files)}
    total = sum(s["rows"] for s in splits.values())
    stats.summary = {
        "dataset_dir": str(dataset_dir),
        "source": info.get("source"),
        "total_rows": total,
        "splits": splits,
        "categories": {
            c: {**{s: cnt[s] for s in folder.SPLITS}, "total": sum(cnt.values())}
            for c, cnt in sorted(categories.items(), key=lambda kv: -sum(kv[1].values()))
        },
        "category_distribution": _category_distribution([sum(c.values()) for c in categories.values()]),
        "full_price": _describe(stats.prices),
        "discounted_fraction": discounted / total if total else 0.0,
        "image_width": _describe([float(w) for w, _ in stats.sizes]),
        "image_height": _describe([float(h) for _, h in stats.sizes]),
        "image_aspect": _describe([w / h for w, h in stats.sizes]),
        "unreadable_images": missing,
        "image_tokens": {
            str(n): {
                **_describe([float(t) for t in stats.tokens[n]]),
                "total": sum(stats.tokens[n]),
                "per_split": token_totals[n],
            }
            for n in NUM_CROPS
        },
    }
    return stats


def _category_distribution(counts: list[int]) -> dict[str, Any]:
    """How concentrated the categories are, and how long their tail of rare ones is."""
    counts = sorted(counts, reverse=True)
    total = sum(counts) or 1
    rare = [n for n in counts if n < RARE_ROWS]
    return {
        "categories": len(counts),
        "top_10_share": sum(counts[:10]) / total,
        "single_row": sum(n == 1 for n in counts),
        "rare": len(rare),
        "rare_rows": sum(rare),
        "rare_share": sum(rare) / total,
        "rare_means": f"fewer than {RARE_ROWS} rows",
    }


def category_line(stats: DatasetStats) -> str:
    d = stats.summary["category_distribution"]
    return (
        f"categories: {d['categories']}; the 10 largest hold {d['top_10_share']:.1%} of rows; "
        f"{d['single_row']} have 1 row, {d['rare']} have {d['rare_means']} ({d['rare_share']:.1%} of rows)"
    )


# ---------------------------------------------------------------- rich


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:,.2f}" if abs(x) < 10 else f"{x:,.0f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def tables(stats: DatasetStats, max_categories: int | None = None) -> list[Table]:
    """The tables of `data stats`; with `max_categories`, the category table lists that many of the
    largest and sums up the others in one row (the terminal); without, every category (the HTML page)."""
    s = stats.summary
    t_split = Table(title=f"Rows per split ({_fmt(s['total_rows'])} in all)")
    for col in ("split", "rows", "images"):
        t_split.add_column(col, justify="left" if col == "split" else "right")
    for split, v in s["splits"].items():
        t_split.add_row(split, _fmt(v["rows"]), _fmt(v["images"]))

    t_cat = Table(title=f"Rows per category (category3_code), largest first: {category_line(stats)}")
    t_cat.add_column("category")
    for col in (*folder.SPLITS, "total", "share", "cumulative"):
        t_cat.add_column(col, justify="right")
    cats = list(s["categories"].items())
    shown, rest = cats[:max_categories], cats[len(cats[:max_categories]) :]
    running = 0
    for cat, v in shown:
        running += v["total"]
        t_cat.add_row(cat, *(_fmt(v[k]) for k in (*folder.SPLITS, "total")), *_shares(v["total"], running, s))
    if rest:
        sums = {k: sum(v[k] for _, v in rest) for k in (*folder.SPLITS, "total")}
        sizes = f"{rest[-1][1]['total']}-{rest[0][1]['total']} rows each"
        t_cat.add_row(
            f"... {len(rest)} more ({sizes})",
            *(_fmt(sums[k]) for k in (*folder.SPLITS, "total")),
            *_shares(sums["total"], running + sums["total"], s),
        )

    t_num = Table(title="Prices and image sizes")
    keys = ("count", "min", "p25", "median", "mean", "p75", "max")
    t_num.add_column("")
    for k in keys:
        t_num.add_column(k, justify="right")
    for name in ("full_price", "image_width", "image_height", "image_aspect"):
        t_num.add_row(name, *(_fmt(s[name].get(k, "-")) for k in keys))

    t_tok = Table(title="Image tokens per image by num_crops, and the budget (sum over rows)")
    t_tok.add_column("crops", justify="right")
    for col in ("median", "mean", "max", "train", "all splits"):
        t_tok.add_column(col, justify="right")
    for n, v in s["image_tokens"].items():
        stats_ = (_fmt(v.get(k, "-")) for k in ("median", "mean", "max"))
        t_tok.add_row(n, *stats_, _fmt(v["per_split"]["train"]), _fmt(v["total"]))
    return [t_split, t_cat, t_num, t_tok]


def _shares(n: int, running: int, s: dict[str, Any]) -> tuple[str, str]:
    total = s["total_rows"] or 1
    return f"{n / total:.1%}", f"{running / total:.1%}"


def print_stats(stats: DatasetStats, console: Console | None = None) -> None:
    console = console or Console()
    for t in tables(stats, TERMINAL_CATEGORIES):
        console.print(t)
    s = stats.summary
    console.print(
        f"discounted rows: {s['discounted_fraction']:.1%}   unreadable images: {s['unreadable_images']}"
    )


# ---------------------------------------------------------------- HTML


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def plots(stats: DatasetStats) -> dict[str, str]:
    """Title -> base64 PNG; matplotlib's object API (no pyplot, no GUI backend)."""
    from matplotlib.figure import Figure

    s = stats.summary
    out = {}
    largest = list(s["categories"].items())[:PLOT_CATEGORIES]
    rest = list(s["categories"].values())[PLOT_CATEGORIES:]
    if rest:
        largest.append((f"{len(rest)} others", {k: sum(v[k] for v in rest) for k in folder.SPLITS}))
    fig = Figure(figsize=(7, 0.35 * max(4, len(largest)) + 1))
    ax = fig.subplots()
    names = [c for c, _ in largest][::-1]
    left = [0] * len(names)
    for split in folder.SPLITS:
        vals = [v[split] for _, v in largest][::-1]
        ax.barh(names, vals, left=left, label=split)
        left = [a + b for a, b in zip(left, vals)]
    ax.set_xlabel("rows")
    ax.legend(loc="lower right")
    out["Rows per category and split"] = _png(fig)

    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    totals = [v["total"] for v in s["categories"].values()]
    ax.plot(range(1, len(totals) + 1), totals, marker="o", markersize=3, color="#7a5c3e")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.axhline(RARE_ROWS, color="#999", linestyle="--", linewidth=1, label=f"{RARE_ROWS} rows")
    ax.set_xlabel("category rank (largest first)")
    ax.set_ylabel("rows")
    ax.legend(loc="upper right")
    out["Category long tail: rows per category by rank (log-log)"] = _png(fig)

    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    ax.hist(stats.prices, bins=40, color="#7a5c3e")
    ax.set_xlabel("full_price")
    ax.set_ylabel("rows")
    out["Price distribution"] = _png(fig)

    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    ax.scatter([w for w, _ in stats.sizes], [h for _, h in stats.sizes], s=6, alpha=0.4)
    ax.set_xlabel("width (px)")
    ax.set_ylabel("height (px)")
    out["Image sizes"] = _png(fig)

    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    every = [t for n in NUM_CROPS for t in stats.tokens[n]] or [0]
    bins = [
        min(every) + (max(every) - min(every) + 1) * i / 60 for i in range(61)
    ]  # shared, so one-value series show
    for n in NUM_CROPS:
        ax.hist(stats.tokens[n], bins=bins, alpha=0.7, label=f"num_crops {n}")
    ax.set_xlabel("image tokens per image")
    ax.set_ylabel("rows")
    ax.legend(loc="upper center")
    out["Image tokens per image"] = _png(fig)
    return out


def _html_table(t: Table) -> str:
    head = "".join(f"<th>{html.escape(str(c.header))}</th>" for c in t.columns)
    cells = [list(c.cells) for c in t.columns]
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(col[i]))}</td>" for col in cells) + "</tr>"
        for i in range(t.row_count)
    )
    return f"<h2>{html.escape(str(t.title))}</h2><table><tr>{head}</tr>{body}</table>"


def to_html(stats: DatasetStats) -> str:
    s = stats.summary
    parts = [_html_table(t) for t in tables(stats)]
    parts += [
        f'<h2>{html.escape(title)}</h2><img alt="{html.escape(title)}" src="data:image/png;base64,{b64}">'
        for title, b64 in plots(stats).items()
    ]
    style = (
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}"
        "table{border-collapse:collapse;margin-bottom:1em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Dataset stats: {html.escape(s['dataset_dir'])}</title>"
        f"<style>{style}</style></head><body><h1>Dataset {html.escape(s['dataset_dir'])}</h1>"
        f"<p>source: {html.escape(str(s['source']))}; discounted rows: {s['discounted_fraction']:.1%}; "
        f"{html.escape(category_line(stats))}; "
        f"unreadable images: {s['unreadable_images']}</p>{''.join(parts)}</body></html>"
    )


def write_html(stats: DatasetStats, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder.atomic_write_text(path, to_html(stats))
    return path
