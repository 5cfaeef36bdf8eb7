"""`productvlm eval` and `productvlm predict` (plain typer command functions; the main app registers them)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from productvlm.errors import UserError
from productvlm.inference.cli_options import (
    Compiled,
    Device,
    Dtype,
    NumCrops,
    ReviewBelow,
    TargetAccuracy,
    check_review_options,
)

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


def confidence_table(metrics: dict[str, Any]) -> Table:
    """Per field: ECE before / after calibration and accuracy of the most confident 50 / 80 / 100%."""
    block = metrics.get("confidence", {})
    cal = block.get("calibrated_on", {})
    table = Table(
        "field",
        "ECE raw",
        "ECE",
        "[dim]95% CI[/]",
        "acc. @50%",
        "acc. @80%",
        "[dim]95% CI[/]",
        "acc. @100%",
        title=f"confidence, calibrated on {cal.get('split')} ({cal.get('rows')} rows)",
    )
    for field, b in block.items():
        if field == "calibrated_on":
            continue
        table.add_row(
            field,
            _cell(b, None, "ece_raw", True),
            f"[bold]{_cell(b, None, 'ece', True)}[/]",
            f"[dim]{_cell(b, None, 'ece', True, ci=True)}[/]",
            _cell(b, None, "accuracy_at_50", True),
            f"[bold]{_cell(b, None, 'accuracy_at_80', True)}[/]",
            f"[dim]{_cell(b, None, 'accuracy_at_80', True, ci=True)}[/]",
            _cell(b, None, "accuracy_at_100", True),
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
    num_crops: NumCrops = None,
    batch_size: int = typer.Option(16, "--batch-size", "-b", min=1, help="Rows per generate() call."),
    constrained: bool = typer.Option(
        False, "--constrained", help="Decode only answers of the template (known categories, numeric price)."
    ),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Only the first N rows of the split."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output folder (default RUN/eval-SPLIT)."),
    device: Device = "auto",
    dtype: Dtype = "auto",
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed for the confidence intervals."),
    compiled: Compiled = None,
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
    console.print(confidence_table(result.metrics))
    console.print(
        f"[bold green]done[/] in {result.seconds:.0f}s -> " + ", ".join(str(f) for f in result.files)
    )


def predict_command(
    images: list[Path] | None = typer.Argument(None, help="Image files.", show_default=False),
    model: str = typer.Option(
        ..., "--model", "-m", help="Model folder, run folder (= its final/) or adapter."
    ),
    input_table: str | None = typer.Option(
        None,
        "--input",
        "-i",
        help="A table with image paths or http(s) URLs: CSV, TSV, Parquet, JSON lines, or a hub dataset id.",
    ),
    column: str | None = typer.Option(
        None, "--column", help="The table's image column (default: image, imageurl, image_url or file_name)."
    ),
    id_column: str | None = typer.Option(
        None,
        "--id-column",
        help="The table's id column (default: id, product_code or sku, else the row number).",
    ),
    hub_split: str = typer.Option("train", "--hub-split", help="Split of a hub dataset given as --input."),
    data: Path | None = typer.Option(None, "--data", "-d", help="A dataset folder (with --split)."),
    split: str = typer.Option("test", "--split", help="The dataset folder's split."),
    output: Path | None = typer.Option(
        None, "--output", "-o", help=".jsonl, .csv or .parquet; resumable (default: JSON lines on stdout)."
    ),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1),
    chunk_rows: int = typer.Option(
        256, "--chunk-rows", min=1, help="Rows per part file (the unit of resuming and of sharding)."
    ),
    review_below: ReviewBelow = None,
    target_accuracy: TargetAccuracy = None,
    num_crops: NumCrops = None,
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
    device: Device = "auto",
    dtype: Dtype = "auto",
    compiled: Compiled = None,
) -> None:
    """Catalog entries for product photos: one row per input (id, image, title, category, price, per-field
    confidence, needs_review, raw, error). Several processes: `torchrun --nproc-per-node N -m productvlm
    predict ... --output FILE` (README, "Predict a whole catalog")."""
    from productvlm.evaluation.predict import (
        dataset_items,
        file_items,
        launched_ranks,
        predict_catalog,
        table_items,
    )
    from productvlm.inference.predictor import Predictor
    from productvlm.prompting.confidence import review_thresholds

    if sum(x is not None and x != [] for x in (images, input_table, data)) != 1:
        raise UserError("give image files, --input TABLE or --data DIR (one of the three)")
    check_review_options(review_below, target_accuracy)
    if images:
        items = lambda: file_items(images)  # noqa: E731
        source = [str(Path(p).resolve()) for p in images]
    elif input_table is not None:
        items = lambda: table_items(input_table, column, id_column, hub_split)  # noqa: E731
        source = {"table": input_table, "column": column, "id_column": id_column, "hub_split": hub_split}
    else:
        items = lambda: dataset_items(data, split)  # noqa: E731
        source = {"data": str(data.resolve()), "split": split}
    next(items(), None)  # a bad source or column fails here, before the model loads
    ranks = launched_ranks(device)
    if ranks.world > 1 and device == "auto":
        from accelerate import PartialState

        device = str(PartialState().device)
    predictor = Predictor(model, num_crops, device, dtype, max_new_tokens, compiled)
    if predictor.calibration is None and ranks.main:
        console.print(
            "[yellow]the model has no calibration.json: confidences are raw token scores[/] "
            "(`productvlm eval` calibrates it on the validation split)"
        )
    elif predictor.calibration is not None and predictor.calibration.constrained and ranks.main:
        console.print(
            "[yellow]calibration.json was fitted on --constrained answers; predict decodes freely[/]"
        )
    thresholds = review_thresholds(predictor.calibration, review_below, target_accuracy)
    identity = {
        "source": source,
        "model": str(predictor.model_dir),
        "num_crops": predictor.num_crops,
        "max_new_tokens": max_new_tokens,
        "chunk_rows": chunk_rows,
        "thresholds": thresholds,
    }
    counted = ranks.main and (
        input_table is None or Path(input_table).exists()
    )  # the bar's total (main rank's)
    total = sum(1 for _ in items()) if counted else None
    summary = predict_catalog(
        predictor, items, output, identity, thresholds, batch_size, chunk_rows, ranks, total=total
    )
    if ranks.main:
        share = summary.review / summary.rows if summary.rows else 0.0
        console.print(
            f"[bold green]done[/] {summary.rows:,} rows ({summary.failed:,} failed, {share:.1%} sent to review), "
            f"{summary.predicted:,} predicted now at {summary.photos_per_s:.1f} photos/s"
            + (f" -> {output}" if output else "")
        )
