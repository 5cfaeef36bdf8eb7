"""The run folder `train` writes, and the one walk from a model folder back to its run.

RUN/
  config.yaml            the resolved config, as run
  base-model/            only for `model.path: preset:...` (the random preset the run starts from)
  vision-pretrained/     only with train.vision_pretrain: base-model with its tower trained (stage 1)
  checkpoints/step-N/    Trainer checkpoints, each renamed into place when complete
  final/                 the model (official layout or a peft adapter), with its prompt settings
  final/adapter/         the adapter too, when a LoRA run also saved merged weights
  train_log.jsonl        one JSON object per log/eval event
  eval_samples.jsonl     per eval: truth and prediction of every validation-subset row
"""

from __future__ import annotations

from pathlib import Path

CONFIG, BASE_MODEL, CHECKPOINTS, FINAL = "config.yaml", "base-model", "checkpoints", "final"
VISION_PRETRAINED = "vision-pretrained"
LOG, SAMPLES = "train_log.jsonl", "eval_samples.jsonl"


def find_run(path: str | Path) -> Path | None:
    """RUN when `path` is RUN, RUN/final or RUN/final/adapter; None for any other folder or a hub id."""
    p = Path(path)
    for run in (p, p.parent, p.parent.parent):
        if (run / CONFIG).is_file() and (run / FINAL).is_dir():
            return run
    return None


__all__ = ["find_run", "CONFIG", "BASE_MODEL", "VISION_PRETRAINED", "CHECKPOINTS", "FINAL", "LOG", "SAMPLES"]
