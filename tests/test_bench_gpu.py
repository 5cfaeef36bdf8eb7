"""`make bench-gpu` (bench/bench_gpu.py): skips cleanly without CUDA; its whole flow runs on the tiny model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `bench` lives at the repo root

from bench import bench_gpu  # noqa: E402
from bench.common import tiny_model  # noqa: E402


def run_without_cuda(module: str, timeout: float) -> subprocess.CompletedProcess:
    """`python -m module` from the repo root with no CUDA device visible."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
    return subprocess.run(
        [sys.executable, "-m", module], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_without_cuda_it_says_why_and_exits_0(tmp_path):
    results = REPO / "bench" / "results"
    before = sorted(results.glob("gpu-*.json"))
    done = run_without_cuda("bench.bench_gpu", timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "bench-gpu: skipped: no CUDA device (torch.cuda.is_available() is False)"
    assert sorted(results.glob("gpu-*.json")) == before  # nothing written


def test_without_the_reference_config_it_skips(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    (row,) = bench_gpu.run(reference=tmp_path)
    assert row["name"] == "gpu: skipped" and row["value"] is None
    assert str(tmp_path / "config.json") in row["notes"]


@pytest.fixture
def results(monkeypatch, tmp_path):
    monkeypatch.setattr(bench_gpu, "RESULTS", tmp_path)
    return tmp_path


def test_whole_flow_on_the_tiny_model(results):
    """Decode (dynamic and compiled) then full FT and LoRA on one model, as on the GPU, at tiny sizes."""
    rows = bench_gpu.run(
        batch_size=2,
        steps=1,
        crops=(1,),
        methods=("full", "lora"),
        decode_batches=(2,),
        new_tokens=3,
        device="cpu",
        reference=tiny_model(),
    )
    by_name = {r["name"]: r for r in rows}
    dynamic = by_name["gpu decode: dynamic cache (default path), batch 2"]
    compiled = by_name["gpu decode: static cache + compiled step (CUDA graph), batch 2"]
    assert compiled["baseline_value"] == dynamic["value"] and compiled["first_call_s"] > 0
    for r in [dynamic, compiled]:  # a difference of two timings: its sign is noise at 3 tiny tokens
        assert isinstance(r["value"], float) and math.isfinite(r["value"]), r
    trained = [r for r in rows if r["name"].startswith("gpu: ") and " FT, sdpa" in r["name"]]
    assert [r["name"].split(" FT")[0] for r in trained] == ["gpu: full", "gpu: lora"]
    for r in trained:
        assert isinstance(r["value"], float) and math.isfinite(r["value"]) and r["value"] > 0, r
    assert by_name["gpu: whole run"]["value"] > 0
    (written,) = results.glob("gpu-cpu-*.json")
    report = json.loads(written.read_text())
    assert report["device"] == "cpu" and [r["name"] for r in report["rows"]] == [r["name"] for r in rows]


def test_past_the_budget_every_measurement_says_skipped(results):
    rows = bench_gpu.run(budget_s=0, device="cpu", reference=tiny_model(), write=False)
    measured = [r for r in rows if r["name"].startswith("gpu")][:-1]  # all but the whole-run row
    assert len(measured) == 2 * 2 + 3 * 2  # decode: 2 paths x 2 batches; training: 3 methods x 2 crops
    assert all(r["value"] is None and r["notes"] == "skipped: time budget spent" for r in measured)
    assert not list(results.iterdir())
