"""`data stats`: what is in a dataset folder: the numbers (`compute_stats`), their tables (`stat_tables`)
and the terminal view (`print_stats`). The HTML page with the plots is `data.stats_page`."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from productvlm.data import folder
from productvlm.data.images import BadImage, image_size
from productvlm.models.phi3v.image_tokens import num_image_tokens

NUM_CROPS: tuple[int, ...] = (1, 4, 16)
TERMINAL_CATEGORIES = 25  # the terminal lists the largest categories and sums up the rest
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


def readable_size(path: Path) -> tuple[int, int] | None:
    """(width, height) as training sees the photo (`data.images.image_size`: header only, EXIF
    rotation applied); None when it is missing or no usable photo (a bomb, garbage, another format)."""
    try:
        return image_size(path)
    except (BadImage, OSError):
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
                size_cache[path] = readable_size(path)
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


# ---------------------------------------------------------------- tables


@dataclass(frozen=True)
class StatTable:
    """A table as text cells: the terminal and the HTML page show the same."""

    title: str
    header: list[str]
    rows: list[list[str]]


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:,.2f}" if abs(x) < 10 else f"{x:,.0f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def stat_tables(stats: DatasetStats, max_categories: int | None = None) -> list[StatTable]:
    """The tables of `data stats`; with `max_categories`, the category table lists that many of the
    largest and sums up the others in one row (the terminal); without, every category (the HTML page)."""
    s = stats.summary
    splits = StatTable(
        f"Rows per split ({_fmt(s['total_rows'])} in all)",
        ["split", "rows", "images"],
        [[split, _fmt(v["rows"]), _fmt(v["images"])] for split, v in s["splits"].items()],
    )
    keys = ("count", "min", "p25", "median", "mean", "p75", "max")
    numbers = StatTable(
        "Prices and image sizes",
        ["", *keys],
        [
            [name, *(_fmt(s[name].get(k, "-")) for k in keys)]
            for name in ("full_price", "image_width", "image_height", "image_aspect")
        ],
    )
    tokens = StatTable(
        "Image tokens per image by num_crops, and the budget (sum over rows)",
        ["crops", "median", "mean", "max", "train", "all splits"],
        [
            [
                n,
                *(_fmt(v.get(k, "-")) for k in ("median", "mean", "max")),
                _fmt(v["per_split"]["train"]),
                _fmt(v["total"]),
            ]
            for n, v in s["image_tokens"].items()
        ],
    )
    return [splits, _category_table(stats, max_categories), numbers, tokens]


def _category_table(stats: DatasetStats, max_categories: int | None) -> StatTable:
    s = stats.summary
    counted = (*folder.SPLITS, "total")
    cats = list(s["categories"].items())
    shown, rest = cats[:max_categories], cats[len(cats[:max_categories]) :]
    rows, running = [], 0
    for cat, v in shown:
        running += v["total"]
        rows.append([cat, *(_fmt(v[k]) for k in counted), *_shares(v["total"], running, s)])
    if rest:
        sums = {k: sum(v[k] for _, v in rest) for k in counted}
        sizes = f"{rest[-1][1]['total']}-{rest[0][1]['total']} rows each"
        rows.append(
            [
                f"... {len(rest)} more ({sizes})",
                *(_fmt(sums[k]) for k in counted),
                *_shares(sums["total"], running + sums["total"], s),
            ]
        )
    return StatTable(
        f"Rows per category (category3_code), largest first: {category_line(stats)}",
        ["category", *counted, "share", "cumulative"],
        rows,
    )


def _shares(n: int, running: int, s: dict[str, Any]) -> tuple[str, str]:
    total = s["total_rows"] or 1
    return f"{n / total:.1%}", f"{running / total:.1%}"


def print_stats(stats: DatasetStats, console: Console | None = None) -> None:
    console = console or Console()
    for t in stat_tables(stats, TERMINAL_CATEGORIES):
        table = Table(title=Text(t.title))  # Text: catalog text is never read as rich markup
        for i, name in enumerate(t.header):
            table.add_column(name, justify="left" if i == 0 else "right")
        for row in t.rows:
            table.add_row(*map(Text, row))
        console.print(table)
    s = stats.summary
    console.print(
        f"discounted rows: {s['discounted_fraction']:.1%}   unreadable images: {s['unreadable_images']}"
    )
