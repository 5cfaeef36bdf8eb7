"""A rich progress bar for training steps, with the latest loss and eval metrics."""

from __future__ import annotations

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers import TrainerCallback


class RichProgress(TrainerCallback):
    def __init__(self, label: str = "train"):
        self.label = label
        self.progress: Progress | None = None
        self.task = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.progress = Progress(
            TextColumn(f"[bold]{self.label}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
        )
        self.progress.start()
        self.task = self.progress.add_task(
            self.label, total=state.max_steps, completed=state.global_step, info=""
        )

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is None or not logs:
            return
        if "loss" in logs:
            self.progress.update(self.task, info=f"loss {logs['loss']:.3f}")
        if "eval_category_accuracy" in logs:
            self.progress.console.print(
                f"step {state.global_step}: category acc {logs['eval_category_accuracy']:.3f}, "
                f"price MAPE {logs['eval_price_mape']:.3f}, title F1 {logs['eval_title_token_f1']:.3f}, "
                f"parse rate {logs['eval_parse_rate']:.2f}"
            )

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        """Stop the live display (train() calls it also when training ends with an error)."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
