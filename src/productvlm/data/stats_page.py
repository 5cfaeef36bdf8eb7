"""The `data stats` HTML page: the tables of `data.stats` and its plots in one self-contained page
(`templates/stats.html.j2`, escaped by the template engine; see `productvlm.pages`)."""

from __future__ import annotations

from pathlib import Path

from productvlm.data import folder
from productvlm.data.stats import NUM_CROPS, RARE_ROWS, DatasetStats, category_line, stat_tables
from productvlm.pages import PageFigure, render_page

PLOT_CATEGORIES = 40


def plots(stats: DatasetStats) -> list[PageFigure]:
    """The page's figures."""
    return [
        PageFigure("categories", "Rows per category and split", _categories(stats)),
        PageFigure("long-tail", "Category long tail: rows per category by rank (log-log)", _long_tail(stats)),
        PageFigure("prices", "Price distribution", _prices(stats)),
        PageFigure("sizes", "Image sizes", _sizes(stats)),
        PageFigure("tokens", "Image tokens per image", _tokens(stats)),
    ]


def _axes(width: float, height: float):
    """A figure and its one set of axes (matplotlib's object API: no pyplot, no GUI backend)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def _categories(stats: DatasetStats):
    cats = stats.summary["categories"]
    largest = list(cats.items())[:PLOT_CATEGORIES]
    rest = list(cats.values())[PLOT_CATEGORIES:]
    if rest:
        largest.append((f"{len(rest)} others", {k: sum(v[k] for v in rest) for k in folder.SPLITS}))
    fig, ax = _axes(7, 0.35 * max(4, len(largest)) + 1)
    names = [c for c, _ in largest][::-1]
    left = [0] * len(names)
    for split in folder.SPLITS:
        vals = [v[split] for _, v in largest][::-1]
        ax.barh(names, vals, left=left, label=split)
        left = [a + b for a, b in zip(left, vals)]
    ax.set_xlabel("rows")
    ax.legend(loc="lower right")
    return fig


def _long_tail(stats: DatasetStats):
    fig, ax = _axes(7, 3.5)
    totals = [v["total"] for v in stats.summary["categories"].values()]
    ax.plot(range(1, len(totals) + 1), totals, marker="o", markersize=3, color="#7a5c3e")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.axhline(RARE_ROWS, color="#999", linestyle="--", linewidth=1, label=f"{RARE_ROWS} rows")
    ax.set_xlabel("category rank (largest first)")
    ax.set_ylabel("rows")
    ax.legend(loc="upper right")
    return fig


def _prices(stats: DatasetStats):
    fig, ax = _axes(7, 3.5)
    ax.hist(stats.prices, bins=40, color="#7a5c3e")
    ax.set_xlabel("full_price")
    ax.set_ylabel("rows")
    return fig


def _sizes(stats: DatasetStats):
    fig, ax = _axes(5, 5)
    ax.scatter([w for w, _ in stats.sizes], [h for _, h in stats.sizes], s=6, alpha=0.4)
    ax.set_xlabel("width (px)")
    ax.set_ylabel("height (px)")
    return fig


def _tokens(stats: DatasetStats):
    fig, ax = _axes(7, 3.5)
    every = [t for n in NUM_CROPS for t in stats.tokens[n]] or [0]
    lo, width = min(every), max(every) - min(every) + 1
    bins = [lo + width * i / 60 for i in range(61)]  # shared, so one-value series show
    for n in NUM_CROPS:
        ax.hist(stats.tokens[n], bins=bins, alpha=0.7, label=f"num_crops {n}")
    ax.set_xlabel("image tokens per image")
    ax.set_ylabel("rows")
    ax.legend(loc="upper center")
    return fig


def to_html(stats: DatasetStats) -> str:
    s = stats.summary
    return render_page(
        "stats.html.j2",
        dataset_dir=s["dataset_dir"],
        source=str(s["source"]),
        discounted=f"{s['discounted_fraction']:.1%}",
        category_line=category_line(stats),
        unreadable=s["unreadable_images"],
        tables=stat_tables(stats),
        figures=plots(stats),
    )


def write_html(stats: DatasetStats, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder.atomic_write_text(path, to_html(stats))
    return path
