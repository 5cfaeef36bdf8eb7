"""`make gpu-check` (bench/gpu_check.py): skips cleanly without CUDA; its whole flow runs on the tiny model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `bench` lives at the repo root

from bench import gpu_check  # noqa: E402
from bench.common import tiny_model  # noqa: E402
from test_bench_gpu import run_without_cuda  # noqa: E402


def test_without_cuda_it_says_so_and_exits_0():
    results = REPO / "bench" / "results"
    before = sorted(results.glob("gpu-check-*.json"))
    done = run_without_cuda("bench.gpu_check", timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "gpu-check: skipped: no CUDA device"
    assert sorted(results.glob("gpu-check-*.json")) == before  # nothing written


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("results")
    patch = pytest.MonkeyPatch()
    patch.setattr(gpu_check, "RESULTS", folder)
    yield folder
    patch.undo()


@pytest.fixture(scope="module")
def rows(results, tmp_path_factory):
    """The whole check on the tiny model, on the CPU, with every heavy step shrunk."""
    return gpu_check.run(
        crops=(1,),
        methods=("lora", "qlora"),
        memory_steps=1,
        train_steps=2,
        catalog_rows=30,
        eval_rows=2,
        decode_tokens=4,
        memory_batch_size=1,
        serve_max_tokens=8,
        device="cpu",
        reference=tiny_model(),
        compiled=False,
        work=tmp_path_factory.mktemp("work"),
    )


def test_every_step_runs_and_says_how_it_went(rows, results):
    by_name = {r["name"]: r for r in rows}
    assert list(by_name) == [
        "build the model from the reference config",
        "memory: lora, num_crops 1",
        "memory: qlora, num_crops 1",
        "stage 1 (train.vision_pretrain), tiny preset",
        "train: lora, 2 steps with an eval",
        "eval + predict, compiled decode",
        "serve: warm-up + 3 requests",
        "export --merge-lora",
        "whole check",
    ]
    for name in [n for n in by_name if not n.startswith("memory: qlora")]:
        assert by_name[name]["status"] == "ok", by_name[name]
        assert by_name[name]["seconds"] > 0
    lora = by_name["memory: lora, num_crops 1"]
    assert lora["peak_gib"] is None  # the CPU has no peak counter
    assert lora["plan_gib"] is not None or "plan: not available" in lora["notes"]
    qlora = by_name["memory: qlora, num_crops 1"]  # method qlora may not be wired in this build
    assert qlora["status"] == "ok" or "qlora" in qlora["notes"], qlora
    assert "statuses [200, 200, 200]" in by_name["serve: warm-up + 3 requests"]["notes"]
    assert "0 graphs compiled while serving" in by_name["serve: warm-up + 3 requests"]["notes"]
    assert "eval 2 rows" in by_name["eval + predict, compiled decode"]["notes"]
    (written,) = results.glob("gpu-check-*.json")
    report = json.loads(written.read_text())
    assert report["device"] == "cpu" and [r["name"] for r in report["rows"]] == list(by_name)


def test_past_the_budget_every_step_says_skipped(results, tmp_path):
    rows = gpu_check.run(budget_s=0, device="cpu", reference=tiny_model(), work=tmp_path, write=False)
    steps = rows[:-1]
    assert len(steps) == 1 + 3 * 2 + 5  # build, memory: 3 methods x 2 crops, 5 flow steps
    assert all(r["status"] == "skipped" and r["notes"] == "skipped: time budget spent" for r in steps)


def test_a_failed_step_is_a_row_and_its_dependants_skip(tmp_path):
    check = gpu_check.Check(budget_s=60)
    check.step("a", lambda: 1 / 0)
    check.step("b", lambda: {"notes": "fine"}, needs="a")
    check.step("c", lambda: {"notes": "ran", "failed": True})
    assert [(r["status"], r["notes"]) for r in check.rows] == [
        ("failed", "ZeroDivisionError: division by zero"),
        ("skipped", "skipped: a did not pass"),
        ("failed", "ran"),
    ]
    assert gpu_check.table(check.rows).row_count == 3
