"""Training to a time budget (`train.max_minutes`, `train.vision_pretrain.max_minutes`).

The learning-rate schedule runs on whichever is further along: the steps taken out of the planned
ones (epochs / max_steps) or the seconds spent out of the budget. So a run on a slow machine takes
fewer steps but still warms up, decays and ends annealed when its time is up, instead of being cut
at a high learning rate ("Budgeted Training", Li et al., ICLR 2020: a schedule that decays to the
budget beats a full schedule stopped early). On a fast machine the planned steps end first, as
without a budget. The seconds spent are kept in the checkpoints, so a resumed run spends only what
is left. Runs with a budget are not repeatable step for step across machines (or loads); without one
nothing here changes the schedule.
"""

from __future__ import annotations

import math
import time

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState


class TimeBudget(TrainerCallback, ExportableState):
    """Counts the seconds training has spent (across resumes) and stops the run when they reach `seconds`."""

    def __init__(self, seconds: float, spent: float = 0.0):
        self.seconds, self.spent = seconds, spent
        self._since: float | None = None

    def state(self) -> dict:
        return {"args": {"seconds": self.seconds}, "attributes": {"spent": self.now()}}

    def now(self) -> float:
        """Seconds spent so far, the running step included."""
        return self.spent + (time.perf_counter() - self._since if self._since is not None else 0.0)

    def fraction(self) -> float:
        return self.now() / self.seconds

    def on_train_begin(self, args, state, control, **kwargs):
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)  # a resumed run's checkpoint
        if isinstance(saved, dict):
            self.spent = float(saved.get("attributes", {}).get("spent", 0.0))
        self._since = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.fraction() >= 1.0:
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.spent, self._since = self.now(), None


def time_budget(minutes: float | None) -> TimeBudget | None:
    """A stage's `max_minutes` as its budget (None: no budget)."""
    return TimeBudget(60 * minutes) if minutes else None


def clocked(schedule, budget: TimeBudget, total_steps: int):
    """`schedule(step)` evaluated at the step the budget's clock says the run is at, if that is later."""

    def factor(step: int) -> float:
        return schedule(max(step, min(total_steps, math.floor(budget.fraction() * total_steps))))

    return factor


__all__ = ["TimeBudget", "clocked", "time_budget"]
