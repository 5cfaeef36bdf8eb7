"""`data stats`: the numbers match the folder, and the HTML page embeds its plots."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from productvlm.data import folder
from productvlm.data.stats import compute_stats
from productvlm.data.stats_page import write_html
from productvlm.data.synth import synthesize
from productvlm.models.phi3v.image_tokens import num_image_tokens


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("stats") / "ds"
    synthesize(d, rows=40, seed=2, workers=1, progress=False)
    return d


def test_numbers_match_the_folder(ds):
    s = compute_stats(ds).summary
    rows = {sp: folder.read_split(ds, sp) for sp in folder.SPLITS}
    assert {sp: v["rows"] for sp, v in s["splits"].items()} == {sp: len(r) for sp, r in rows.items()}
    assert s["total_rows"] == 40
    every = [r for rs in rows.values() for r in rs]
    cats = Counter(r["category3_code"] for r in every)
    assert {c: v["total"] for c, v in s["categories"].items()} == dict(cats)
    assert s["categories"][next(iter(cats))]["train"] == sum(
        r["category3_code"] == next(iter(cats)) for r in rows["train"]
    )
    prices = [r["full_price"] for r in every]
    assert (s["full_price"]["min"], s["full_price"]["max"]) == (min(prices), max(prices))
    assert s["full_price"]["mean"] == pytest.approx(sum(prices) / len(prices))
    sizes = [Image.open(r["image_path"]).size for r in every]
    assert s["image_width"]["max"] == max(w for w, _ in sizes)
    for n in (1, 4, 16):
        tokens = [num_image_tokens(w, h, n) for w, h in sizes]
        assert s["image_tokens"][str(n)]["total"] == sum(tokens)
        train = sum(num_image_tokens(*Image.open(r["image_path"]).size, n) for r in rows["train"])
        assert s["image_tokens"][str(n)]["per_split"]["train"] == train
    assert s["image_tokens"]["1"]["max"] < s["image_tokens"]["4"]["max"] < s["image_tokens"]["16"]["max"]
    assert s["unreadable_images"] == 0


def test_html_is_self_contained_with_plots(ds, tmp_path):
    page = write_html(compute_stats(ds), tmp_path / "s.html").read_text()
    assert len(re.findall(r'src="data:image/png;base64,[A-Za-z0-9+/=]{200,}"', page)) == 5
    assert "Rows per category" in page and "<table>" in page
    assert not re.search(r'src="(?!data:)', page)  # nothing fetched from elsewhere


def test_cli_stats(ds, tmp_path):
    from productvlm.cli import app

    res = CliRunner().invoke(
        app,
        ["data", "stats", str(ds), "--html", str(tmp_path / "p.html"), "--json", str(tmp_path / "s.json")],
    )
    assert res.exit_code == 0, res.output
    assert "Rows per split" in res.output and "40 in all" in res.output
    assert (tmp_path / "p.html").stat().st_size > 10_000
    assert json.loads((tmp_path / "s.json").read_text())["total_rows"] == 40


def long_tail_folder(root: Path) -> tuple[Path, dict[str, int]]:
    """60 categories of 40, 39, ... 1... rows: a head and a long tail of rare ones."""
    counts = {f"CAT-{i:02d}": max(1, 40 - i) for i in range(60)}
    counts["N.A."] = 1
    root.mkdir()
    (root / "train" / "images").mkdir(parents=True)
    Image.new("RGB", (32, 24)).save(root / "train" / "images" / "a.jpg")
    rows = [
        {"file_name": "images/a.jpg", "product_code": i, "category3_code": c, "full_price": 10.0}
        for i, c in enumerate(c for c, n in counts.items() for _ in range(n))
    ]
    folder.write_splits(root, {"train": rows})
    return root, counts


def test_long_tail_of_categories_is_visible(tmp_path):
    ds, counts = long_tail_folder(tmp_path / "tail")
    stats = compute_stats(ds)
    d = stats.summary["category_distribution"]
    total = sum(counts.values())
    assert d["categories"] == 61
    assert d["single_row"] == sum(n == 1 for n in counts.values()) == 22
    assert d["rare"] == sum(n < 5 for n in counts.values()) and d["rare_rows"] == sum(
        n for n in counts.values() if n < 5
    )
    assert d["top_10_share"] == pytest.approx(sum(sorted(counts.values())[-10:]) / total)

    from rich.console import Console

    from productvlm.data.stats import TERMINAL_CATEGORIES, print_stats

    console = Console(record=True, width=200)
    print_stats(stats, console)
    text = console.export_text()
    rest = 61 - TERMINAL_CATEGORIES
    assert f"... {rest} more (1-{sorted(counts.values())[rest - 1]} rows each)" in text
    assert "100.0%" in text  # the cumulative share reaches all rows in the summed-up line
    assert "22 have 1 row" in text

    page = write_html(stats, tmp_path / "s.html").read_text()
    assert all(f"<td>{c}</td>" in page for c in counts)  # the page lists every category
    assert "Category long tail" in page and "22 have 1 row" in page
