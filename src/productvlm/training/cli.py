"""`productvlm train --config FILE.yaml [--set key=value ...] [--resume]`."""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from productvlm.config import load_config

console = Console()


def train(
    config: Path = typer.Option(..., "--config", "-c", help="Run config (YAML); see configs/."),
    set_: list[str] = typer.Option(
        [], "--set", help="Override a config key: --set train.lr=1e-4 (repeatable; YAML values)."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run in output_dir from its latest complete checkpoint."
    ),
) -> None:
    """Fine-tune Phi-3-V on a dataset folder; writes the run folder (config, checkpoints, final model, log)."""
    cfg = load_config(config, set_)  # every config mistake is reported before any work starts
    from productvlm.training.run import train as run_train

    console.print(f"[bold]run folder[/] {cfg.output_dir}  ({cfg.model.path}, method {cfg.train.method})")
    result = run_train(cfg, resume=resume)
    if result.resumed_from:
        console.print(f"resumed from {result.resumed_from}")
    if result.data:
        rows = f", {result.data['packs']} packed rows" if "packs" in result.data else ""
        console.print(
            f"data: {result.data['samples']} samples{rows}, padding "
            f"{result.data['padding_share']:.1%} of the batch token slots"
        )
    console.print(summary_table(result.metrics))
    console.print(
        f"[bold green]done[/] in {result.seconds:.0f}s, {result.steps} steps -> "
        f"{result.run_dir}  (final model: {result.final_dir}, log: {result.run_dir / 'train_log.jsonl'})"
    )


def summary_table(metrics: dict[str, float]) -> Table:
    table = Table("metric", "value", title="final metrics")
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isnan(value):
            table.add_row(key, f"{value:.4g}")
        elif isinstance(value, int):
            table.add_row(key, str(value))
    return table
