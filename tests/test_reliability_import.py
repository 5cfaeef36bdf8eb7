"""`data import` under faults: every row ends imported or in failures.csv, and a killed import resumes
without ever showing a partial file. The server is a real one on 127.0.0.1 (tests/faultserver.py)."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from faultserver import ImageServer
from productvlm.data import folder
from productvlm.data.fetch import FetchOptions
from productvlm.data.images import BadImage, to_dataset_jpeg
from productvlm.data.importer import LOCK_FILE, import_dataset
from productvlm.errors import UserError

SRC = Path(__file__).resolve().parents[1] / "src"
N_PHOTOS = 40


def photo(i: int, size: tuple[int, int] = (64, 48), noise: bool = False) -> bytes:
    """A small distinct JPEG (noise makes it big, so that writing it takes a while)."""
    rng = np.random.default_rng(i)
    if noise:
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    else:
        pixels = np.full((size[1], size[0], 3), rng.integers(0, 256, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def png_60_megapixels() -> bytes:
    """A valid 10000 x 6000 grey PNG of 60 kB: below Pillow's own bomb limit (89 MP), above ours (40 MP)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    width, height = 10_000, 6_000
    z = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + one byte per pixel
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def server():
    images = {f"p{i}.jpg": photo(i) for i in range(N_PHOTOS)}
    images["bomb.png"] = png_60_megapixels()
    with ImageServer(images) as srv:
        yield srv


def row(i: int, imageurl: str, **changes) -> dict:
    return {
        "product_code": 5000 + i,
        "title": f"Item {i}",
        "category3_code": "TOTE",
        "full_price": 100 + i,
        "imageurl": imageurl,
        **changes,
    }


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def read_failures(out: Path) -> dict[int, tuple[str, str]]:
    with open(out / folder.FAILURES_CSV) as f:
        return {int(r["row"]): (r["url"], r["reason"]) for r in csv.DictReader(f)}


def imported_codes(out: Path) -> list[int]:
    return [r["product_code"] for s in folder.SPLITS for r in folder.read_split(out, s)]


def test_every_fault_ends_imported_or_in_failures_csv(tmp_path, server):
    """The issue's list of faults in one catalog: the run succeeds (exit 0) and every row is accounted for."""
    u = server.url
    shared = u("/slow/p20.jpg")
    cases = [  # (image URL, expected failure reason, or None: imported)
        (u("/img/nope.jpg"), "http 404"),
        (u("/flaky/p1.jpg"), None),  # 500, then 200 on the retry
        (u("/busy/p2.jpg"), None),  # 429 + Retry-After, then 200
        (u("/down/p3.jpg"), "http 503"),  # 5xx on every attempt
        (u("/stall/p4.jpg"), "timeout"),  # no headers in time
        (u("/stallbody/p5.jpg"), "timeout"),  # headers, half the body, then silence
        (u("/reset/p6.jpg"), "connection error"),
        (u("/resetbody/p7.jpg"), "connection error"),  # reset half-way through the body
        (u("/resetonce/p8.jpg"), None),  # a reset, then 200 on the retry
        (u("/trunc/p9.jpg"), "truncated image"),
        (u("/text/p10.jpg"), "not a supported image"),  # an HTML page where the image should be
        (u("/empty/p11.jpg"), "empty file"),
        (u("/img/bomb.png"), "too many pixels (10000x6000)"),
        (u("/loop/p12.jpg"), "too many redirects"),
        (u("/moved/p13.jpg"), None),  # one redirect is followed
        (u("/tofile/p14.jpg"), "redirect to a non-http url"),
        (u("/wrongtype/p15.jpg"), None),  # a good image labelled text/plain is accepted
        (u("/chunked/p16.jpg"), None),  # no Content-Length
        ("file:///etc/passwd", "bad url scheme: file"),
        ("ftp://example.com/a.jpg", "bad url scheme: ftp"),
        ("javascript:alert(1)", "bad url scheme: javascript"),
        ("http://", "malformed url"),
        ("http://exa mple.com/a.jpg", "malformed url"),
        ("https://example.com:99999/a.jpg", "malformed url"),
        (shared, None),  # the same URL three times: fetched once, three rows imported
        (shared, None),
        (shared, None),
    ]
    rows = [row(i, url) for i, (url, _) in enumerate(cases)]
    src = write_csv(tmp_path / "catalog.csv", rows)
    out = tmp_path / "out"
    args = ["data", "import", str(src), "--out", str(out), "-q", "--timeout", "1", "--retries", "1"]
    from productvlm.cli import app

    res = CliRunner().invoke(app, [*args, "--backoff", "0.05"])

    assert res.exit_code == 0, res.output
    failures = read_failures(out)
    expected_failed = {n: reason for n, (_, reason) in enumerate(cases, 1) if reason is not None}
    assert set(failures) == set(expected_failed)
    for n, reason in expected_failed.items():
        url, got = failures[n]
        assert got.startswith(reason), (n, got)
        assert url == rows[n - 1]["imageurl"]
    imported = imported_codes(out)
    expected_codes = [r["product_code"] for n, r in enumerate(rows, 1) if n not in expected_failed]
    assert sorted(imported) == sorted(expected_codes)  # imported + failed = every row, each once
    info = json.loads((out / folder.DATASET_JSON).read_text())
    assert info["rows"] == len(rows) and info["rows_failed"] == len(expected_failed)
    assert "rows left out" in res.output

    assert server.counts["/slow/p20.jpg"] == 1  # duplicate URLs: one request
    assert server.counts["/down/p3.jpg"] == 2 and server.counts["/flaky/p1.jpg"] == 2  # retried once
    assert server.counts["/img/nope.jpg"] == 1  # a 404 is final
    assert 1 < server.counts["/loop/p12.jpg"] <= 6  # followed up to the limit, then not retried
    for p in out.glob("*/images/*"):  # what is there is complete, and no temporary file is left
        assert p.suffix == ".jpg", p
        with Image.open(p) as im:
            im.load()
            assert (im.format, im.mode) == ("JPEG", "RGB")


def test_bomb_guard_reads_the_header_only():
    bomb = png_60_megapixels()
    with Image.open(io.BytesIO(bomb)) as im:
        assert im.size == (10_000, 6_000)
        im.verify()  # a valid PNG (chunk CRCs), so the guard, not a decoding error, is what refuses it
    t0 = time.perf_counter()
    with pytest.raises(BadImage, match=r"too many pixels \(10000x6000\)"):
        to_dataset_jpeg(bomb)
    assert time.perf_counter() - t0 < 0.5  # decoding 60 MP would take seconds and 60 MB or more


def test_unreadable_local_path_fails_its_row_only(tmp_path):
    """An OS error on one local image (here: a name too long for the file system) is that row's failure."""
    (tmp_path / "ok.jpg").write_bytes(photo(1))
    rows = [row(0, "ok.jpg"), row(1, "x" * 300 + ".jpg"), row(2, "missing.jpg")]
    out = tmp_path / "out"
    result = import_dataset(str(write_csv(tmp_path / "c.csv", rows)), out, progress=False)
    failures = read_failures(out)
    assert failures[2][1].startswith("cannot read file (File name too long)")
    assert failures[3][1] == "file not found"
    assert sum(result.counts.values()) == 1 and imported_codes(out) == [5000]


def test_nothing_importable_is_a_user_error_with_failures_csv(tmp_path, server):
    rows = [row(i, server.url(f"/img/gone{i}.jpg")) for i in range(3)]
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"none of its 3 rows .* 3 failed with 'http 404' \(first at row 1"):
        import_dataset(str(write_csv(tmp_path / "c.csv", rows)), out, fetch=FetchOptions(), progress=False)
    assert set(read_failures(out)) == {1, 2, 3}  # written before giving up, for the user to read


def test_one_import_per_folder(tmp_path):
    (tmp_path / "ok.jpg").write_bytes(photo(1))
    src = write_csv(tmp_path / "c.csv", [row(0, "ok.jpg")])
    out = tmp_path / "out"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_FILE).write_text(str(sleeper.pid))  # a live import holds the folder
        with pytest.raises(UserError, match=f"another import \\(pid {sleeper.pid}\\)"):
            import_dataset(str(src), out, progress=False)
    finally:
        sleeper.kill()
        sleeper.wait()
    result = import_dataset(str(src), out, progress=False)  # its lock is now stale: taken over
    assert result.counts["train"] + result.counts["validation"] + result.counts["test"] == 1
    assert not (out / LOCK_FILE).exists()


def test_atomic_write_keeps_old_file_or_nothing(tmp_path, monkeypatch):
    """A write that dies before its rename leaves the previous file (or none) and no temporary file."""
    target = tmp_path / "images" / "a.jpg"
    target.parent.mkdir()

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        folder.atomic_write_bytes(target, photo(1))
    assert list(target.parent.iterdir()) == []
    monkeypatch.undo()
    folder.atomic_write_bytes(target, photo(1))
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        folder.atomic_write_bytes(target, photo(2))
    assert list(target.parent.iterdir()) == [target] and target.read_bytes() == photo(1)


# ---------------------------------------------------------------- kill -9 while a watcher looks


class FolderWatcher(threading.Thread):
    """Lists the dataset folder over and over and checks every file a reader could pick up."""

    def __init__(self, out: Path):
        super().__init__(daemon=True)
        self.out = out
        self.stop = threading.Event()
        self.bad: list[str] = []
        self.images_checked = 0
        self.temp_files_seen = 0
        self.listings = 0
        self._checked: set[tuple[int, int]] = set()  # (inode, size): a renamed-in file never changes

    def run(self) -> None:
        while not self.stop.is_set():
            for p in self.out.glob("*/images/*"):
                if p.name.startswith(".partial-") and p.name.endswith(folder.TMP_SUFFIX):
                    self.temp_files_seen += 1  # hidden name, no image suffix: no reader takes it
                    continue
                self._check_image(p)
            for p in self.out.glob("*/metadata.jsonl"):
                self._check_metadata(p)
            self.listings += 1
            time.sleep(0.002)

    def _check_image(self, p: Path) -> None:
        try:
            with open(p, "rb") as f:
                st = os.fstat(f.fileno())
                if (st.st_ino, st.st_size) in self._checked:
                    return
                data = f.read()
        except FileNotFoundError:
            return
        self._checked.add((st.st_ino, st.st_size))
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                ok = p.suffix == ".jpg" and (im.format, im.mode) == ("JPEG", "RGB")
        except Exception as e:  # anything a reader would choke on
            ok, p = False, Path(f"{p} ({type(e).__name__}: {e})")
        self.images_checked += 1
        if not ok:
            self.bad.append(str(p))

    def _check_metadata(self, p: Path) -> None:
        try:
            lines = p.read_text().splitlines()
        except FileNotFoundError:
            return
        for line in lines:
            name = json.loads(line)["file_name"]
            if not (p.parent / name).is_file():
                self.bad.append(f"{p}: {name} missing")


def _cli(src: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(x for x in (env.get("PYTHONPATH"), str(SRC)) if x)
    cmd = [sys.executable, "-m", "productvlm", "data", "import", str(src), "--out", str(out), "-q", "-j", "2"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_after(proc: subprocess.Popen, out: Path, n_images: int) -> None:
    deadline = time.monotonic() + 120
    while len(list(out.glob("*/images/*.jpg"))) < n_images:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the import made no progress"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


@pytest.mark.slow
def test_kill_9_twice_then_rerun_never_shows_a_partial_file(tmp_path):
    images = {f"n{i}.jpg": photo(i, (800, 600), noise=True) for i in range(N_PHOTOS)}  # ~300 kB each
    with ImageServer(images) as srv:
        rows = [row(i, srv.url(f"/slow/n{i}.jpg")) for i in range(N_PHOTOS)]
        src = write_csv(tmp_path / "c.csv", rows)
        out = tmp_path / "out"
        watcher = FolderWatcher(out)
        watcher.start()
        try:
            _kill_after(_cli(src, out), out, 8)
            first = len(list(out.glob("*/images/*.jpg")))
            _kill_after(_cli(src, out), out, first + 8)  # the rerun resumes, and is killed too
            done = len(list(out.glob("*/images/*.jpg")))
            assert done < N_PHOTOS and not list(out.glob("*/metadata.jsonl"))
            result = import_dataset(str(src), out, fetch=FetchOptions(concurrency=4), progress=False)
            listed = watcher.listings
            while watcher.listings < listed + 2 and watcher.is_alive():  # a full pass after the import
                time.sleep(0.01)
        finally:
            watcher.stop.set()
            watcher.join(10)
        assert watcher.bad == []
        assert watcher.listings > 50 and watcher.images_checked >= N_PHOTOS  # each file once
        assert result.failures == [] and sorted(imported_codes(out)) == [r["product_code"] for r in rows]
        assert result.images_reused == done and result.images_fetched == N_PHOTOS - done
        assert max(srv.counts.values()) <= 3  # at most once per run: nothing fetched again once stored
        assert not list(out.glob("*/images/.partial-*"))
        for r in (r for s in folder.SPLITS for r in folder.read_split(out, s)):
            key = Path(r["image_path"]).name
            original = images[
                next(n for n in images if folder.image_key(srv.url(f"/slow/{n}")) + ".jpg" == key)
            ]
            assert Path(r["image_path"]).read_bytes() == original  # RGB JPEGs are stored byte for byte
