"""`productvlm eval` and `productvlm predict` (plain typer command functions; the main app registers them)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from productvlm.errors import UserError

console = Console(stderr=True)  # stdout stays clean for `predict` JSON lines


SHORT = {
    "majority_category": "majority category",
    "mean_price": "mean price",
    "median_price_per_true_category": "median price of true cat.",
}


def _cell(block: dict[str, Any], field: str | None, key: str, pct: bool, ci: bool = False) -> str:
    """A figure of `block` (nested by field) for the terminal; with `ci`, its 95% interval instead."""
    node = block if field is None else block.get(field, {})
    fmt = (lambda v: f"{100 * v:.1f}%") if pct else (lambda v: f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}")
    if ci:
        interval = node.get(f"{key}_ci95")
        return f"{fmt(interval[0])} - {fmt(interval[1])}" if interval else ""
    x = node.get(key)
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return fmt(x)


def metrics_table(metrics: dict[str, Any]) -> Table:
    """Model vs baselines: the figures of the report's top table."""
    from productvlm.evaluation.report import ROWS

    base = metrics.get("baselines", {})
    table = Table(
        "metric",
        "model",
        "[dim]95% CI[/]",
        *(SHORT.get(b, b) for b in base),
        title=f"{metrics.get('split')} split, n={metrics.get('n')}, baselines from train",
    )
    for label, field, key, pct, _ in ROWS:
        table.add_row(
            label,
            f"[bold]{_cell(metrics, field, key, pct)}[/]",
            f"[dim]{_cell(metrics, field, key, pct, ci=True)}[/]",
            *(_cell(b, field, key, pct) for b in base.values()),
        )
    return table


def eval_command(
    model: str = typer.Option(
        ..., "--model", "-m", help="Model folder, run folder (= its final/) or adapter."
    ),
    data: Path = typer.Option(
        ..., "--data", "-d", help="Dataset folder (from `data synth` / `data import`)."
    ),
    split: str = typer.Option("test", "--split", help="Split to evaluate on (train, validation, test)."),
    num_crops: int | None = typer.Option(None, "--num-crops", min=1, max=16, help="Default: as trained."),
    batch_size: int = typer.Option(16, "--batch-size", "-b", min=1, help="Rows per generate() call."),
    constrained: bool = typer.Option(
        False, "--constrained", help="Decode only answers of the template (known categories, numeric price)."
    ),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Only the first N rows of the split."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output folder (default RUN/eval-SPLIT)."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:1 ... (auto: cuda if present)."),
    dtype: str = typer.Option("auto", "--dtype", help="float32, bfloat16, float16 (auto: bf16 on GPU)."),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed for the confidence intervals."),
    compiled: bool | None = typer.Option(
        None,
        "--compile/--no-compile",
        help="Static KV cache + compiled decode step (default: on for CUDA, off on the CPU).",
        show_default=False,
    ),
) -> None:
    """Generate on a split, score title / category / price against the truth and the train-split
    baselines; writes metrics.json, predictions.jsonl and a self-contained report.html."""
    from productvlm.evaluation.run import run_eval

    if not data.is_dir():
        raise UserError(f"--data {data}: no such folder")
    result = run_eval(
        model,
        data,
        split,
        out,
        num_crops,
        batch_size,
        constrained,
        max_new_tokens,
        limit,
        device,
        dtype,
        seed,
        compiled=compiled,
    )
    console.print(metrics_table(result.metrics))
    console.print(
        f"[bold green]done[/] in {result.seconds:.0f}s -> " + ", ".join(str(f) for f in result.files)
    )


def predict_command(
    images: list[Path] | None = typer.Argument(None, help="Image files.", show_default=False),
    model: str = typer.Option(
        ..., "--model", "-m", help="Model folder, run folder (= its final/) or adapter."
    ),
    input_csv: Path | None = typer.Option(None, "--input", "-i", help="CSV with a column of image paths."),
    column: str = typer.Option("image", "--column", help="The CSV column holding the image paths."),
    output: Path | None = typer.Option(None, "--output", "-o", help="JSON lines file (default: stdout)."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1),
    num_crops: int | None = typer.Option(None, "--num-crops", min=1, max=16, help="Default: as trained."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
    device: str = typer.Option("auto", "--device"),
    dtype: str = typer.Option("auto", "--dtype"),
    compiled: bool | None = typer.Option(
        None,
        "--compile/--no-compile",
        help="Static KV cache + compiled decode step (default: on for CUDA, off on the CPU).",
        show_default=False,
    ),
) -> None:
    """Catalog entries for product photos: one JSON object per image (file, title, category, price, raw)."""
    from productvlm.evaluation.predict import check_images, predict, read_image_csv
    from productvlm.inference.predictor import Predictor

    if bool(images) == bool(input_csv):
        raise UserError("give image files or --input FILE.csv (one of the two)")
    if input_csv is not None:
        paths = read_image_csv(input_csv, column)
        check_images(paths, where=str(input_csv))
    else:
        paths = [str(p) for p in images]
        check_images(paths)
    predictor = Predictor(model, num_crops, device, dtype, max_new_tokens, compiled)
    records = predict(predictor, paths, batch_size, progress=True)
    lines = "".join(json.dumps(r) + "\n" for r in records)
    if output is None:
        sys.stdout.write(lines)
        sys.stdout.flush()
        return
    from productvlm.evaluation.run import write_atomic

    output.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(output, lines)
    console.print(f"[bold green]done[/] {len(records)} predictions -> {output}")
