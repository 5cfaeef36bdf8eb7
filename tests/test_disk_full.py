"""A full disk, a read-only output folder, a file that vanishes mid-run: `data import` says so in one
line, exits 2, leaves nothing half-written visible, and a rerun after freeing space completes.

Where the test runs as root and may mount, a real size-limited tmpfs fills up; everywhere, the same
errors are also injected (ENOSPC, EROFS) at the places a real disk raises them.
"""

from __future__ import annotations

import csv
import errno
import io
import os
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from faultserver import ImageServer
from productvlm.data import folder, importer
from productvlm.data.fetch import FetchOptions
from productvlm.data.images import is_complete_jpeg
from productvlm.data.importer import import_dataset
from productvlm.errors import UserError
from test_reliability_input import run_cli

N_IMAGES = 32
QUICK = FetchOptions(timeout=5, retries=1, backoff=0.01, concurrency=4)


def noisy_photo(i: int) -> bytes:
    """About 90 kB: 32 of them do not fit in 2 MB."""
    pixels = np.random.default_rng(i).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def server():
    with ImageServer({f"n{i}.jpg": noisy_photo(i) for i in range(N_IMAGES)}) as srv:
        yield srv


@pytest.fixture
def catalog(tmp_path, server) -> Path:
    path = tmp_path / "cat.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["product_code", "title", "category3_code", "full_price", "imageurl"])
        w.writerows([i, f"Item {i}", "TOTE", 100 + i, server.url(f"/img/n{i}.jpg")] for i in range(N_IMAGES))
    return path


def nothing_half_written(out: Path) -> None:
    """Every file there is whole: no temporary left, every image a complete JPEG."""
    files = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.startswith(".partial-")]
    assert all(is_complete_jpeg(p) for p in files if p.suffix == ".jpg")


def _mount(args: list[str]) -> bool:
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs (root only); the test skips where mounting is not permitted."""
    where = tmp_path / "disk"
    where.mkdir()
    if not _mount(["-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)]):
        pytest.skip("cannot mount a tmpfs here (needs root and mount rights); test_injected_* cover this")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


# ---------------------------------------------------------------- a real full disk and read-only mount


def test_full_disk_says_so_and_a_rerun_after_freeing_space_completes(
    small_disk, catalog, monkeypatch, capsys
):
    out = small_disk / "ds"
    code, err = run_cli(["data", "import", str(catalog), "--out", str(out), "-q"], monkeypatch, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "No space left on device (ENOSPC)" in lines[0], err
    assert "run the same command again" in lines[0]
    nothing_half_written(out)
    assert not list(out.glob("*/metadata.jsonl")) and not (out / folder.DATASET_JSON).exists()
    stored = len(list(out.glob("*/images/*.jpg")))
    assert 0 < stored < N_IMAGES

    assert _mount(["-o", "remount,size=20m", str(small_disk)])  # space freed
    result = import_dataset(str(catalog), out, fetch=QUICK, progress=False)
    assert sum(result.counts.values()) == N_IMAGES and not result.failures
    assert result.images_reused > 0 and result.images_fetched == N_IMAGES - result.images_reused
    nothing_half_written(out)


def test_read_only_output_folder_exits_2_in_one_line(tmp_path, catalog, monkeypatch, capsys):
    where = tmp_path / "ro"
    where.mkdir()
    if not _mount(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(where)]):
        pytest.skip("cannot mount a read-only tmpfs here; test_injected_read_only covers this")
    try:
        code, err = run_cli(
            ["data", "import", str(catalog), "--out", str(where / "ds"), "-q"], monkeypatch, capsys
        )
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "Read-only file system (EROFS)" in err and "choose a writable --out folder" in err


# ---------------------------------------------------------------- the same errors, injected


def _enospc(*_args, **_kw):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_injected_full_disk_while_storing_images(tmp_path, catalog, monkeypatch):
    out = tmp_path / "ds"
    real_fsync, calls = os.fsync, []

    def fsync_until_full(fd):
        calls.append(fd)
        if len(calls) > 5:  # the sixth image meets a full disk
            _enospc()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_until_full)
    with pytest.raises(UserError) as info:
        import_dataset(str(catalog), out, fetch=QUICK, progress=False)
    monkeypatch.undo()
    message = str(info.value)
    assert "\n" not in message and "No space left on device (ENOSPC)" in message
    assert f"cannot write {out}" in message and message.split(":")[0].endswith(".jpg")  # names the file
    nothing_half_written(out)
    assert not list(out.glob("*/metadata.jsonl"))
    assert len(list(out.glob("*/images/*.jpg"))) == 5

    result = import_dataset(str(catalog), out, fetch=QUICK, progress=False)  # space freed: rerun
    assert sum(result.counts.values()) == N_IMAGES and result.images_reused == 5


def test_output_folder_removed_mid_run(tmp_path, catalog, monkeypatch):
    out = tmp_path / "ds"
    real_store, calls, one_at_a_time = importer._store, [], threading.Lock()

    def store_after_rmtree(data, target, limits):
        # stores run in a thread pool: serialised here, so that the removal never races another
        # thread's write into the folder (ENOTEMPTY from rmtree: seen once in CI)
        with one_at_a_time:
            calls.append(target)
            if len(calls) == 3:
                shutil.rmtree(out)  # another process cleans up under us
            real_store(data, target, limits)

    monkeypatch.setattr(importer, "_store", store_after_rmtree)
    with pytest.raises(UserError) as info:
        import_dataset(str(catalog), out, fetch=QUICK, progress=False)
    monkeypatch.undo()
    assert "No such file or directory (ENOENT)" in str(info.value)
    assert "removed while the import ran: run the same command again" in str(info.value)
    result = import_dataset(str(catalog), out, fetch=QUICK, progress=False)
    assert sum(result.counts.values()) == N_IMAGES
    nothing_half_written(out)


def test_injected_full_disk_while_writing_metadata_keeps_the_old_dataset(tmp_path, catalog, monkeypatch):
    """metadata.jsonl of every split, failures.csv and dataset.json are replaced together or not at all."""
    out = tmp_path / "ds"
    import_dataset(str(catalog), out, fetch=QUICK, progress=False)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.suffix != ".jpg"}
    assert len(before) >= 4  # two or three splits' metadata, failures.csv, dataset.json

    real_open, opened = open, []

    def open_until_full(path, mode="r", *a, **kw):
        if "w" in mode and Path(path).name.startswith(".partial-"):
            opened.append(path)
            if len(opened) == 3:  # the third file of the batch meets a full disk
                _enospc()
        return real_open(path, mode, *a, **kw)

    monkeypatch.setattr("builtins.open", open_until_full)
    with pytest.raises(UserError, match=r"No space left on device \(ENOSPC\)"):
        import_dataset(str(catalog), out, fetch=QUICK, progress=False, split_seed=1)  # new splits
    monkeypatch.undo()
    assert len(opened) == 3
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.suffix != ".jpg"}
    assert after == before  # not one split written with the new seed, the others with the old
    nothing_half_written(out)


def test_injected_read_only(tmp_path, catalog, monkeypatch):
    def read_only(self, *a, **kw):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(UserError) as info:
        import_dataset(str(catalog), tmp_path / "ds", fetch=QUICK, progress=False)
    assert str(info.value) == (
        f"cannot write {tmp_path / 'ds'}: Read-only file system (EROFS); choose a writable --out folder"
    )


def test_image_vanishing_mid_run_is_fetched_again(tmp_path, catalog, server, monkeypatch):
    """An image of an earlier run removed between the check and its use: fetched again, no error."""
    out = tmp_path / "ds"
    import_dataset(str(catalog), out, fetch=QUICK, progress=False, split_seed=0)
    real_find = importer.find_existing

    def find_then_vanish(out_dir, key):
        found = real_find(out_dir, key)
        if found is not None:
            found.unlink()  # someone else removes it right after we looked
        return found

    monkeypatch.setattr(importer, "find_existing", find_then_vanish)
    result = import_dataset(str(catalog), out, fetch=QUICK, progress=False, split_seed=3)
    assert sum(result.counts.values()) == N_IMAGES and not result.failures
    assert result.images_fetched == N_IMAGES and result.images_reused == 0
    nothing_half_written(out)


def test_source_vanishing_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        import_dataset(str(tmp_path / "gone.csv"), tmp_path / "ds", progress=False)
