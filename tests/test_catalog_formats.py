"""Real catalogs as they come: text SKUs, formatted prices, placeholder values, messy categories, and
the hub layout read without a network (a local folder shaped like the hub repository, through `datasets`).

Every source row ends either in the dataset or in failures.csv with a reason; the tests count both.
"""

from __future__ import annotations

import csv
import io
import json
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from faultserver import ImageServer
from productvlm.data import folder
from productvlm.data.fetch import FetchOptions
from productvlm.data.importer import Categories, import_dataset
from productvlm.data.rows import RowRejected, RowRules, parse_image_source, parse_product_code
from productvlm.data.source import load_table
from productvlm.errors import UserError
from productvlm.prices import PriceError, read_price

QUICK = FetchOptions(timeout=5, retries=1, backoff=0.01, concurrency=8)


def photo(i: int) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(np.full((48, 64, 3), rng.integers(0, 256, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


UUIDS = [str(uuid.UUID(int=i + 1)).upper() for i in range(30)]


@pytest.fixture(scope="module")
def server():
    with ImageServer({u: photo(i) for i, u in enumerate(UUIDS)} | {"page": b"<html>"}) as srv:
        yield srv


def burberry_url(server: ImageServer, i: int) -> str:
    """Like https://assets.burberry.com/is/image/Burberryltd/<UUID>: no file extension."""
    return server.url(f"/is/image/Burberryltd/{UUIDS[i]}")


def reasons(out: Path) -> dict[int, str]:
    with open(out / folder.FAILURES_CSV, encoding="utf-8") as f:
        return {int(r["row"]): r["reason"] for r in csv.DictReader(f)}


def imported(out: Path) -> list[dict]:
    return [{**r, "split": s} for s in folder.SPLITS for r in folder.read_split(out, s)]


# ---------------------------------------------------------------- product codes and the split


def test_split_is_pinned_for_numeric_and_text_codes():
    """The split hashes sha256("seed:code_text"); these values must never change (datasets made before
    text codes existed keep their splits: an integer is hashed as its decimal text, as it always was)."""
    pinned = {
        0: "train",
        1: "test",
        42: "train",
        1290: "train",
        80012345: "train",
        -7: "validation",
        2**63 - 1: "test",
        "AB-1290-BLK": "train",
        "ab-1290-blk": "validation",  # case matters: a code is what it says
        "SKU_000123": "train",
        "8045723-BEIGE": "train",
        "トレンチ-01": "train",
    }
    assert {c: folder.split_of(c) for c in pinned} == pinned
    assert round(folder.split_hash("AB-1290-BLK"), 6) == 0.735769
    assert round(folder.split_hash(1290), 6) == round(folder.split_hash("1290"), 6)
    assert folder.code_text(" 001290 ") == "1290" and folder.code_text("Cafe\u0301-12") == "Caf\u00e9-12"


@pytest.mark.parametrize(
    "value, code",
    [
        (1290, 1290),
        ("1290", 1290),
        (" 001290 ", 1290),
        (1290.0, 1290),
        ("8.0012345E+07", 80012345),  # a spreadsheet's way to write a long number
        ("AB-1290-BLK", "AB-1290-BLK"),
        ("  sku 77 ", "sku 77"),
        ("Cafe\u0301-12", "Caf\u00e9-12"),  # NFC: the same letters typed two ways are one code
    ],
)
def test_product_codes_of_any_form(value, code):
    assert parse_product_code(value) == code


@pytest.mark.parametrize(
    "value, reason",
    [
        ("N.A.", "missing product_code"),
        ("", "missing product_code"),
        ("12.5", "bad product_code: '12.5'"),
        ("A" * 101, "product_code longer than 100 characters"),
        ("AB\n12", "bad product_code: 'AB\\n12'"),
        (True, "bad product_code: 'True'"),
    ],
)
def test_unusable_product_codes_have_a_reason(value, reason):
    with pytest.raises(RowRejected, match=None) as info:
        parse_product_code(value)
    assert str(info.value) == reason


# ---------------------------------------------------------------- prices


@pytest.mark.parametrize(
    "cell, value",
    [
        (590, 590.0),
        ("590", 590.0),
        ("1290.0", 1290.0),
        ("1,290", 1290.0),
        ("$1,290.00", 1290.0),
        ("1.290,00 €", 1290.0),
        ("€ 2.390,50", 2390.5),
        (" 1 290,50 kr ", 1290.5),
        ("CHF 1'290.-", 1290.0),
        ("570,000", 570000.0),
        ("₩ 570.000", 570000.0),
        ("USD 590", 590.0),
        ("12,5", 12.5),
    ],
)
def test_formatted_prices(cell, value):
    assert read_price(cell).value == value


@pytest.mark.parametrize(
    "cell, reason",
    [
        ("-5", "negative full_price: -5"),
        ("$-12", "negative full_price: -12"),
        ("0", "zero full_price"),
        ("0,00 €", "zero full_price"),
        ("nan", "full_price not a number: 'nan'"),
        ("inf", "full_price not a number: 'inf'"),
        ("1e12", "absurd full_price: 1e+12 (over 1e+09)"),
        ("about 12", "full_price not a number: 'about 12'"),
        ("1.2.3", "full_price not a number: '1.2.3'"),
        ("1 2", "full_price not a number: '1 2'"),
        ("12 EURO", "full_price not a number: '12 EURO'"),
    ],
)
def test_unusable_prices_have_a_reason(cell, reason):
    with pytest.raises(PriceError) as info:
        read_price(cell)
    assert info.value.reason("full_price") == reason


def test_answer_parser_reads_prices_with_the_same_reader():
    from productvlm.prices import find_price

    for cell in ("$1,290.00", "1.290,00 €", "1 290,50 kr", "570,000"):
        assert find_price(f"Full Price: {cell}") == read_price(cell).value


# ---------------------------------------------------------------- image values


@pytest.mark.parametrize("value", ["N.A.", "n/a", "-", "none", "None", "null", "", "  ", "abcd", "#N/A"])
def test_placeholder_image_values_are_a_missing_url(value, tmp_path):
    with pytest.raises(RowRejected, match="^missing image url$"):
        parse_image_source(value, tmp_path)


def test_extensionless_url_is_judged_by_its_bytes(tmp_path, server):
    """Burberry's image URLs have no file extension: the bytes decide (a page there is refused)."""
    path = tmp_path / "cat.csv"
    rows = [
        [1, "Scarf", "SCARVES", 590, burberry_url(server, 0)],
        [2, "Cap", "CAPS", 290, server.url("/text/page")],
    ]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(
            [["product_code", "title", "category3_code", "full_price", "imageurl"], *rows]
        )
    result = import_dataset(str(path), tmp_path / "out", fetch=QUICK, progress=False)
    assert sum(result.counts.values()) == 1 and [f[0] for f in result.failures] == [2]
    assert [r["product_code"] for r in imported(tmp_path / "out")] == [1]


# ---------------------------------------------------------------- a Burberry-shaped hub repository

BURBERRY_SCHEMA = pa.schema(
    [
        ("website_name", pa.string()),
        ("competence_date", pa.string()),
        ("country_code", pa.string()),
        ("currency_code", pa.string()),
        ("brand", pa.string()),
        ("category1_code", pa.string()),
        ("category2_code", pa.string()),
        ("category3_code", pa.string()),
        ("product_code", pa.int64()),
        ("title", pa.string()),
        ("itemurl", pa.string()),
        ("imageurl", pa.string()),
        ("full_price", pa.string()),  # a sister list exported its prices as text, separators and all
        ("price", pa.float64()),
        ("full_price_eur", pa.float64()),
        ("price_eur", pa.float64()),
        ("flg_discount", pa.int64()),
    ]
)
CARD = """---
license: cc-by-nc-4.0
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
dataset_info:
  features:
{features}
  splits:
  - name: train
    num_examples: {n}
---
# Burberry product prices (a test copy shaped like the hub repository)
"""


def burberry_rows(server: ImageServer) -> tuple[list[dict], dict[int, str]]:
    """(rows, expected failure reason by 1-based row); the other rows import."""
    base = {
        "website_name": "BURBERRY",
        "competence_date": "2023-08-28",
        "country_code": "USA",
        "currency_code": "USD",
        "brand": "Burberry",
        "category1_code": "WOMEN",
        "category2_code": "ACCESSORIES",
        "itemurl": "https://us.burberry.com/p",
        "price": None,
        "full_price_eur": None,
        "price_eur": None,
        "flg_discount": 0,
    }
    spec = [
        # product_code, title, category3_code, full_price, image (int: a served UUID), expected failure
        (80012345, "Check Scarf", "SCARVES", "590", 0, None),
        (80012346, "Leather Wallet", "WALLETS & CARD CASES", "1,290", 1, None),
        (80012347, "カシミアスカーフ", "スカーフ", "570,000", 2, None),  # non-Latin, price with separator
        (80012348, "Card Case", "WALLETS & CARD CASES", "1290.0", 3, None),
        (80012349, "Mystery", "N.A.", "450", 4, "category dropped: N.A. (--drop-category)"),
        (80012350, "No Photo", "SCARVES", "390", "N.A.", "missing image url"),
        (80012351, "No Photo 2", "SCARVES", "390", "null", "missing image url"),
        (80012352, "No Photo 3", "SCARVES", "390", "-", "missing image url"),
        (80012353, "No Photo 4", "SCARVES", "390", None, "missing image url"),
        (80012345, "Check Scarf again", "SCARVES", "590", 5, "duplicate product_code"),
        (80012354, "Free", "SCARVES", "0", 6, "zero full_price"),
        (80012355, "Unpriced", "SCARVES", None, 7, "missing price"),
        (80012356, "Тренч", "ТРЕНЧИ", "2 390", 8, None),  # Cyrillic category, space as thousands separator
        (80012357, "Тренч 2", "ТРЕНЧИ", "2390", 9, None),
        (80012358, "Lone Belt", "BELTS", "450", 10, "rare category: BELTS (1 rows"),
        (80012359, "Gone", "SCARVES", "490", "gone", "http 404"),
        (80012360, "Big Coat", "SCARVES", "570000", 11, None),
        (80012361, "シルクスカーフ", "スカーフ", "98.000", 12, None),  # float() reads it as is: 98.0
    ]
    rows, expected = [], {}
    for number, (code, title, cat, full_price, image, reason) in enumerate(spec, 1):
        if isinstance(image, int):
            image = burberry_url(server, image)
        elif image == "gone":
            image = server.url("/is/image/Burberryltd/" + str(uuid.UUID(int=999)).upper())
        rows.append({**base, "product_code": code, "title": title, "category3_code": cat})
        rows[-1].update(full_price=full_price, imageurl=image)
        if reason:
            expected[number] = reason
    return rows, expected


def write_hub_repo(root: Path, rows: list[dict]) -> Path:
    (root / "data").mkdir(parents=True)
    table = pa.Table.from_pylist(rows, schema=BURBERRY_SCHEMA)
    pq.write_table(table, root / "data" / "train-00000-of-00001.parquet")
    features = "\n".join(f"  - name: {f.name}\n    dtype: {f.type}" for f in BURBERRY_SCHEMA)
    features = features.replace("dtype: double", "dtype: float64")
    (root / "README.md").write_text(CARD.format(features=features, n=len(rows)), encoding="utf-8")
    return root


def test_burberry_shaped_hub_repository_imports_every_row_or_says_why(tmp_path, server, monkeypatch):
    import datasets

    rows, expected = burberry_rows(server)
    repo = write_hub_repo(tmp_path / "Burberry.Product.prices.United.States", rows)
    calls = []
    real_load = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or real_load(*a, **k))

    out = tmp_path / "out"
    result = import_dataset(
        str(repo),
        out,
        fetch=QUICK,
        rules=RowRules(currency="USD"),
        categories=Categories(drop=("n.a.",), min_rows=2),
        progress=False,
    )
    assert calls == [((str(repo),), {"split": "train", "streaming": True})]  # the hub id's code path
    got = reasons(out)
    assert sorted(got) == sorted(expected)
    assert all(got[n].startswith(expected[n]) for n in expected), got
    kept = imported(out)
    assert len(kept) + len(got) == len(rows) == result.source_rows
    assert sorted(r["product_code"] for r in kept) == [
        80012345,
        80012346,
        80012347,
        80012348,
        80012356,
        80012357,
        80012360,
        80012361,
    ]
    assert all(type(r["product_code"]) is int for r in kept)  # int64 codes stay integers
    by_code = {r["product_code"]: r for r in kept}
    assert by_code[80012347]["full_price"] == 570000.0 and by_code[80012347]["category3_code"] == "スカーフ"
    assert by_code[80012356]["full_price"] == 2390.0 and by_code[80012361]["full_price"] == 98.0
    assert all(r["split"] == folder.split_of(r["product_code"]) for r in kept)
    info = json.loads((out / folder.DATASET_JSON).read_text())
    assert info["currency"] == "USD" and info["source_location"] == f"hub:{repo}/train"
    assert info["categories"] == {"dropped": ["n.a."], "min_rows": 2}
    assert info["rows_failed"] == len(expected) and sum(info["counts"].values()) == len(kept)


def test_hub_layout_folder_is_read_like_a_hub_id(tmp_path, server):
    rows, _ = burberry_rows(server)
    table = load_table(str(write_hub_repo(tmp_path / "repo", rows)), limit=5)
    assert table.columns == BURBERRY_SCHEMA.names and len(table.rows) == 5
    assert type(table.rows[0]["product_code"]) is int and table.rows[0]["full_price"] == "590"


def test_a_plain_folder_is_still_refused(tmp_path):
    (tmp_path / "cat").mkdir()
    with pytest.raises(UserError, match="is a folder"):
        load_table(str(tmp_path / "cat"))


# ---------------------------------------------------------------- a retailer CSV: SKUs, formatted prices


def test_csv_with_text_skus_and_formatted_prices(tmp_path, server):
    ok = [burberry_url(server, i) for i in range(12, 30)]
    spec = [
        ("AB-1290-BLK", "$1,290.00", "COATS", ok[0], None),
        ("ab-1291-blk", "1.290,00 €", "COATS", ok[1], None),
        ("SKU 77", "USD 590", "COATS", ok[2], None),
        ("8045723", "590", "COATS", ok[3], None),  # a numeric code among text ones: stored as text
        ("00123", "1 290,50", "COATS", ok[4], None),  # read as the integer 123, stored as "123"
        ("AB-1290-BLK ", "990", "COATS", ok[5], "duplicate product_code (first at row 1, code AB-1290-BLK)"),
        ("SKU-9", "NaN", "COATS", ok[6], "full_price not a number: 'NaN'"),
        ("SKU-10", "12 EUR", "COATS", ok[7], "full_price in EUR, not USD (--currency)"),
        ("N/A", "12", "COATS", ok[8], "missing product_code"),
        ("X" * 101, "12", "COATS", ok[9], "product_code longer than 100 characters"),
        ("SKU-11", "-4", "COATS", ok[10], "negative full_price: -4"),
        ("CAP-1", "90", "CAPS", ok[11], None),
        ("CAP-2", "90", "CAPS", server.url("/img/none.jpg"), "http 404"),  # CAPS then has 1 row...
        ("BAG-1", "2.390", "BAGS", ok[12], None),  # float() reads it: 2.39
        ("BAG-2", "2,390", "BAGS", ok[13], None),
    ]
    path = tmp_path / "skus.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["sku", "name", "category3_code", "list_price", "imageurl"])
        w.writerows([code, f"Item {i}", cat, price, url] for i, (code, price, cat, url, _) in enumerate(spec))
    out = tmp_path / "out"
    result = import_dataset(
        str(path),
        out,
        mapping={**_identity(), "product_code": "sku", "title": "name", "full_price": "list_price"},
        fetch=QUICK,
        rules=RowRules(currency="USD"),
        categories=Categories(min_rows=2),
        progress=False,
    )
    expected = {n: reason for n, (*_, reason) in enumerate(spec, 1) if reason}
    expected[12] = "rare category: CAPS (1 rows with an image, --min-per-category 2)"  # ...so CAP-1 goes too
    got = reasons(out)
    assert sorted(got) == sorted(expected) and all(got[n].startswith(expected[n]) for n in expected), got
    kept = {r["product_code"]: r for r in imported(out)}
    assert len(kept) + len(got) == len(spec) == result.source_rows
    assert {c: r["full_price"] for c, r in kept.items()} == {
        "AB-1290-BLK": 1290.0,
        "ab-1291-blk": 1290.0,
        "SKU 77": 590.0,
        "8045723": 590.0,
        "123": 1290.5,
        "BAG-1": 2.39,
        "BAG-2": 2390.0,
    }
    assert all(r["split"] == folder.split_of(c) for c, r in kept.items())
    assert folder.split_of("8045723") == folder.split_of(8045723)  # the same split as in a numeric list
    info = json.loads((out / folder.DATASET_JSON).read_text())
    assert info["currency"] == "USD" and info["failure_reasons"]["rare category"] == 1


def _identity() -> dict[str, str]:
    return {c: c for c in folder.CATALOG_COLUMNS}


def test_drop_and_min_per_category_via_cli(tmp_path, server, monkeypatch, capsys):
    import sys

    from productvlm.cli import main

    path = tmp_path / "cat.csv"
    cats = ["TOTE", "TOTE", "TOTE", "N.A.", "n.a.", "BELTS"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["product_code", "title", "category3_code", "full_price", "imageurl"])
        w.writerows([i, f"Item {i}", c, "1,000", burberry_url(server, i)] for i, c in enumerate(cats))
    out = tmp_path / "out"
    argv = ["productvlm", "data", "import", str(path), "--out", str(out), "-q", "--currency", "usd"]
    argv += ["--drop-category", "N.A.", "--min-per-category", "2", "--retries", "0"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code in (0, None), capsys.readouterr().err
    assert reasons(out) == {
        4: "category dropped: N.A. (--drop-category)",
        5: "category dropped: n.a. (--drop-category)",
        6: "rare category: BELTS (1 rows, --min-per-category 2)",
    }
    assert sorted(r["product_code"] for r in imported(out)) == [0, 1, 2]
    assert json.loads((out / folder.DATASET_JSON).read_text())["currency"] == "USD"
    assert "category dropped" in capsys.readouterr().out  # the summary table counts the reasons
