"""The training, profiling, generation and GPU benchmarks: tiny sizes, real code paths, sane rows."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` lives at the repo root

from bench import bench_generate, bench_gpu, bench_profile, bench_train, recipes  # noqa: E402
from bench.common import catalog, tiny_config, tiny_model  # noqa: E402
from bench.run import selected, to_markdown  # noqa: E402

KEYS = {"name", "value", "unit", "baseline", "baseline_value", "ratio", "aim", "notes"}
ROWS = 40  # a 40-row catalog: ~32 train, ~8 validation + test


def check_rows(rows: list[dict]) -> None:
    assert rows
    for r in rows:
        assert set(r) >= KEYS, r
        assert isinstance(r["value"], float) and math.isfinite(r["value"]) and r["value"] >= 0, r
        if r["baseline_value"] is not None:
            assert r["baseline_value"] > 0, r
        if r["ratio"] is not None:
            assert r["ratio"] > 0, r
    assert to_markdown(rows, "t").count("\n") == len(rows) + 4  # title, blank, header, rule


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from productvlm.models.phi3v import Phi3VProcessor
    from productvlm.training.data import make_encoder, rows_of

    cfg = tiny_config(catalog(ROWS), tmp_path_factory.mktemp("run"))
    processor = Phi3VProcessor.from_pretrained(tiny_model())
    return cfg, processor, make_encoder(cfg, processor), rows_of(cfg, "train")


def test_naive_batch_trains_on_all_512_positions(setup):
    cfg, processor, encoder, rows = setup
    batch = bench_train.naive_batch(processor, encoder, rows[0])
    n = len(encoder(rows[0]))
    assert batch["input_ids"].shape == (1, 512)
    assert int((batch["labels"] != -100).sum()) == 512  # prompt, image slots and padding included
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert int(batch["attention_mask"].sum()) == n < 512


def test_split_step_matches_the_plain_step(setup):
    """The profiler's two-part step gives the loss and gradients of model(**batch).loss.backward()."""
    from productvlm.models.phi3v import Phi3VForCausalLM
    from productvlm.training.data import CatalogDataset, Collator

    cfg, processor, encoder, rows = setup
    batch = Collator(processor, cfg.data.num_crops)([CatalogDataset(rows[:3], encoder)[i] for i in range(3)])
    model = Phi3VForCausalLM.from_pretrained(tiny_model(), dtype=torch.float32).train()
    loss = model(**batch).loss
    loss.backward()
    expected = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    split = bench_profile.split_step(model, batch)
    assert torch.allclose(split, loss.detach(), atol=1e-6)
    for name, p in model.named_parameters():
        if expected[name] is None:  # the CLIP tower's skipped last layer
            assert p.grad is None, name
            continue
        assert torch.allclose(p.grad, expected[name], atol=1e-6, rtol=1e-4), name
    assert model.model.vision_embed_tokens.img_projection[0].weight.grad.abs().sum() > 0


def test_train_bench_rows():
    rows = bench_train.run(steps=2, batch_size=4, rows=ROWS, rounds=1)
    check_rows(rows)
    names = [r["name"] for r in rows]
    assert "train: tiny-cpu config, full FT, answer tokens/s" in names
    assert "train: tiny-cpu config + packing, answer tokens/s" in names
    shares = [r for r in rows if "padding share" in r["name"]]
    assert any("length grouping" in r["name"] for r in shares)
    assert all(r["value"] < 100 for r in shares)


def test_profile_bench_rows():
    rows = bench_profile.run(steps=1, batch_size=4, rows=ROWS, workers=1)
    check_rows(rows)
    parts = [r for r in rows if "training step" in r["name"]]
    assert len(parts) == 4 and 50 < sum(r["value"] for r in parts) <= 101
    wait = rows[-1]
    assert "waiting for data" in wait["name"] and wait["value"] < 100


def test_generate_bench_rows():
    rows = bench_generate.run(prompts=4, batch_size=2, max_new_tokens=3, rows=ROWS, rounds=1, threads=(2, 1))
    check_rows(rows)
    assert [r["name"] for r in rows[:2]] == [
        "generate: greedy, batch 2, 2 threads",
        "generate: greedy, batch 2, 1 thread",
    ]
    for row in rows[:2]:
        assert row["ratio"] == pytest.approx(row["value"] / row["baseline_value"])
    assert 0 <= rows[2]["value"] <= 100 and len(rows) == 3


def test_gpu_bench_without_cuda_is_one_skipped_row(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (row,) = bench_gpu.run()
    assert "skipped" in row["name"] and row["value"] is None


def test_gpu_bench_step_runs_on_the_tiny_model(setup):
    """The GPU benchmark's build/batch/measure path, on CPU with the tiny preset."""
    from productvlm.models.phi3v import Phi3VConfig

    _, processor, _, _ = setup
    config = Phi3VConfig.from_pretrained(tiny_model())
    model = bench_gpu.build(config, "lora", "sdpa", torch.float32, "cpu")
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert 0 < sum(p.numel() for p in trainable) < sum(p.numel() for p in model.parameters()) / 5
    batch = bench_gpu.make_batch(processor, num_crops=4, batch_size=2, device="cpu")
    assert int((batch["labels"] != -100).sum()) > 0
    before = [p.detach().clone() for p in trainable]
    m = bench_gpu.measure(model, batch, steps=1, warmup=0)
    assert m["step_s"] > 0
    assert any(not torch.equal(b, p) for b, p in zip(before, trainable))  # the optimizer stepped


def test_gpu_peak_table():
    assert bench_gpu.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert bench_gpu.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert bench_gpu.peak_flops("NVIDIA GeForce GTX 1080") is None


def test_selected_names():
    assert selected(["--only", "train,bench_gpu"]) == {"train", "gpu"}
    assert selected(["profile", "--only=generate"]) == {"profile", "generate"}
    assert selected([]) == set()


def test_recipes_refuse_stage1_overrides_beside_a_copied_tower(tmp_path, capsys):
    """--tower-from copies another run's stage 1, so a stage-1 override would silently change nothing."""
    argv = ["--tower-from", "meanmax", "--set", "train.vision_pretrain.epochs=3", "--work", str(tmp_path)]
    with pytest.raises(SystemExit) as stopped:
        recipes.main(argv)
    assert stopped.value.code == 2
    assert "train.vision_pretrain.epochs=3 would change nothing" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
