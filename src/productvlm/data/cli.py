"""`productvlm data ...`: synth, import, stats."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from productvlm.errors import UserError

if TYPE_CHECKING:  # imported lazily at run time: `--help` stays fast
    from productvlm.data.importer import ImportResult

app = typer.Typer(no_args_is_help=True)
console = Console()


def _parse_fractions(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.replace("/", ",").split(","))
    except ValueError:
        raise UserError(f"--split {text!r}: expected three numbers like 80,10,10 or 0.8,0.1,0.1") from None
    total = sum(parts)
    if len(parts) != 3 or total <= 0:
        raise UserError(f"--split {text!r}: expected three numbers (train, validation, test) like 80,10,10")
    return (parts[0] / total, parts[1] / total, parts[2] / total)


@app.command()
def synth(
    out: Path = typer.Option(..., "--out", "-o", help="Folder to create (must be empty unless --overwrite)."),
    rows: int = typer.Option(1000, "--rows", "-n", help="Number of products (rows) to generate."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same rows and byte-identical images."),
    workers: int = typer.Option(0, "--workers", help="Render processes (0 = one per CPU core)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing dataset in --out."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    kind: str = typer.Option(
        "fashion",
        "--kind",
        help="fashion (9 balanced categories), home (8 home-goods categories, other photo sizes and "
        "price rule), longtail (shaped like the real price lists: Zipf categories, N.A., 35 to 570k), "
        "numerals (10 tees told apart only by a printed glyph; b/d, p/q, R/reversed R are mirror pairs, so do not "
        "flip them in training) or close (5 bags told apart only by small symmetric details).",
    ),
    split: str = typer.Option("80,10,10", "--split", help="train,validation,test proportions."),
) -> None:
    """Make a synthetic catalog: Burberry-style columns and one rendered photo per product.

    The photo determines the answers: silhouette -> category3_code (9 categories), colour and material/pattern -> title words, category x material x size -> full_price (about 4% noise).

    Split by product_code hash (--split, 80/10/10 by default). Deterministic: the same seed gives
    byte-identical files.
    """
    from productvlm.data.synth import synthesize

    info = synthesize(
        out,
        rows=rows,
        seed=seed,
        workers=workers or None,
        overwrite=overwrite,
        progress=not quiet,
        kind=kind,
        fractions=_parse_fractions(split),
    )
    counts = ", ".join(f"{k} {v}" for k, v in info["counts"].items())
    rate = rows / info["seconds"]
    console.print(
        f"wrote {rows} rows ({counts}) in {info['seconds']:.1f}s, {rate:.0f} rows/s", soft_wrap=True
    )
    console.print(
        f"files: {out}/<split>/metadata.jsonl, {out}/<split>/images/*.jpg, {out}/dataset.json", soft_wrap=True
    )


@app.command("import")
def import_cmd(
    source: str = typer.Argument(
        ..., help="A local .csv/.tsv/.parquet/.jsonl file, or a hub dataset id (streamed)."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Dataset folder to write; rerun with the same --out to resume."
    ),
    map_: list[str] = typer.Option(
        [], "--map", "-m", help="Column mapping CATALOG=SOURCE, repeatable, e.g. --map title=product_name."
    ),
    image_column: str = typer.Option(
        None,
        "--image-column",
        help="Source column with image URLs (http/https) or file paths (default: imageurl).",
    ),
    hub_split: str = typer.Option("train", "--hub-split", help="Split to read when SOURCE is a hub dataset."),
    limit: int = typer.Option(None, "--limit", help="Import only the first N rows of the source."),
    concurrency: int = typer.Option(32, "--concurrency", "-j", help="Downloads in flight overall."),
    per_host: int = typer.Option(8, "--per-host", help="Downloads in flight per host."),
    timeout: float = typer.Option(30.0, "--timeout", help="Seconds allowed per request attempt."),
    retries: int = typer.Option(
        3, "--retries", help="Retries on 5xx, 429, timeouts, connection errors (none on 4xx)."
    ),
    backoff: float = typer.Option(
        0.5, "--backoff", help="First retry wait in seconds; doubles per retry, with jitter."
    ),
    max_pixels: int = typer.Option(
        40_000_000, "--max-pixels", help="Refuse images with more pixels (checked before decoding)."
    ),
    min_side: int = typer.Option(16, "--min-side", help="Refuse images with a side shorter than this (px)."),
    split: str = typer.Option("80,10,10", "--split", help="train,validation,test proportions."),
    split_seed: int = typer.Option(
        0, "--split-seed", help="Seed of the product_code hash that assigns splits."
    ),
    split_stratify: bool = typer.Option(
        False, "--split-stratify", help="Same split proportions within every category3_code."
    ),
    currency: str = typer.Option(
        None,
        "--currency",
        help="ISO code of the prices (e.g. USD), recorded in dataset.json; a price written with another code is refused.",
    ),
    max_price: float = typer.Option(
        1e9, "--max-price", help="Refuse prices above this as absurd (zero and negative are always refused)."
    ),
    min_per_category: int = typer.Option(
        1,
        "--min-per-category",
        help="Leave out categories with fewer rows than this (each row listed in failures.csv).",
    ),
    drop_category: list[str] = typer.Option(
        [], "--drop-category", help="Leave out this category3_code (ignoring case), repeatable, e.g. N.A."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Import a catalog table with image URLs or paths into a dataset folder.

    Required columns (after --map): product_code, title, category3_code, full_price and the image column.

    Product codes may be any text (SKUs like AB-1290-BLK); prices may be formatted ($1,290.00, 1.290,00 €). Images are fetched concurrently with retries, validated and stored as RGB JPEG; a rerun skips what is already there. Rows left out are listed in OUT/failures.csv with a reason (row = 1-based data row, header not counted).
    """
    from productvlm.data.fetch import FetchOptions
    from productvlm.data.images import ImageLimits
    from productvlm.data.importer import Categories, import_dataset
    from productvlm.data.rows import RowRules, parse_mapping

    for name, value in (("--retries", retries), ("--timeout", timeout), ("--backoff", backoff)):
        if value < 0:
            raise UserError(f"{name} must not be negative, got {value}")
    if currency is not None and not re.fullmatch(r"[A-Za-z]{3}", currency.strip()):
        raise UserError(f"--currency {currency!r}: expected a three-letter ISO code such as USD, EUR or KRW")
    if not max_price > 0:
        raise UserError(f"--max-price must be above 0, got {max_price}")
    result = import_dataset(
        source,
        out,
        mapping=parse_mapping(map_, image_column),
        fetch=FetchOptions(
            concurrency=concurrency, per_host=per_host, timeout=timeout, retries=retries, backoff=backoff
        ),
        limits=ImageLimits(max_pixels=max_pixels, min_side=min_side),
        rules=RowRules(currency=currency.strip().upper() if currency else None, max_price=max_price),
        categories=Categories(drop=tuple(drop_category), min_rows=min_per_category),
        split_seed=split_seed,
        fractions=_parse_fractions(split),
        stratify=split_stratify,
        hub_split=hub_split,
        limit=limit,
        progress=not quiet,
    )
    _print_import_summary(result)


def _print_import_summary(result: ImportResult) -> None:
    t = Table(title=f"Imported into {result.out_dir}")
    t.add_column("")
    t.add_column("count", justify="right")
    t.add_row("source rows", str(result.source_rows))
    for split, n in result.counts.items():
        t.add_row(f"rows in {split}", str(n))
    t.add_row("rows left out", str(len(result.failures)))
    t.add_row("images fetched now", str(result.images_fetched))
    t.add_row("images already present", str(result.images_reused))
    t.add_row("images failed", str(result.images_failed))
    t.add_row("MB downloaded or read", f"{result.bytes_fetched / 1e6:.1f}")
    t.add_row("seconds", f"{result.seconds:.1f}")
    console.print(t)
    if result.failures:
        r = Table(title=f"Rows left out, by reason (details in {result.out_dir}/failures.csv)")
        r.add_column("reason")
        r.add_column("rows", justify="right")
        for reason, n in result.reasons().most_common():
            r.add_row(reason, str(n))
        console.print(r)


@app.command()
def stats(
    dataset_dir: Path = typer.Argument(
        ..., help="A dataset folder written by `data synth` or `data import`."
    ),
    html: Path = typer.Option(
        None, "--html", help="Where to write the HTML page (default: DATASET_DIR/stats.html)."
    ),
    json_out: Path = typer.Option(None, "--json", help="Also write the numbers as JSON here."),
) -> None:
    """Rows per split and category, prices, image sizes, image tokens at num_crops 1/4/16 and the token budget."""
    from productvlm.data.stats import compute_stats, print_stats
    from productvlm.data.stats_page import write_html

    result = compute_stats(dataset_dir)
    print_stats(result, console)
    page = write_html(result, html or dataset_dir / "stats.html")
    console.print(f"wrote {page}")
    if json_out:
        json_out.write_text(json.dumps(result.summary, indent=2))
        console.print(f"wrote {json_out}")
