"""Fixtures shared by the evaluation / prediction tests: a 60-row catalog and a run trained for a few steps.

Built once per session (cached on pytest's base temp folder), whichever test module asks first:
`catalog(tmp_path_factory.getbasetemp())`.
"""

from __future__ import annotations

import functools
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@functools.cache
def catalog(base: Path) -> Path:
    from productvlm.data.synth import synthesize

    synthesize(base / "eval-catalog", rows=60, seed=0, overwrite=True, progress=False)
    return base / "eval-catalog"


@functools.cache
def run(base: Path) -> Path:
    """tiny-cpu.yaml for 6 steps with two evals: a real run folder (final/, train_log.jsonl), not a good model."""
    from productvlm.config import load_config
    from productvlm.training.run import train

    cfg = load_config(
        CONFIGS / "tiny-cpu.yaml",
        [
            f"data.dir={catalog(base)}",
            f"output_dir={base / 'eval-run'}",
            "tracking.backend=none",
            "train.max_steps=6",
            "train.batch_size=8",
            "train.log_steps=1",
            "eval.subset=8",
            "eval.steps=3",
            "train.vision_pretrain.epochs=0",  # stage 1 has its own tests
        ],
    )
    return train(cfg, progress=False).run_dir
