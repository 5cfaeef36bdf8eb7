"""`data import` against a real HTTP server on 127.0.0.1 (no mocks, no network)."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from faultserver import ImageServer
from productvlm.data import folder
from productvlm.data.fetch import FetchOptions, backoff_delay, parse_retry_after
from productvlm.data.images import BadImage, ImageLimits, to_dataset_jpeg
from productvlm.data.importer import import_dataset
from productvlm.data.rows import parse_mapping
from productvlm.data.synth import synthesize
from productvlm.errors import UserError

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("synth") / "ds"
    synthesize(d, rows=40, seed=11, workers=1, progress=False)
    return d


def _source_rows(source_dir: Path) -> list[dict]:
    return [r for s in folder.SPLITS for r in folder.read_split(source_dir, s)]


@pytest.fixture(scope="module")
def server(source_dir: Path):
    images = {
        Path(r["image_path"]).name: Path(r["image_path"]).read_bytes() for r in _source_rows(source_dir)
    }
    with ImageServer(images) as srv:
        yield srv


def write_csv(path: Path, rows: list[dict], rename: dict[str, str] | None = None) -> Path:
    rename = rename or {}
    columns = [rename.get(c, c) for c in folder.CATALOG_COLUMNS]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({rename.get(k, k): v for k, v in r.items()})
    return path


def catalog(source_dir: Path, server: ImageServer, mode: str = "img") -> list[dict]:
    """The source dataset's rows with imageurl pointing at the server."""
    rows = []
    for r in _source_rows(source_dir):
        row = {c: r[c] for c in folder.CATALOG_COLUMNS}
        row["imageurl"] = server.url(f"/{mode}/{Path(r['image_path']).name}")
        rows.append(row)
    return rows


def quick(**kw) -> FetchOptions:
    return FetchOptions(
        **{"concurrency": 8, "per_host": 8, "timeout": 5.0, "retries": 2, "backoff": 0.05, **kw}
    )


def read_failures(out: Path) -> dict[int, tuple[str, str]]:
    with open(out / folder.FAILURES_CSV) as f:
        return {int(r["row"]): (r["url"], r["reason"]) for r in csv.DictReader(f)}


def test_import_reproduces_the_dataset_with_mapped_columns(tmp_path, source_dir, server):
    rows = catalog(source_dir, server)
    src = write_csv(tmp_path / "cat.csv", rows, rename={"title": "product_name", "imageurl": "image_link"})
    out = tmp_path / "out"
    mapping = parse_mapping(["title=product_name"], image_column="image_link")
    result = import_dataset(str(src), out, mapping=mapping, fetch=quick(), progress=False)

    assert result.failures == []
    assert result.images_fetched == len(rows)
    original = {r["product_code"]: r for r in _source_rows(source_dir)}
    for split in folder.SPLITS:
        imported = folder.read_split(out, split)
        assert len(imported) == result.counts[split] == sum(folder.split_of(c) == split for c in original)
        for r in imported:
            o = original[r["product_code"]]
            for col in (
                "title",
                "category3_code",
                "full_price",
                "price",
                "price_eur",
                "flg_discount",
                "category1_code",
            ):
                assert r[col] == o[col], col
            with Image.open(r["image_path"]) as a, Image.open(o["image_path"]) as b:
                assert a.mode == "RGB" and a.size == b.size
                diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean()
            assert diff < 2.0
    info = json.loads((out / "dataset.json").read_text())
    assert info["column_mapping"]["title"] == "product_name"
    assert info["counts"] == result.counts and info["split"]["seed"] == 0
    assert read_failures(out) == {}


def test_imagefolder_reads_imported_folder(tmp_path, source_dir, server):
    import datasets

    out = tmp_path / "out"
    import_dataset(
        str(write_csv(tmp_path / "c.csv", catalog(source_dir, server))), out, fetch=quick(), progress=False
    )
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), cache_dir=str(tmp_path / "hf"))
    counts = json.loads((out / "dataset.json").read_text())["counts"]
    assert {s: ds[s].num_rows for s in ds} == {s: n for s, n in counts.items() if n}
    row = ds["train"][0]
    assert row["image"].mode == "RGB" and isinstance(row["full_price"], float) and row["title"]


def test_identical_urls_are_fetched_once(tmp_path, source_dir, server):
    rows = catalog(source_dir, server)[:6]
    shared = rows[0]["imageurl"]
    path = "/img/" + Path(shared).name
    for i, r in enumerate(rows):
        r["imageurl"] = shared
        r["product_code"] = 90_000_000 + i
    before = server.counts[path]
    out = tmp_path / "out"
    result = import_dataset(str(write_csv(tmp_path / "c.csv", rows)), out, fetch=quick(), progress=False)
    assert server.counts[path] - before == 1
    assert sum(result.counts.values()) == 6 and result.images_fetched == 1
    for split in folder.SPLITS:
        for r in folder.read_split(out, split):
            assert Path(r["image_path"]).is_file()


def test_failures_are_reported_with_reasons(tmp_path, source_dir, server):
    base = catalog(source_dir, server)
    name = lambda i: Path(base[i]["imageurl"]).name  # noqa: E731
    local = tmp_path / "local.jpg"
    local.write_bytes(Path(folder.read_split(source_dir, "train")[0]["image_path"]).read_bytes())
    cases = [  # (changes to the row, expected reason or None for success)
        ({"imageurl": server.url("/img/nope.jpg")}, "http 404"),
        ({"imageurl": server.url(f"/stall/{name(1)}")}, "timeout"),
        ({"imageurl": server.url(f"/text/{name(2)}")}, "not a supported image"),
        ({"imageurl": server.url(f"/trunc/{name(3)}")}, "truncated image"),
        ({"imageurl": server.url(f"/flaky/{name(4)}")}, None),
        ({"imageurl": server.url(f"/busy/{name(5)}")}, None),
        ({"imageurl": "ftp://example.com/a.jpg"}, "bad url scheme: ftp"),
        ({"imageurl": "file:///etc/passwd"}, "bad url scheme: file"),
        ({"imageurl": "http://"}, "malformed url"),
        ({"full_price": ""}, "missing price"),
        ({"full_price": "abc"}, "full_price not a number: 'abc'"),
        ({"full_price": "-5"}, "negative full_price: -5"),
        ({"product_code": base[0]["product_code"]}, "duplicate product_code (first at row 1"),
        ({"imageurl": str(local)}, None),
        ({"imageurl": "missing/photo.jpg"}, "file not found"),
    ]
    rows = [base[0]]
    for i, (change, _) in enumerate(cases, 1):
        rows.append({**base[i], **change})
    out = tmp_path / "out"
    result = import_dataset(
        str(write_csv(tmp_path / "c.csv", rows)), out, fetch=quick(timeout=0.5, retries=1), progress=False
    )
    failures = read_failures(out)
    for i, (_, reason) in enumerate(cases, 2):
        if reason is None:
            assert i not in failures, failures.get(i)
        else:
            assert failures[i][1].startswith(reason), (i, failures[i])
            assert failures[i][0] == rows[i - 1]["imageurl"]
    assert sum(result.counts.values()) == len(rows) - len(failures) == 4
    assert server.counts["/img/nope.jpg"] == 1  # 4xx: no retry
    assert server.counts[f"/stall/{name(1)}"] == 2  # a timeout is retried (retries=1)
    assert server.counts[f"/flaky/{name(4)}"] == 2  # 500 then 200
    t = server.times[f"/busy/{name(5)}"]
    assert len(t) == 2 and t[1] - t[0] >= 0.95  # Retry-After: 1 honoured although backoff is 0.05 s
    assert result.reasons()["http 404"] == 1

    import datasets  # the folder stays readable with a non-empty failures.csv beside the splits

    ds = datasets.load_dataset("imagefolder", data_dir=str(out), cache_dir=str(tmp_path / "hf"))
    assert sum(ds[s].num_rows for s in ds) == 4


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height but carries almost no data (a decompression-bomb stand-in)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_image_validation_guards():
    t0 = time.perf_counter()
    with pytest.raises(BadImage, match="too many pixels"):
        to_dataset_jpeg(_png_header_only(30_000, 30_000))
    assert time.perf_counter() - t0 < 1.0  # refused from the header, nothing decoded
    with pytest.raises(BadImage, match="image too small"):
        to_dataset_jpeg(_png_header_only(4, 4))
    buf = io.BytesIO()
    Image.new("RGBA", (40, 30), (255, 0, 0, 0)).save(buf, "PNG")
    out = Image.open(io.BytesIO(to_dataset_jpeg(buf.getvalue(), ImageLimits(min_side=8))))
    assert (out.format, out.mode, out.size) == ("JPEG", "RGB", (40, 30))
    assert out.getpixel((5, 5))[0] > 240 and out.getpixel((5, 5))[1] > 240  # transparent -> white
    buf = io.BytesIO()
    Image.new("L", (40, 30), 90).save(buf, "JPEG")
    assert Image.open(io.BytesIO(to_dataset_jpeg(buf.getvalue()))).mode == "RGB"


def test_retry_after_and_backoff():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == pytest.approx(10.0)
    assert parse_retry_after("soon") is None
    opts = FetchOptions(backoff=0.5, max_wait=4.0)
    rng = random.Random(0)
    delays = [backoff_delay(a, opts, None, rng) for a in range(6)]
    for a, d in enumerate(delays):
        step = min(4.0, 0.5 * 2**a)
        assert step / 2 <= d <= step
    assert backoff_delay(0, opts, 3.0, rng) == 3.0
    assert backoff_delay(0, opts, 100.0, rng) == 4.0


def test_missing_required_column_is_a_user_error(tmp_path, source_dir, server):
    rows = catalog(source_dir, server)[:3]
    src = write_csv(tmp_path / "c.csv", rows, rename={"full_price": "list_price"})
    with pytest.raises(UserError, match="'full_price'"):
        import_dataset(str(src), tmp_path / "o", progress=False)
    with pytest.raises(UserError, match="'price_usd'"):
        import_dataset(
            str(src), tmp_path / "o", mapping=parse_mapping(["full_price=price_usd"]), progress=False
        )
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(UserError, match="empty"):
        import_dataset(str(tmp_path / "empty.csv"), tmp_path / "o", progress=False)
    (tmp_path / "header.csv").write_text("title,product_code\n")
    with pytest.raises(UserError, match="no data rows"):
        import_dataset(str(tmp_path / "header.csv"), tmp_path / "o", progress=False)


def _cli_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(SRC)) if p)
    return env


def test_cli_missing_column_exits_2_naming_it(tmp_path, source_dir, server):
    src = write_csv(tmp_path / "c.csv", catalog(source_dir, server)[:3], rename={"category3_code": "cat"})
    proc = subprocess.run(
        [sys.executable, "-m", "productvlm", "data", "import", str(src), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=_cli_env(),
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "'category3_code'" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_killed_import_resumes(tmp_path, source_dir, server):
    rows = catalog(source_dir, server, mode="slow")
    src = write_csv(tmp_path / "c.csv", rows)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "productvlm", "data", "import", str(src), "--out", str(out), "-q"]
    proc = subprocess.Popen(
        [*cmd, "--concurrency", "2"], env=_cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 90
    while len(list(out.glob("*/images/*.jpg"))) < 8:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "import made no progress"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    done = {p.name for p in out.glob("*/images/*.jpg")}
    assert 8 <= len(done) < len(rows)  # killed mid-way
    assert not list(out.glob("*/metadata.jsonl"))
    (out / "train" / "images" / ".partial-x.jpg.1.tmp").write_bytes(b"half a jpeg")  # as a kill can leave
    first_run = Counter(server.counts)

    result = import_dataset(str(src), out, fetch=quick(), progress=False)
    assert result.failures == [] and sum(result.counts.values()) == len(rows)
    assert result.images_reused == len(done) and result.images_fetched == len(rows) - len(done)
    assert not list(out.glob("*/images/.partial-*"))
    path_of = {
        folder.image_key(r["imageurl"]) + ".jpg": r["imageurl"].split(str(server.port))[1] for r in rows
    }
    for name in done:  # complete before the kill: never fetched again
        assert server.counts[path_of[name]] == first_run[path_of[name]] == 1
    assert sum(server.counts.values()) - sum(first_run.values()) == len(rows) - len(done)
    for split in folder.SPLITS:
        for r in folder.read_split(out, split):
            with Image.open(r["image_path"]) as im:
                im.load()

    again = import_dataset(str(src), out, fetch=quick(), progress=False)
    assert again.requests == 0 and again.images_reused == len(rows)


def test_local_paths_from_parquet_and_jsonl_via_cli(tmp_path, source_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from productvlm.cli import app

    rows = []
    for r in _source_rows(source_dir):
        row = {c: r[c] for c in folder.CATALOG_COLUMNS}
        row["photo"] = os.path.relpath(r["image_path"], tmp_path)  # relative to the table's folder
        rows.append(row)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "cat.parquet")
    (tmp_path / "cat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("cat.parquet", "cat.jsonl"):
        out = tmp_path / f"out-{name}"
        args = ["data", "import", str(tmp_path / name), "--out", str(out), "--image-column", "photo"]
        res = CliRunner().invoke(app, [*args, "--split-stratify", "--split", "50,25,25", "-q"])
        assert res.exit_code == 0, res.output
        assert "images fetched now" in res.output
        info = json.loads((out / "dataset.json").read_text())
        assert info["split"]["stratify"] == "category3_code" and info["split"]["fractions"] == [
            0.5,
            0.25,
            0.25,
        ]
        assert sum(info["counts"].values()) == len(rows) and info["rows_failed"] == 0
        got = {r["product_code"]: r for s in folder.SPLITS for r in folder.read_split(out, s)}
        for r in rows:
            src = (tmp_path / r["photo"]).read_bytes()
            assert Path(got[r["product_code"]]["image_path"]).read_bytes() == src  # RGB JPEG kept as is
        codes, cats = [r["product_code"] for r in rows], [r["category3_code"] for r in rows]
        expected = Counter(folder.assign_splits(codes, 0, (0.5, 0.25, 0.25), strata=cats))
        assert info["counts"] == {s: expected[s] for s in folder.SPLITS}


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") != "1", reason="only run where the hub is switched off")
def test_hub_source_offline_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="DBQ/Burberry.Product.prices.United.States"):
        import_dataset("DBQ/Burberry.Product.prices.United.States", tmp_path / "o", limit=5, progress=False)
    with pytest.raises(UserError, match="not found"):
        import_dataset(str(tmp_path / "missing.csv"), tmp_path / "o", progress=False)
