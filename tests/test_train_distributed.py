"""Several processes: 2-process DDP on the CPU (gloo) ends where one process with the same global batch does."""

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
