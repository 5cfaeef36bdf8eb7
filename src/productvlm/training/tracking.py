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
        os.environ["WANDB_DATA_DIR"] = str(run / "wandb")  # staged artifacts (tables with images) stay in RUN
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


THUMBNAIL = (256, 256)


def _thumbnail(path: str):
    from productvlm.data.images import load_photo

    im = load_photo(path)
    im.thumbnail(THUMBNAIL)
    return im


def log_eval_samples(backend: str, step: int, samples: list[dict], callbacks: list) -> None:
    """The eval samples (image, truth, prediction) as a table in the tracker's run.

    wandb: a `wandb.Table` with `wandb.Image` thumbnails under `eval/samples`; mlflow: `log_table`
    appends to the artifact `eval_samples.json` (images stored as artifacts, `step` column);
    tensorboard: a markdown table under the text tag `eval/samples`.
    """
    if backend == "wandb":
        import wandb

        if wandb.run is not None:
            table = wandb.Table(columns=["step", "file_name", "image", "truth", "prediction"])
            for s in samples:
                image = wandb.Image(_thumbnail(s["image_path"]), caption=s["file_name"])
                table.add_data(step, s["file_name"], image, s["truth"], s["prediction"])
            wandb.run.log({"eval/samples": table, "train/global_step": step})
    elif backend == "mlflow":
        import mlflow

        if mlflow.active_run() is not None:
            columns = ("step", "file_name", "truth", "prediction")
            data = {key: [s[key] for s in samples] for key in columns}
            data["image"] = [_thumbnail(s["image_path"]) for s in samples]
            mlflow.log_table(data=data, artifact_file="eval_samples.json")
    elif backend == "tensorboard":
        from transformers.integrations import TensorBoardCallback

        writer = next((c.tb_writer for c in callbacks if isinstance(c, TensorBoardCallback)), None)
        if writer is not None:
            writer.add_text("eval/samples", markdown_table(samples), step)
            writer.flush()


def markdown_table(samples: list[dict]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| file_name | truth | prediction |", "|---|---|---|"]
    lines += [f"| {cell(s['file_name'])} | {cell(s['truth'])} | {cell(s['prediction'])} |" for s in samples]
    return "\n".join(lines)
