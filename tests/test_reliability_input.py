"""Bad input tables for `data import`: a table that cannot be used stops with exit code 2 and a message
naming the file, line or column; a bad row is left out with its reason in failures.csv and the run goes on."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from productvlm.data import folder
from productvlm.data.importer import import_dataset
from productvlm.errors import UserError

HEADER = ["product_code", "title", "category3_code", "full_price", "imageurl"]


@pytest.fixture
def table_dir(tmp_path: Path) -> Path:
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), (120, 30, 30)).save(buf, "JPEG")
    (tmp_path / "ok.jpg").write_bytes(buf.getvalue())
    return tmp_path


def good(code: int, **changes) -> dict:
    return {
        "product_code": code,
        "title": "Check Scarf",
        "category3_code": "SCARVES",
        "full_price": 390,
        "imageurl": "ok.jpg",
        **changes,
    }


def write_csv(path: Path, rows: list[dict], header: list[str] = HEADER) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows([r.get(c, "") for c in header] for r in rows)
    return path


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """`productvlm ARGS` in this process, as the console entry point runs it: (exit code, stderr)."""
    from productvlm.cli import main

    monkeypatch.setattr(sys, "argv", ["productvlm", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


def reasons(out: Path) -> dict[int, str]:
    with open(out / folder.FAILURES_CSV) as f:
        return {int(r["row"]): r["reason"] for r in csv.DictReader(f)}


def imported(out: Path) -> list[int]:
    return sorted(r["product_code"] for s in folder.SPLITS for r in folder.read_split(out, s))


# ---------------------------------------------------------------- tables that cannot be used: exit 2


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "json", "parquet"])
def test_missing_required_column_names_it(table_dir, fmt):
    rows = [{k: v for k, v in good(1).items() if k != "category3_code"}]
    path = table_dir / f"cat.{fmt}"
    if fmt in ("csv", "tsv"):
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if fmt == "tsv" else ",")
            w.writeheader()
            w.writerows(rows)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(UserError, match=r"cat\.\w+: required column 'category3_code' is missing.*--map"):
        import_dataset(str(path), table_dir / "out", progress=False)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"\xef\xbb\xbf", "has no header row"),  # a UTF-8 BOM and nothing else
        (b" \n\n", "has no data rows"),
        (",".join(HEADER).encode() + b"\n", "has no data rows"),
    ],
)
def test_empty_tables_exit_2_naming_the_file(table_dir, content, message, monkeypatch, capsys):
    (table_dir / "cat.csv").write_bytes(content)
    code, err = run_cli(
        ["data", "import", str(table_dir / "cat.csv"), "--out", str(table_dir / "o")], monkeypatch, capsys
    )
    assert code == 2
    assert "cat.csv" in err and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_bad_encoding_names_the_line(table_dir, monkeypatch, capsys):
    text = write_csv(table_dir / "x.csv", [good(1), good(2), good(3, title="Café")]).read_text()
    (table_dir / "cat.csv").write_bytes(text.encode("latin-1"))  # "é" is 0xe9, line 4 (header is 1)
    code, err = run_cli(
        ["data", "import", str(table_dir / "cat.csv"), "--out", str(table_dir / "o")], monkeypatch, capsys
    )
    assert code == 2
    assert "cat.csv line 4: not UTF-8 text (byte 0xe9)" in err and "save the file as UTF-8" in err

    lines = [json.dumps(good(i), ensure_ascii=False) for i in range(1, 4)]
    lines[2] = lines[2].replace("Check", "Caf\u00e9")
    (table_dir / "cat.jsonl").write_bytes("\n".join(lines).encode("latin-1"))
    with pytest.raises(UserError, match=r"cat\.jsonl line 3: not UTF-8 text \(byte 0xe9\)"):
        import_dataset(str(table_dir / "cat.jsonl"), table_dir / "o", progress=False)
    (table_dir / "cat.json").write_bytes(f"[\n{lines[0]},\n{lines[2]}\n]".encode("latin-1"))
    with pytest.raises(UserError, match=r"cat\.json line 3: not UTF-8 text"):
        import_dataset(str(table_dir / "cat.json"), table_dir / "o", progress=False)


def test_utf16_csv_with_bom_is_read(table_dir):
    """Excel's "Unicode text" export: UTF-16 with a byte-order mark."""
    text = write_csv(table_dir / "x.csv", [good(1, title="Café Scarf")]).read_text()
    (table_dir / "cat.csv").write_bytes(text.encode("utf-16"))
    out = table_dir / "out"
    import_dataset(str(table_dir / "cat.csv"), out, progress=False)
    assert [r["title"] for s in folder.SPLITS for r in folder.read_split(out, s)] == ["Café Scarf"]


def test_duplicate_header_column_is_refused(table_dir):
    header = ["product_code", "title", "category3_code", "full_price", "title", "imageurl"]
    with open(table_dir / "cat.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, [1, "Scarf", "SCARVES", 390, "Old name", "ok.jpg"]])
    with pytest.raises(UserError, match=r"column 'title' \(for title\) appears 2 times in the header"):
        import_dataset(str(table_dir / "cat.csv"), table_dir / "out", progress=False)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"product_code": 1}\n{"product_code": 2,\n', r"line 2: not valid JSON"),
        ('{"product_code": 1}\n[1, 2]\n', r"line 2: expected a JSON object per line"),
        ('{"product_code": 1}\n{"product_code": ' + "9" * 5000 + "}\n", r"line 2: not valid JSON"),
    ],
)
def test_bad_jsonl_names_the_line(table_dir, content, message):
    (table_dir / "cat.jsonl").write_text(content)
    with pytest.raises(UserError, match=r"cat\.jsonl " + message):
        import_dataset(str(table_dir / "cat.jsonl"), table_dir / "out", progress=False)


def test_corrupt_parquet_is_a_user_error(table_dir):
    (table_dir / "cat.parquet").write_bytes(b"PAR1" + b"\0" * 64)
    with pytest.raises(UserError, match=r"cat\.parquet: cannot read as Parquet"):
        import_dataset(str(table_dir / "cat.parquet"), table_dir / "out", progress=False)


def test_no_usable_row_exits_2_and_keeps_failures_csv(table_dir, monkeypatch, capsys):
    write_csv(table_dir / "cat.csv", [good(1, full_price="n/a"), good(2, full_price="-3")])
    out = table_dir / "out"
    code, err = run_cli(
        ["data", "import", str(table_dir / "cat.csv"), "--out", str(out)], monkeypatch, capsys
    )
    assert code == 2
    assert "none of its 2 rows could be imported" in err and "first at row 1" in err
    assert reasons(out) == {1: "full_price not a number: 'n/a'", 2: "negative full_price: -3"}


# ---------------------------------------------------------------- bad rows: left out with a reason


def test_bad_rows_are_left_out_with_reasons(table_dir):
    header = [*HEADER, "price"]
    rows = [
        good(1),  # 1 imported
        good(2, full_price="abc"),
        good(3, full_price="-5"),
        good(4, full_price="nan"),
        good(5, full_price="1e400"),  # overflows to infinity
        good(6, full_price="0"),
        good(7, full_price=""),
        good(8, price="-1"),  # the optional price column is checked too
        good(1, title="Same code again"),  # duplicate of row 1
        good(10, product_code=" 1.0 "),  # the same code written differently
        good(11, product_code="N.A."),  # a placeholder (text codes are welcome: test_catalog_formats.py)
        good(12, product_code="9" * 5000),  # more digits than int() accepts
        good(13, product_code=str(2**63)),  # beyond int64 (Arrow's type for it)
        good(14, title="  "),
        good(15, category3_code=""),
        good(16, imageurl=""),
        good(17, price="12.5"),  # 17 imported
        good(18, full_price="2e9"),
        good(19, product_code="12.5"),  # reads as a number, and not an integer
    ]
    write_csv(table_dir / "cat.csv", rows, header)
    result = import_dataset(str(table_dir / "cat.csv"), table_dir / "out", progress=False)
    assert reasons(table_dir / "out") == {
        2: "full_price not a number: 'abc'",
        3: "negative full_price: -5",
        4: "full_price not a number: 'nan'",
        5: "full_price not a number: '1e400'",
        6: "zero full_price",
        7: "missing price",
        8: "negative price: -1",
        9: "duplicate product_code (first at row 1, code 1)",
        10: "duplicate product_code (first at row 1, code 1)",
        11: "missing product_code",
        12: "product_code out of range (not a 64-bit integer)",
        13: "product_code out of range (not a 64-bit integer)",
        14: "missing title",
        15: "missing category3_code",
        16: "missing image url",
        18: "absurd full_price: 2e+09 (over 1e+09)",
        19: "bad product_code: '12.5'",
    }
    assert imported(table_dir / "out") == [1, 17]
    assert result.source_rows == len(rows) == 2 + len(result.failures)


def test_ragged_csv_rows(table_dir):
    """Short rows miss their last columns (a reason), long rows' extra cells are ignored."""
    lines = [
        ",".join(HEADER),
        "1,Scarf,SCARVES,390,ok.jpg",
        "2,Scarf,SCARVES",
        "3,Scarf,SCARVES,390,ok.jpg,x,y",
    ]
    (table_dir / "cat.csv").write_text("\n".join(lines) + "\n")
    import_dataset(str(table_dir / "cat.csv"), table_dir / "out", progress=False)
    assert reasons(table_dir / "out") == {2: "missing price"}
    assert imported(table_dir / "out") == [1, 3]
