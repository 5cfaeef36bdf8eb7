"""Trainer callbacks: the JSON-lines log, the tracker's config and model summary, the last-step
evaluation, and a stop after N steps (used to simulate an interruption)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from productvlm.config import Config
from productvlm.run_folder import FINAL


class JsonlLog(TrainerCallback):
    """Appends every log event (loss, lr, eval metrics) to RUN/train_log.jsonl."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")


class LogConfig(TrainerCallback):
    """Adds the resolved config and a model summary to the tracker's run (after its callback started it)."""

    def __init__(self, cfg: Config, run: Path, data: dict[str, float] | None = None):
        self.cfg, self.run, self.data = cfg, run, data or {}

    def summary(self, model) -> dict[str, Any]:
        params = list(model.parameters())
        return {
            "parameters": sum(p.numel() for p in params),
            "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
            "method": self.cfg.train.method,
            "final_model": str(self.run / FINAL),
        }

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:
            return
        backend = self.cfg.tracking.backend
        summary = self.summary(model)
        if backend == "wandb":
            import wandb

            if wandb.run is not None:
                wandb.config.update({"productvlm": self.cfg.to_dict()}, allow_val_change=True)
                wandb.run.summary.update({f"model/{k}": v for k, v in summary.items()})
                wandb.run.summary.update({f"data/{k}": v for k, v in self.data.items()})
        elif backend == "mlflow":
            import mlflow

            if mlflow.active_run() is not None:
                mlflow.log_dict(self.cfg.to_dict(), "productvlm_config.json")
                mlflow.set_tags({f"model.{k}": v for k, v in summary.items()})
                mlflow.log_params({f"data.{k}": v for k, v in self.data.items()})


class EvalAtEnd(TrainerCallback):
    """Evaluates after the last step too, inside training, so the trackers still record it."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def on_step_end(self, args, state, control, **kwargs):
        if self.enabled and state.global_step >= state.max_steps:
            control.should_evaluate = True


class StopAfter(TrainerCallback):
    """Stops training after `step` optimizer steps (used to simulate an interruption in tests)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
