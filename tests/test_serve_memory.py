"""`productvlm serve` bounds glibc malloc (a fixed mmap threshold and an arena cap at start, malloc_trim
every few batches), so a server that runs for days keeps a flat resident size; (slow) a 2,000-request
soak with photos of varying sizes stays within a stated bound after its warm-up."""

from __future__ import annotations

import asyncio
import ctypes
import sys
from pathlib import Path

import pytest

from productvlm.serving import allocator
from productvlm.serving.allocator import M_ARENA_MAX, M_MMAP_THRESHOLD, Trim, bound_malloc, glibc
from productvlm.serving.batching import Batcher, Completion

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` lives at the repo root

on_glibc = pytest.mark.skipif(glibc() is None, reason="the C library is not glibc (no mallopt/malloc_trim)")


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


@pytest.fixture
def fake_libc(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(allocator, "glibc", lambda: libc)
    return libc


def test_bound_malloc_sets_both_unless_the_user_did(fake_libc, monkeypatch):
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert bound_malloc(65536, 2) is True
    assert fake_libc.calls == [("mallopt", M_MMAP_THRESHOLD, 65536), ("mallopt", M_ARENA_MAX, 2)]
    fake_libc.calls.clear()
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert bound_malloc(65536, 2) is True
    assert fake_libc.calls == [("mallopt", M_MMAP_THRESHOLD, 65536)]  # the environment's arena cap stands


def test_trim_runs_every_n_batches(fake_libc):
    trim = Trim(every=3)
    for _ in range(7):
        trim()
    assert fake_libc.calls == [("malloc_trim", 0)] * 2 and trim.trims == 2


def test_without_glibc_nothing_is_called(monkeypatch):
    monkeypatch.setattr(allocator, "glibc", lambda: None)
    assert bound_malloc() is False
    trim = Trim(every=1)
    trim()
    assert trim.trims == 0


@on_glibc
def test_real_glibc_accepts_the_settings():
    assert glibc().mallopt(ctypes.c_int(M_ARENA_MAX), ctypes.c_int(8)) == 1  # glibc's own cap
    assert glibc().malloc_trim(0) in (0, 1)


class FakeEngine:
    def __init__(self):
        self.batches = []

    def generate(self, jobs):
        self.batches.append(len(jobs))
        return [Completion("ok", 1, 1, "stop") for _ in jobs]


def test_batcher_calls_after_batch_after_each_batch():
    engine, threads = FakeEngine(), []

    async def main():
        batcher = Batcher(engine, max_batch=4, wait_ms=20)
        batcher.after_batch = lambda: threads.append(__import__("threading").current_thread().name)
        batcher.start()
        futures = [batcher.submit(None, 4) for _ in range(6)]
        results = await asyncio.gather(*futures)
        await asyncio.sleep(0.05)
        await batcher.stop()
        return results

    results = asyncio.run(main())
    assert [r.text for r in results] == ["ok"] * 6
    assert len(threads) == len(engine.batches) >= 2  # 6 requests, at most 4 a batch
    assert all(name.startswith("generate") for name in threads)  # on the generation thread


def test_serve_command_installs_the_trim(tiny_model_dir, monkeypatch, fake_libc):
    import typer
    import uvicorn
    from typer.testing import CliRunner

    from productvlm.serving.cli import serve_command

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app))
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    app = typer.Typer()
    app.command("serve")(serve_command)
    app.command("other")(lambda: None)
    result = CliRunner().invoke(app, ["serve", "--model", str(tiny_model_dir), "--no-batching"])
    assert result.exit_code == 0, result.output
    assert isinstance(seen["app"].state.batcher.after_batch, Trim)
    assert ("mallopt", M_ARENA_MAX, allocator.ARENAS) in fake_libc.calls
    assert ("mallopt", M_MMAP_THRESHOLD, allocator.MMAP_THRESHOLD) in fake_libc.calls


@pytest.mark.slow
@on_glibc
def test_soak_of_2000_requests_of_varying_photo_sizes_stays_flat(tiny_model_dir):
    """`productvlm serve` (its own process, the tiny model at num_crops 4): after a 400-request warm-up,
    RSS never rises more than RISE_BOUND_MB over the next 1,600 (glibc's defaults rose 77 MB and
    MALLOC_ARENA_MAX=1 alone 52 MB, in runs of this soak; README, Serve). ~4-6 min on 2 busy cores."""
    from bench import bench_serve_memory as soak

    samples, _ = soak.measure(soak.ours_command(tiny_model_dir), soak.bodies(soak.REQUESTS))
    assert len(samples) == soak.REQUESTS // soak.EVERY
    assert soak.rise(samples) <= soak.RISE_BOUND_MB, samples
