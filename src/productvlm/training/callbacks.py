"""Trainer callbacks: the epoch told to the data, checkpoints renamed into place, the JSON-lines log,
the tracker's config and model summary, the last-step evaluation, and a stop after N steps (used to
simulate an interruption)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from accelerate import PartialState
from transformers import TrainerCallback

from productvlm.config import Config
from productvlm.run_folder import FINAL
from productvlm.training.checkpoints import best_checkpoint, drop_staging, publish, rotate


class TellEpoch(TrainerCallback):
    """Tells the training data the epoch before the epoch's iteration starts (its DataLoader workers copy
    the dataset then): the augmentation draws per (seed, epoch, sample) and the length sampler's order.
    accelerate's own `set_epoch` reaches only one of them, and on resume not a sampler behind its
    skip wrapper. The epoch is the whole part of `state.epoch` (restored from the checkpoint on resume)."""

    def __init__(self, *targets):
        self.targets = [t for t in targets if hasattr(t, "set_epoch")]

    def on_epoch_begin(self, args, state, control, **kwargs):
        for target in self.targets:
            target.set_epoch(int(state.epoch or 0))


class AtomicCheckpoints(TrainerCallback):
    """The Trainer writes `checkpoint-N` (every process its part: RNG state at least); once all have
    written, the main process renames it to `step-N`, the only name resume and selection read, then
    deletes all but the newest `keep` checkpoints, never the best one by `metric`. The run folder
    must be on storage all processes share."""

    def __init__(self, keep: int | None, metric: str):
        self.keep, self.metric = keep, metric

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            drop_staging(Path(args.output_dir))  # an interrupted save's leftovers
        PartialState().wait_for_everyone()

    def on_save(self, args, state, control, **kwargs):
        everyone = PartialState()
        everyone.wait_for_everyone()
        if state.is_world_process_zero:
            root = Path(args.output_dir)
            publish(root, state.global_step)
            best = best_checkpoint(root, state.log_history, self.metric)
            rotate(root, self.keep, keep=best[0] if best else None)
        everyone.wait_for_everyone()


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
    """Evaluates after the last step too (the planned last one, or where a time budget stopped the run),
    inside training, so the trackers still record it."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def on_step_end(self, args, state, control, **kwargs):
        if self.enabled and (state.global_step >= state.max_steps or control.should_training_stop):
            control.should_evaluate = True


class StopAfter(TrainerCallback):
    """Stops training after `step` optimizer steps (used to simulate an interruption in tests)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
