"""`predict` over a catalog: every input gives exactly one row, in input order, whatever happens to its
photo; a rerun after `kill -9` finishes the run; two torchrun processes write what one process writes.

The model is the random tiny preset (its answers are nonsense, but deterministic: greedy), at one crop
and 2 new tokens, so a few hundred photos take seconds."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from faultserver import ImageServer
from productvlm.errors import UserError
from productvlm.evaluation.cli import predict_command
from productvlm.evaluation.predict import COLUMNS

app = typer.Typer()
app.command("predict")(predict_command)
app.command("noop")(lambda: None)
FAST = ["--num-crops", "1", "--max-new-tokens", "2", "--device", "cpu", "--dtype", "float32"]
ROOT = Path(__file__).resolve().parents[1]


def jpeg(seed: int, size: int = 24) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG")
    return buf.getvalue()


def make_catalog(folder: Path, rows: int, bad: dict[int, str] | None = None) -> Path:
    """photos.csv with `rows` rows (sku, image) over 7 small photos; `bad` replaces some rows' image."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "photos").mkdir(exist_ok=True)
    for k in range(7):
        (folder / "photos" / f"{k}.jpg").write_bytes(jpeg(k))
    table = folder / "photos.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sku", "image"])
        for i in range(rows):
            writer.writerow([f"SKU{i:05d}", (bad or {}).get(i, f"photos/{i % 7}.jpg")])
    return table


def invoke(*args) -> None:
    result = CliRunner().invoke(app, ["predict", *map(str, args)])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def env() -> dict:
    src = str(ROOT / "src")
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": src}


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    return make_catalog(tmp_path_factory.mktemp("catalog"), 200)


@pytest.fixture(scope="module")
def reference(catalog, tiny_model_dir, tmp_path_factory):
    """The 200-row catalog predicted by one process, in chunks of 16 rows."""
    out = tmp_path_factory.mktemp("reference") / "preds.jsonl"
    invoke("--model", tiny_model_dir, "--input", catalog, "--output", out, "--chunk-rows", 16, "-b", 8, *FAST)
    return read_jsonl(out)


def test_every_row_once_in_order_with_confidence(reference, catalog):
    assert [r["id"] for r in reference] == [f"SKU{i:05d}" for i in range(200)]
    assert all(list(r) == list(COLUMNS) for r in reference)
    assert all(r["error"] is None and isinstance(r["raw"], str) for r in reference)
    for r in reference:
        confidences = [r[f"confidence_{f}"] for f in ("title", "category", "price")]
        assert all(0.0 <= c <= 1.0 for c in confidences)
        assert r["needs_review"] == any(c < 0.5 for c in confidences)
    assert not (catalog.parent / "preds.jsonl.parts").exists()


def test_same_photo_same_row_whatever_the_batch(reference):
    """Rows of the same photo in different chunks and batch positions get the same answer."""
    by_photo: dict[str, set] = {}
    for r in reference:
        by_photo.setdefault(r["image"], set()).add((r["raw"], r["confidence_category"]))
    assert len(by_photo) == 7 and all(len(v) == 1 for v in by_photo.values())


def test_csv_and_parquet_hold_the_same_rows(reference, catalog, tiny_model_dir, tmp_path):
    import pyarrow.parquet as pq

    small = make_catalog(tmp_path / "small", 20)
    invoke(
        "--model", tiny_model_dir, "--input", small, "-o", tmp_path / "p.parquet", "--chunk-rows", 16, *FAST
    )
    invoke("--model", tiny_model_dir, "--input", small, "-o", tmp_path / "p.csv", "--chunk-rows", 16, *FAST)
    from_parquet = pq.read_table(tmp_path / "p.parquet").to_pylist()
    assert from_parquet == reference[:20]
    with open(tmp_path / "p.csv", newline="") as f:
        from_csv = list(csv.DictReader(f))
    assert [r["id"] for r in from_csv] == [r["id"] for r in reference[:20]]
    assert [float(r["confidence_title"]) for r in from_csv] == [r["confidence_title"] for r in reference[:20]]


def test_unreadable_photos_missing_files_and_bad_urls_each_give_a_row(tiny_model_dir, tmp_path):
    server = ImageServer({"a.jpg": jpeg(1), "b.jpg": jpeg(2)})
    with server:
        (tmp_path / "cat").mkdir()
        (tmp_path / "cat" / "notes.jpg").write_text("not an image")
        Image.new("RGB", (4000, 16), "red").save(tmp_path / "cat" / "banner.png")  # 0 px high at 1 crop
        bad = {
            1: "photos/nope.jpg",
            2: "notes.jpg",
            3: server.url("/img/a.jpg"),  # fine
            4: server.url("/img/missing.jpg"),  # 404
            5: server.url("/text/a.jpg"),  # an HTML page
            6: "ftp://example.com/x.jpg",
            7: "N/A",
            8: server.url("/trunc/b.jpg"),
            10: "banner.png",
        }
        table = make_catalog(tmp_path / "cat", 11, bad)
        out = tmp_path / "p.jsonl"
        invoke("--model", tiny_model_dir, "--input", table, "-o", out, *FAST)
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == [f"SKU{i:05d}" for i in range(11)]
    errors = {i: r["error"] for i, r in enumerate(rows)}
    assert errors[0] is None and errors[3] is None and errors[9] is None
    assert "no such file" in errors[1] and "nope.jpg" in errors[1]
    assert "not a supported image" in errors[2]
    assert errors[4] == "download failed: http 404"
    assert "not a supported image" in errors[5]
    assert errors[6] == "bad url scheme: ftp" and errors[7] == "missing image url"
    assert "truncated image" in errors[8]
    assert errors[10].startswith("cannot predict: image of 4000x16 is too elongated for 1 crops")
    for i in (1, 2, 4, 5, 6, 7, 8, 10):
        assert rows[i]["needs_review"] is True and rows[i]["raw"] is None and rows[i]["title"] is None


def test_positional_files_and_dataset_folder(tiny_model_dir, eval_catalog, tmp_path):
    photos = sorted((eval_catalog / "test" / "images").glob("*.jpg"))[:3]
    invoke(*photos, tmp_path / "gone.jpg", "--model", tiny_model_dir, "-o", tmp_path / "f.jsonl", *FAST)
    rows = read_jsonl(tmp_path / "f.jsonl")
    assert [r["id"] for r in rows] == [str(p) for p in [*photos, tmp_path / "gone.jpg"]]
    assert [r["error"] is None for r in rows] == [True, True, True, False]
    invoke(
        "--model",
        tiny_model_dir,
        "--data",
        eval_catalog,
        "--split",
        "test",
        "-o",
        tmp_path / "d.jsonl",
        *FAST,
    )
    metadata = read_jsonl(eval_catalog / "test" / "metadata.jsonl")
    assert [r["id"] for r in read_jsonl(tmp_path / "d.jsonl")] == [str(m["product_code"]) for m in metadata]


def test_parts_of_another_run_are_refused(catalog, tiny_model_dir, tmp_path):
    out = tmp_path / "p.jsonl"
    parts = tmp_path / "p.jsonl.parts"
    parts.mkdir()
    (parts / "run.json").write_text(json.dumps({"source": "elsewhere"}))
    with pytest.raises(UserError, match="other settings"):
        invoke("--model", tiny_model_dir, "--input", catalog, "-o", out, *FAST)


def test_kill_9_then_rerun_gives_every_row_once(reference, catalog, tiny_model_dir, tmp_path):
    out = tmp_path / "preds.jsonl"
    parts = tmp_path / "preds.jsonl.parts"
    command = [sys.executable, "-m", "productvlm", "predict", "--model", str(tiny_model_dir)]
    command += ["--input", str(catalog), "--output", str(out), "--chunk-rows", "16", "-b", "8", *FAST]
    proc = subprocess.Popen(command, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while len(list(parts.glob("0*.jsonl"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the run finished before it was killed: make the catalog larger"
    written = sorted(parts.glob("0*.jsonl"))
    assert 3 <= len(written) < 13
    done = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert read_jsonl(out) == reference
    assert not parts.exists()


def test_two_torchrun_processes_write_what_one_writes(reference, catalog, tiny_model_dir, tmp_path):
    out = tmp_path / "preds.jsonl"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command = [
        *torchrun,
        "-m",
        "productvlm",
        "predict",
        "--model",
        str(tiny_model_dir),
        "--input",
        str(catalog),
    ]
    command += ["--output", str(out), "--chunk-rows", "16", "-b", "8", *FAST]
    done = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert read_jsonl(out) == reference


# A smaller random model than the tiny preset, for the 20,000-row run: the pipeline (table stream, photo
# decoding, prompt and pixel preparation, batching, confidence, part files, ranks, merge) is the same
# code, but its forward costs ~0.3 ms a row instead of the tiny preset's ~10 (which alone would be
# 40,000 rows x 10 ms = 400 s of CPU on 2 cores).
SMALL = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    vision=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56
    ),
)
SUMMARY = re.compile(r"done ([\d,]+) rows .* ([\d,]+) predicted now")


def summary(stderr: str) -> tuple[int, int]:
    """(rows, rows predicted by this run) from the command's last line."""
    match = SUMMARY.search(" ".join(stderr.split()))
    assert match, stderr[-2000:]
    return tuple(int(g.replace(",", "")) for g in match.groups())


def kill_9_everything(launcher: subprocess.Popen) -> None:
    """SIGKILL the process groups of a torchrun launcher (started with start_new_session) and of its
    workers: torchrun starts each worker in a session of its own, so the launcher's group alone would
    leave them running."""
    import psutil

    tree = [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(recursive=True)]
    assert len(tree) >= 3, "the launcher and its 2 workers"
    for group in {os.getpgid(p.pid) for p in tree}:
        os.killpg(group, signal.SIGKILL)
    launcher.wait()
    _, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive, alive


@pytest.mark.slow
def test_20000_rows_two_processes_killed_and_resumed_equal_one_process(tmp_path):
    """20,000 rows: one process as the reference; two torchrun processes killed with SIGKILL (launcher and
    workers) after some parts, then rerun: the rerun predicts only the missing chunks, and the merged
    output equals the reference row for row, every id once."""
    from productvlm.models.phi3v.presets import init_model

    model = init_model("tiny", tmp_path / "model", seed=0, **SMALL)
    table = make_catalog(tmp_path / "big", 20_000)
    args = ["--model", str(model), "--input", str(table), "--chunk-rows", "250", "-b", "50"]
    args += ["--num-crops", "1", "--max-new-tokens", "2", "--device", "cpu", "--dtype", "float32"]
    one = tmp_path / "one.jsonl"
    single = [sys.executable, "-m", "productvlm", "predict", *args, "--output", str(one)]
    done = subprocess.run(single, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert summary(done.stderr) == (20_000, 20_000)
    reference = read_jsonl(one)
    assert [r["id"] for r in reference] == [f"SKU{i:05d}" for i in range(20_000)]
    assert all(r["error"] is None for r in reference)
    answers = {(r["image"], r["raw"]) for r in reference}  # a row in the wrong place would show
    assert len(answers) == 7 and len({raw for _, raw in answers}) >= 2, answers

    two, parts = tmp_path / "two.jsonl", tmp_path / "two.jsonl.parts"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command = [*torchrun, "-m", "productvlm", "predict", *args, "--output", str(two)]
    proc = subprocess.Popen(
        command, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 600
    while len(list(parts.glob("0*.jsonl"))) < 10 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    kill_9_everything(proc)
    kept = len(list(parts.glob("0*.jsonl")))
    assert not two.exists() and 10 <= kept < 80, f"{kept} of 80 parts when killed"

    done = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert summary(done.stderr) == (20_000, 20_000 - 250 * kept)  # only the missing chunks again
    resumed = read_jsonl(two)
    assert [r["id"] for r in resumed] == [f"SKU{i:05d}" for i in range(20_000)]
    assert resumed == reference
    assert not parts.exists()


def test_review_threshold_from_the_command_line(tiny_model_dir, tmp_path):
    table = make_catalog(tmp_path / "cat", 6, {5: "photos/none.jpg"})
    invoke(
        "--model", tiny_model_dir, "--input", table, "-o", tmp_path / "all.jsonl", "--review-below", 0, *FAST
    )
    assert [r["needs_review"] for r in read_jsonl(tmp_path / "all.jsonl")] == [False] * 5 + [True]
    with pytest.raises(UserError, match="needs a calibrated model"):
        invoke("--model", tiny_model_dir, "--input", table, "--target-accuracy", 0.9, *FAST)


def test_review_options_are_checked_before_the_model_loads(tmp_path):
    table = make_catalog(tmp_path / "cat", 2)
    not_a_model = tmp_path / "no-model"  # never read: both mistakes are caught first
    with pytest.raises(UserError, match="--review-below or --target-accuracy, not both"):
        invoke("--model", not_a_model, "--input", table, "--review-below", 0.5, "--target-accuracy", 0.9)
    out_of_range = CliRunner().invoke(
        app, ["predict", "--model", str(not_a_model), "--input", str(table), "--review-below", "1.5"]
    )
    assert out_of_range.exit_code == 2 and "--review-below" in out_of_range.output
