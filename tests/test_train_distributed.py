"""Several processes: 2-process DDP on the CPU (gloo) ends where one process with the same global batch does,
with gradient checkpointing on (transformers then turns DDP's find_unused_parameters off), for every method."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from productvlm.data.synth import synthesize
from test_train_run import CONFIGS

ACCELERATE = CONFIGS / "accelerate"
TOWER = "model.vision_embed_tokens.img_processor.vision_model."
METHODS = ("full", "frozen_vision", "lora")
# one torchrun launch trains every method in turn (process start-up and imports are most of the cost)
EACH_METHOD = f"""
import sys
from productvlm.config import load_config
from productvlm.training.run import train

config, out, *sets = sys.argv[1:]
for method in {METHODS}:
    cfg = load_config(config, [*sets, f"train.method={{method}}", f"output_dir={{out}}/{{method}}"])
    train(cfg, progress=False)
"""


def unused_tower(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The CLIP tower's last encoder layer and post_layernorm (the tiny preset's tower has 4 layers)."""
    unused = (f"{TOWER}encoder.layers.3.", f"{TOWER}post_layernorm.")
    return {k: v for k, v in weights.items() if k.startswith(unused)}


def changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a if k.startswith(prefix))


def sets(data_dir: Path, out: Path, batch_size: int) -> list[str]:
    items = [
        f"data.dir={data_dir}",
        f"output_dir={out}",
        f"train.batch_size={batch_size}",
        "train.max_steps=6",
        "train.save_steps=3",
        "train.log_steps=1",
        "eval.subset=4",
        "eval.steps=6",
        "tracking.backend=none",
        "train.vision_pretrain.epochs=2",  # stage 1 runs over the processes too
        "train.gradient_checkpointing=true",
        # whole global batches (38 rows would end an epoch with 2, which DDP pads with repeated rows)
        "data.max_train_rows=36",
    ]
    return ["train", "--config", str(CONFIGS / "tiny-cpu.yaml"), *(x for i in items for x in ("--set", i))]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    data = tmp_path / "data"
    synthesize(data, rows=48, seed=5, overwrite=True, progress=False, workers=1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    for command in (
        [sys.executable, "-m", "productvlm", *sets(data, one, 4)],
        [*torchrun, "-m", "productvlm", *sets(data, two, 2)],
    ):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]

    a, b = load_file(one / "final" / "model.safetensors"), load_file(two / "final" / "model.safetensors")
    start = load_file(one / "base-model" / "model.safetensors")
    towers = [load_file(run / "vision-pretrained" / "model.safetensors") for run in (one, two)]
    assert max((towers[0][k] - towers[1][k]).abs().max().item() for k in start) < 1e-5  # stage 1 too
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-3  # it did train
    for tower, final in zip(towers, (a, b)):  # the tower's unused weights: frozen in both stages
        assert unused_tower(start) and all(torch.equal(start[k], tower[k]) for k in unused_tower(start))
        assert all(torch.equal(start[k], final[k]) for k in unused_tower(start))
    # both processes' RNG states are in each checkpoint, renamed into place once
    assert {p.name for p in (two / "checkpoints" / "step-000006").glob("rng_state_*")} == {
        "rng_state_0.pth",
        "rng_state_1.pth",
    }

    def log(run):
        return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]

    losses = [[e["loss"] for e in log(run) if "loss" in e] for run in (one, two)]
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=0)
    evals = [[e for e in log(run) if "eval_n" in e] for run in (one, two)]
    assert evals[0][-1]["eval_title_token_f1"] == evals[1][-1]["eval_title_token_f1"]
    assert len((two / "eval_samples.jsonl").read_text().splitlines()) == 4  # written once, not per process


@pytest.mark.parametrize("name", ["ddp.yaml", "deepspeed-zero2.yaml", "fsdp.yaml"])
def test_accelerate_configs_are_valid(name):
    from accelerate.commands.config.config_args import ClusterConfig

    path = ACCELERATE / name
    config = ClusterConfig.from_yaml_file(path)
    assert config.compute_environment.value == "LOCAL_MACHINE"
    assert config.num_processes >= 2 and str(config.mixed_precision) == "bf16"
    raw = yaml.safe_load(path.read_text())
    expected = {"ddp.yaml": "MULTI_GPU", "deepspeed-zero2.yaml": "DEEPSPEED", "fsdp.yaml": "FSDP"}[name]
    assert raw["distributed_type"] == expected


@pytest.mark.slow
def test_ddp_with_gradient_checkpointing_trains_every_method_and_leaves_unused_tower_weights(tmp_path):
    data = tmp_path / "data"
    synthesize(data, rows=24, seed=5, overwrite=True, progress=False, workers=1)
    script = tmp_path / "each_method.py"
    script.write_text(EACH_METHOD)
    sets = [
        f"data.dir={data}",
        "model.path=preset:tiny",
        "train.batch_size=2",
        "train.max_steps=2",
        "train.save_steps=2",
        "train.num_workers=0",
        "train.lr=1e-2",
        "train.gradient_checkpointing=true",
        "train.lora.vision=true",
        "train.vision_pretrain.epochs=0",
        "eval.subset=0",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command = [*torchrun, str(script), str(CONFIGS / "tiny-cpu.yaml"), str(tmp_path), *sets]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    for method in METHODS:
        run = tmp_path / method
        start, final = (
            load_file(run / "base-model" / "model.safetensors"),
            load_file(run / "final" / "model.safetensors"),
        )
        assert unused_tower(start) and all(torch.equal(start[k], final[k]) for k in unused_tower(start)), (
            method
        )
        assert changed(start, final, "model.layers."), method  # the decoder trained (LoRA: merged)
        trained_tower = changed(start, final, f"{TOWER}encoder.layers.0.")
        assert trained_tower == (method != "frozen_vision"), method  # LoRA: train.lora.vision
