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
    plan: bool = typer.Option(
        False, "--plan", help="Print the GPU memory plan (per device) and exit; no weights load."
    ),
    gpu_memory: float | None = typer.Option(
        None, "--gpu-memory", min=0.1, help="--plan: GPU memory in GB (default: this machine's GPU)."
    ),
    devices: int = typer.Option(
        1, "--devices", min=1, help="--plan: GPUs the run shards or replicates over."
    ),
    sharding: str = typer.Option("ddp", "--sharding", help="--plan: ddp, fsdp, zero1, zero2 or zero3."),
) -> None:
    """Fine-tune Phi-3-V on a dataset folder; writes the run folder (config, checkpoints, final model, log)."""
    cfg = load_config(config, set_)  # every config mistake is reported before any work starts
    if plan:
        print_plan(cfg, gpu_memory, devices, sharding)
        return
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


def print_plan(cfg, gpu_memory: float | None, devices: int, sharding: str) -> None:
    """The memory plan with and without gradient checkpointing, and which GPU sizes each fits."""
    from productvlm.training.memory import FILL, GB, gb, plan_memory
    from productvlm.training.memory import gpu_memory as planned_memory

    memory = int(gpu_memory * GB) if gpu_memory else planned_memory()
    off, on = (plan_memory(cfg, devices=devices, sharding=sharding, checkpointing=c) for c in (False, True))
    chosen = plan_memory(cfg, devices=devices, sharding=sharding, memory=memory)
    table = Table("GB per GPU", "checkpointing off", "checkpointing on", title=off.heading())
    columns = [dict(off.rows()), dict(on.rows())]
    for name in columns[0]:  # both plans have the same rows
        if columns[0][name] or columns[1][name]:
            cells = [gb(c[name]) if c[name] else "" for c in columns]
            table.add_row(name, *cells, style="bold" if name == "total" else None)
    sizes = sorted({16, 24, 40, 80, *([round(memory / GB)] if memory else [])})
    for size in sizes:
        fits = ["fits" if p.total <= FILL * size * GB else "-" for p in (off, on)]
        here = " (this GPU)" if memory and size == round(memory / GB) else ""
        table.add_row(f"{size} GB GPU{here}", *fits)
    console.print(table)
    setting = cfg.train.gradient_checkpointing
    why = (
        "auto, " + ("no GPU memory known" if memory is None else f"for {gb(memory)} GB")
        if setting == "auto"
        else "set"
    )
    console.print(
        f"train.gradient_checkpointing: {setting} -> {'on' if chosen.checkpointing else 'off'} ({why}); "
        f"a plan fits when its total is at most {FILL:.0%} of the GPU"
    )


def summary_table(metrics: dict[str, float]) -> Table:
    table = Table("metric", "value", title="final metrics")
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isnan(value):
            table.add_row(key, f"{value:.4g}")
        elif isinstance(value, int):
            table.add_row(key, str(value))
    return table
