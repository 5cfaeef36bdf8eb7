"""Failure behaviour of training: divergence, kill -9 and --resume, bad config, over-budget samples."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from productvlm.cli import main
from productvlm.data.synth import synthesize
from productvlm.errors import UserError
from productvlm.training.run import train
from productvlm.training.trainer import TrainingDiverged
from test_train_run import CONFIGS, config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("catalog")
    synthesize(out, rows=48, seed=5, overwrite=True, progress=False, workers=1)
    return out


class Corrupt(TrainerCallback):
    """Puts a NaN into the weights at the end of optimizer step `step` (a diverging run, on cue)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.lm_head.weight[0, 0] = float("nan")


@pytest.mark.parametrize(
    "corrupt_at, message",
    [
        (3, r"training diverged at step 4: the loss is nan"),  # caught by the next step's loss
        (4, r"training diverged at step 4: weights are NaN/inf \(lm_head.weight\)"),  # caught before saving
    ],
)
def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, corrupt_at, message):
    run = tmp_path / "run"
    cfg = config(data_dir, run, "train.max_steps=8", "train.save_steps=2")
    with pytest.raises(TrainingDiverged, match=message) as info:
        train(cfg, callbacks=[Corrupt(corrupt_at)], progress=False)
    assert isinstance(info.value, UserError) and "step-000002" in str(info.value)
    assert "train.lr" in str(info.value)  # says what to do
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]
    weights = load_file(run / "checkpoints" / "step-000002" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (run / "final").exists()


def test_huge_learning_rate_is_reported_as_divergence(data_dir, tmp_path):
    cfg = config(
        data_dir, tmp_path / "run", "train.lr=1e30", "train.warmup_ratio=0", "train.schedule=constant"
    )
    with pytest.raises(
        TrainingDiverged, match=r"at step 2: the loss is (nan|inf).*no checkpoint.*train\.lr \(now 1e\+30\)"
    ):
        train(cfg, progress=False)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "productvlm", "train", "--config", str(CONFIGS / "tiny-cpu.yaml"), *args]


def sets(data_dir, out) -> list[str]:
    items = [
        f"data.dir={data_dir}",
        f"output_dir={out}",
        "train.batch_size=4",
        "train.max_steps=30",
        "train.save_steps=3",
        "train.log_steps=1",
        "eval.subset=4",
        "eval.steps=10",
        "tracking.backend=none",
        "train.vision_pretrain.epochs=0",  # the kills must land in the VLM run
        "train.max_minutes=null",  # a resumed run must replay the same steps, whatever the load
    ]
    return [x for item in items for x in ("--set", item)]


def eval_metrics(run: Path) -> list[dict]:
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    return [e for e in log if "eval_n" in e]


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_gives_the_uninterrupted_result(data_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    straight = tmp_path / "straight"
    subprocess.run(cli(*sets(data_dir, straight)), env=env, check=True, capture_output=True, timeout=600)

    run = tmp_path / "killed"
    proc = subprocess.Popen(
        cli(*sets(data_dir, run)), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    target = run / "checkpoints" / "step-000006"
    deadline = time.monotonic() + 300
    while not target.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert target.is_dir() and not (run / "final").exists()  # killed mid-run, after a checkpoint

    resumed = subprocess.run(
        cli(*sets(data_dir, run), "--resume"), env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    a, b = load_file(straight / "final" / "model.safetensors"), load_file(run / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert eval_metrics(run) == eval_metrics(straight) and [e["step"] for e in eval_metrics(run)] == [
        10,
        20,
        30,
    ]
    samples = [json.loads(line) for line in (run / "eval_samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [10] * 4 + [20] * 4 + [30] * 4  # no duplicates from the killed run


@pytest.mark.parametrize(
    "bad, message",
    [
        ("train.lr_rate=1", "train.lr_rate: unknown key"),
        ("train.batch_size=0", "train.batch_size: Input should be"),
    ],
)
def test_bad_config_stops_the_cli_before_any_work(data_dir, tmp_path, monkeypatch, capsys, bad, message):
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", cli(*sets(data_dir, out), "--set", bad)[2:])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    assert message in " ".join(capsys.readouterr().err.split())  # one line, however the console wraps it
    assert not out.exists()


def test_sample_over_the_token_budget_is_named_before_training(data_dir, tmp_path):
    with pytest.raises(
        UserError,
        match=r"sample images/\w+\.jpg \(product_code \w+\) has \d+ tokens, over data\.max_tokens_per_sample=40",
    ):
        train(config(data_dir, tmp_path / "run", "data.max_tokens_per_sample=40"), progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()
