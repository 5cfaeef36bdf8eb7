"""Trackers via Trainer's `report_to`, configured through the environment variables its callbacks read.

- wandb: offline unless `tracking.offline: false` and WANDB_API_KEY is set; files in RUN/wandb
  (sync later with `wandb sync RUN/wandb/offline-run-*`).
- mlflow: a local file store in RUN/mlruns unless MLFLOW_TRACKING_URI is already set.
- tensorboard: event files in RUN/tensorboard.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from productvlm.config import TrackingConfig
from productvlm.errors import UserError

PACKAGES = {"wandb": "wandb", "mlflow": "mlflow", "tensorboard": "tensorboard"}


def setup_tracking(cfg: TrackingConfig, run: Path) -> list[str]:
    """Set the environment for the chosen backend; returns Trainer's `report_to`."""
    if cfg.backend == "none":
        return []
    package = PACKAGES[cfg.backend]
    if importlib.util.find_spec(package) is None:
        raise UserError(
            f"tracking.backend {cfg.backend}: the {package} package is not installed "
            f"(pip install {package}), or use --set tracking.backend=none"
        )
    run = run.resolve()
    if cfg.backend == "wandb":
        offline = cfg.offline or not os.environ.get("WANDB_API_KEY")
        os.environ["WANDB_MODE"] = "offline" if offline else os.environ.get("WANDB_MODE", "online")
        os.environ["WANDB_DIR"] = str(run)
        os.environ["WANDB_PROJECT"] = cfg.project
        os.environ.setdefault("WANDB_SILENT", "true")
    elif cfg.backend == "mlflow":
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            os.environ["MLFLOW_TRACKING_URI"] = (run / "mlruns").as_uri()
            # mlflow 3 keeps the file store in maintenance mode; it needs no database packages
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        os.environ["MLFLOW_EXPERIMENT_NAME"] = cfg.project
    else:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run / "tensorboard")
    return [cfg.backend]


def finish_tracking(cfg: TrackingConfig) -> None:
    """Close the wandb run (Trainer's callback leaves it open), which writes its summary files."""
    if cfg.backend == "wandb":
        import wandb

        if wandb.run is not None:
            wandb.finish()
