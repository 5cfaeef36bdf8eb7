"""`predict` over a whole catalog: a stream of inputs -> one row per input, resumable, sharded over
processes, with per-field confidence and `needs_review`.

Inputs (`catalog_items`) are image files, a table (CSV / TSV / Parquet / JSON lines / a hub dataset,
read as a stream by `data.source.stream_table`) with a column of image paths or URLs, or a dataset
folder's split. They are cut into chunks of `chunk_rows` in input order; chunk k belongs to rank
k % world, and each chunk is written as its own part file (temp + rename) in `OUT.parts/`, so a rerun
skips the chunks already there and only a chunk in flight is redone. When every part is there, the
main rank merges them in chunk order into OUT (JSON lines, CSV or Parquet by its suffix) and removes
the parts. A chunk is batched the same way whichever rank runs it, so the output does not depend on
the number of processes. A photo that cannot be read (missing file, bad URL, not an image, far too
elongated to crop) gives a row with its `error`, and the run goes on. A loader thread reads, fetches and
prepares (prompt ids, pixels) the next chunk while the current one generates.
"""

from __future__ import annotations

import asyncio
import csv
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from PIL import Image

from productvlm.data.fetch import Fetcher, FetchError, FetchOptions
from productvlm.data.folder import METADATA, check_dataset_dir
from productvlm.data.images import BadImage, decode_photo
from productvlm.data.progress import progress_bar
from productvlm.data.rows import ImageSource, RowRejected, parse_image_source
from productvlm.data.source import stream_table
from productvlm.errors import UserError
from productvlm.inference.inputs import Prepared, photo_tensors, prompt_ids
from productvlm.inference.predictor import Predictor
from productvlm.prompting.confidence import FIELDS, needs_review
from productvlm.prompting.parse import parse_answer

COLUMNS = (
    "id",
    "image",
    "title",
    "category",
    "price",
    *(f"confidence_{f}" for f in FIELDS),
    "needs_review",
    "raw",
    "error",
)
OUTPUT_SUFFIXES = (".jsonl", ".ndjson", ".csv", ".parquet")
ID_COLUMNS = ("id", "product_code", "sku")
IMAGE_COLUMNS = ("image", "imageurl", "image_url", "file_name")
CHUNK_ROWS = 256
RUN_FILE = "run.json"


@dataclass
class Item:
    """One input row: its place in the input, its id, its image (as given and where to read it), the
    row's columns (for prompts that use them), or why its image cannot be read at all."""

    index: int
    id: str
    image: str
    source: ImageSource | None
    row: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


# ---- inputs -----------------------------------------------------------------------------------------


def file_items(paths: Sequence[str | Path]) -> Iterator[Item]:
    for i, p in enumerate(paths):
        yield Item(i, str(p), str(p), ImageSource("path", str(Path(p).expanduser().resolve())))


def _pick(
    columns: Sequence[str], given: str | None, defaults: Sequence[str], what: str, where: str
) -> str | None:
    if given is not None:
        if given not in columns:
            raise UserError(
                f"{where}: no column {given!r} (columns: {', '.join(columns) or 'none'}); name the {what} with "
                f"--{what.replace(' ', '-')}"
            )
        return given
    return next((c for c in defaults if c in columns), None)


def table_items(
    source: str, column: str | None = None, id_column: str | None = None, hub_split: str = "train"
) -> Iterator[Item]:
    """The rows of a table (streamed): the image from `column` (a path relative to the table's folder, or
    an http(s) URL), the id from `id_column` (default: id, product_code or sku, else the row number)."""
    stream = stream_table(source, hub_split)
    image_col = _pick(stream.columns, column, IMAGE_COLUMNS, "column", source)
    if image_col is None:
        raise UserError(
            f"{source}: no column 'image' (columns: {', '.join(stream.columns) or 'none'}); "
            "name the image column with --column"
        )
    id_col = _pick(stream.columns, id_column, ID_COLUMNS, "id column", source)
    for i, row in enumerate(stream.rows):
        value = row.get(image_col)
        ident = row.get(id_col) if id_col else None
        item = Item(i, str(ident if ident not in (None, "") else i + 1), str(value or ""), None, row)
        try:
            item.source = parse_image_source(value, stream.base_dir)
        except RowRejected as e:
            item.error = str(e)
        yield item


def dataset_items(data: Path, split: str) -> Iterator[Item]:
    """A dataset folder's split (its metadata.jsonl, streamed), ids from `product_code`."""
    path = check_dataset_dir(data) / split / METADATA
    if not path.is_file():
        raise UserError(f"{data}: no split {split!r} ({path} is missing); choose another with --split")
    return table_items(str(path), "file_name", "product_code")


# ---- photos -----------------------------------------------------------------------------------------


async def _fetch_all(urls: list[str], opts: FetchOptions) -> list[bytes | str]:
    async with Fetcher(opts) as fetcher:

        async def one(url: str) -> bytes | str:
            try:
                return await fetcher.get(url)
            except FetchError as e:
                return f"download failed: {e}"

        return await asyncio.gather(*(one(u) for u in urls))


def load_photos(items: Sequence[Item], fetch: FetchOptions) -> list[Image.Image | str]:
    """Each item's decoded photo, or the reason it has none (URLs fetched concurrently)."""
    urls = [it.source.location for it in items if it.source and it.source.kind == "url"]
    fetched = iter(asyncio.run(_fetch_all(urls, fetch)) if urls else [])
    out: list[Image.Image | str] = []
    for it in items:
        if it.error or it.source is None:
            out.append(it.error or "no image")
            continue
        if it.source.kind == "url":
            data = next(fetched)
            if isinstance(data, str):
                out.append(data)
                continue
        else:
            try:
                data = Path(it.source.location).read_bytes()
            except FileNotFoundError:
                out.append(f"no such file: {it.source.location}")
                continue
            except OSError as e:
                out.append(f"cannot read {it.source.location} ({e.strerror or type(e).__name__})")
                continue
        try:
            out.append(decode_photo(data))
        except BadImage as e:
            out.append(str(e))
    return out


# ---- one chunk -> rows --------------------------------------------------------------------------------


def record(item: Item, predictor: Predictor | None, answer, thresholds: dict[str, float]) -> dict[str, Any]:
    """One output row (COLUMNS) from an answer (`inference.generate.Generated`), or from the item's error."""
    out: dict[str, Any] = dict.fromkeys(COLUMNS)
    out.update(id=item.id, image=item.image)
    if isinstance(answer, str):
        out.update(error=answer, needs_review=True)
        return out
    a = parse_answer(answer.text)
    confidence = predictor.confidence(answer)
    price = a.price if a.price is not None and math.isfinite(a.price) else None  # "9"*400 is inf
    out.update(title=a.title, category=a.category, price=price, raw=answer.text)
    out.update({f"confidence_{f}": round(c, 4) for f, c in confidence.items()})
    out["needs_review"] = needs_review(confidence, thresholds)
    return out


def prepare_photos(
    predictor: Predictor, items: Sequence[Item], photos: Sequence[Image.Image | str]
) -> list[Prepared | str]:
    """Each readable photo as model inputs (`inputs.Prepared`: prompt ids and pixels), or why it has none.
    Run in the loader thread, so it overlaps the generation of the chunk before. A photo the HD transform
    cannot cut into crops (far too elongated) is its row's error; a prompt mistake stops the run."""
    processor, num_crops = predictor.processor, predictor.num_crops
    out: list[Prepared | str] = []
    for item, photo in zip(items, photos):
        if isinstance(photo, str):
            out.append(photo)
            continue
        ids = prompt_ids(processor, predictor.settings.prompt_for(item.row), [photo.size], num_crops)
        try:
            out.append(Prepared(ids, **photo_tensors(processor, [photo], num_crops)))
        except (UserError, ValueError) as e:
            out.append(f"cannot predict: {e}")
    return out


def load_chunk(predictor: Predictor, items: Sequence[Item], fetch: FetchOptions) -> list[Prepared | str]:
    """`prepare_photos` of the chunk's photos (read or fetched)."""
    return prepare_photos(predictor, items, load_photos(items, fetch))


def predict_chunk(
    predictor: Predictor,
    items: Sequence[Item],
    prepared: Sequence[Prepared | str],
    batch_size: int,
    thresholds: dict[str, float],
    advance: Callable[[int], None] = lambda n: None,
) -> list[dict[str, Any]]:
    """Rows for a chunk (`load_chunk`), in order: the prepared photos in batches of `batch_size`, the rest
    as errors."""
    answers: list[Any] = list(prepared)  # an error string, or replaced by the photo's answer
    good = [i for i, p in enumerate(prepared) if not isinstance(p, str)]
    for start in range(0, len(good), batch_size):
        idx = good[start : start + batch_size]
        try:
            generated = predictor.answer_prepared([prepared[i] for i in idx])
        except UserError:
            raise
        except (ValueError, RuntimeError) as e:  # one photo the model cannot take: find it alone
            if "out of memory" in str(e):
                raise  # the batch is too large for the device, not a bad photo
            if len(idx) == 1:
                generated = [f"cannot predict: {type(e).__name__}: {e}"]
            else:
                generated = [
                    predict_chunk(predictor, [items[i]], [prepared[i]], 1, thresholds)[0] for i in idx
                ]
        for i, g in zip(idx, generated):
            answers[i] = g
        advance(len(idx))
    advance(len(items) - len(good))
    return [
        a if isinstance(a, dict) else record(it, predictor, a, thresholds) for it, a in zip(items, answers)
    ]


def chunks(items: Iterator[Item], size: int) -> Iterator[tuple[int, list[Item]]]:
    for k in range(sys.maxsize):
        block = list(islice(items, size))
        if not block:
            return
        yield k, block


# ---- output -------------------------------------------------------------------------------------------


def output_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise UserError(
            f"--output {path}: unknown format {suffix or '(no suffix)'}; use .jsonl, .csv or .parquet"
        )
    return {".ndjson": ".jsonl"}.get(suffix, suffix)


def _jsonl(rows: Sequence[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_part(parts: Path, k: int, rows: Sequence[dict[str, Any]]) -> None:
    """PARTS/<k>.jsonl, whole or not at all (temp + fsync + rename)."""
    final = parts / f"{k:08d}.jsonl"
    tmp = parts / f".{final.name}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(_jsonl(rows))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)


def part_rows(parts: Path, k: int) -> list[dict[str, Any]]:
    with open(parts / f"{k:08d}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def merge_parts(parts: Path, n_chunks: int, out: Path) -> dict[str, int]:
    """Parts 0..n-1 -> OUT in their order (one part in memory at a time), written atomically; counts."""
    fmt = output_format(out)
    missing = [k for k in range(n_chunks) if not (parts / f"{k:08d}.jsonl").is_file()]
    if missing:
        raise UserError(f"{parts}: parts {missing[:5]} are missing; rerun the same command to make them")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    counts = {"rows": 0, "failed": 0, "review": 0}
    with open(tmp, "w" if fmt != ".parquet" else "wb", **({"newline": ""} if fmt == ".csv" else {})) as f:
        writer = _csv_writer(f) if fmt == ".csv" else None  # the header even without rows
        for k in range(n_chunks):
            rows = part_rows(parts, k)
            counts["rows"] += len(rows)
            counts["failed"] += sum(r["error"] is not None for r in rows)
            counts["review"] += sum(bool(r["needs_review"]) for r in rows)
            if fmt == ".jsonl":
                f.write(_jsonl(rows))
            elif fmt == ".csv":
                writer.writerows(rows)
            else:
                writer = writer or _parquet_writer(f)
                writer.write_table(_arrow(rows))
        if fmt == ".parquet":
            (writer or _parquet_writer(f)).close()
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return counts


def _csv_writer(f) -> csv.DictWriter:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    return writer


def _schema():
    import pyarrow as pa

    types = {
        "price": pa.float64(),
        "needs_review": pa.bool_(),
        **{f"confidence_{f}": pa.float64() for f in FIELDS},
    }
    return pa.schema([(c, types.get(c, pa.string())) for c in COLUMNS])


def _parquet_writer(f):
    import pyarrow.parquet as pq

    return pq.ParquetWriter(f, _schema())


def _arrow(rows: Sequence[dict[str, Any]]):
    import pyarrow as pa

    return pa.Table.from_pylist(list(rows), schema=_schema())


# ---- the run ------------------------------------------------------------------------------------------


@dataclass
class Ranks:
    """This process's place among the processes sharing the run (torchrun / accelerate launch)."""

    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = lambda: None
    gather: Callable[[int], list[int]] = lambda n: [n]

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched_ranks(device: str = "auto") -> Ranks:
    """One process, or accelerate's `PartialState` when launched with several (WORLD_SIZE > 1): gloo
    for CPU processes (no CUDA, or `--device cpu`), the accelerator's backend otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
    if state.num_processes != world:
        raise UserError(f"launched as {world} processes, but accelerate sees {state.num_processes}")
    return Ranks(state.process_index, world, state.wait_for_everyone, lambda n: gather_object([n]))


@dataclass
class Summary:
    rows: int
    failed: int
    review: int
    predicted: int  # rows this run generated (all ranks), the rest came from parts of an earlier run
    seconds: float

    @property
    def photos_per_s(self) -> float:
        return self.predicted / self.seconds if self.seconds > 0 else 0.0


def prepare_parts(parts: Path, identity: dict[str, Any], ranks: Ranks) -> None:
    """PARTS/ with run.json naming what the parts were made with; parts of another run are refused."""
    if ranks.main:
        parts.mkdir(parents=True, exist_ok=True)
        if not (parts / RUN_FILE).is_file():
            tmp = parts / f".{RUN_FILE}.tmp"
            tmp.write_text(json.dumps(identity, indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, parts / RUN_FILE)
    ranks.barrier()
    try:
        before = json.loads((parts / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{parts / RUN_FILE}: unreadable ({e}); delete {parts} to start over") from None
    if before != identity:
        changed = sorted(k for k in {*before, *identity} if before.get(k) != identity.get(k))
        raise UserError(
            f"{parts} holds parts of a run with other settings ({', '.join(changed)}); rerun the same command "
            f"to finish it, or delete {parts} to start over"
        )


def predict_catalog(
    predictor: Predictor,
    items: Callable[[], Iterator[Item]],
    out: Path | None,
    identity: dict[str, Any],
    thresholds: dict[str, float],
    batch_size: int = 8,
    chunk_rows: int = CHUNK_ROWS,
    ranks: Ranks | None = None,
    fetch: FetchOptions | None = None,
    progress: bool = True,
    total: int | None = None,
) -> Summary:
    """Predict every item; to OUT (resumable, sharded over `ranks`) or, without OUT, JSON lines on stdout.
    `items()` starts the input stream again (each rank reads it whole and takes its own chunks)."""
    ranks = ranks or Ranks()
    fetch = fetch or FetchOptions(retries=2, timeout=30.0)
    t0 = time.perf_counter()
    parts = None
    if out is not None:
        output_format(out)
        parts = out.with_name(out.name + ".parts")
        prepare_parts(parts, identity, ranks)
    elif ranks.world > 1:
        raise UserError("several processes need --output FILE (each writes its own parts of it)")

    def mine(k: int) -> bool:
        return k % ranks.world == ranks.rank and (parts is None or not (parts / f"{k:08d}.jsonl").is_file())

    todo = (
        None
        if total is None
        else sum(min(chunk_rows, total - k * chunk_rows) for k in range(-(-total // chunk_rows)) if mine(k))
    )
    done, seen = 0, [0]  # rows generated here; chunks in the input (known once it is read to the end)
    counts = {"rows": 0, "failed": 0, "review": 0}

    def my_chunks() -> Iterator[tuple[int, list[Item]]]:
        for k, block in chunks(items(), chunk_rows):
            seen[0] = k + 1
            if mine(k):
                yield k, block

    with (
        ThreadPoolExecutor(1, thread_name_prefix="photos") as loader,
        progress_bar("predicting", todo, enabled=progress and ranks.main, unit="photos") as advance,
    ):
        pending = my_chunks()
        nxt = next(pending, None)
        ahead = loader.submit(load_chunk, predictor, nxt[1], fetch) if nxt else None
        while nxt is not None:
            (k, block), prepared = nxt, ahead.result()
            nxt = next(pending, None)  # read, fetch and prepare the next chunk while this one generates
            ahead = loader.submit(load_chunk, predictor, nxt[1], fetch) if nxt else None
            rows = predict_chunk(predictor, block, prepared, batch_size, thresholds, advance)
            done += len(rows)
            if parts is None:
                sys.stdout.write(_jsonl(rows))
                sys.stdout.flush()
                counts["rows"] += len(rows)
                counts["failed"] += sum(r["error"] is not None for r in rows)
                counts["review"] += sum(bool(r["needs_review"]) for r in rows)
            else:
                write_part(parts, k, rows)
    predicted = sum(ranks.gather(done))
    if parts is None:
        return Summary(**counts, predicted=predicted, seconds=time.perf_counter() - t0)
    ranks.barrier()
    if ranks.main:
        counts = merge_parts(parts, seen[0], out)
        shutil.rmtree(parts, ignore_errors=True)
    ranks.barrier()
    return Summary(**counts, predicted=predicted, seconds=time.perf_counter() - t0)


def predict(
    predictor: Predictor, images: Sequence[str | Path], batch_size: int = 8, progress: bool = True
) -> list[dict[str, Any]]:
    """Rows (COLUMNS) for image files, in memory: for a few photos from Python."""
    items = list(file_items(images))
    thresholds = dict.fromkeys(FIELDS, 0.5)
    return predict_chunk(
        predictor, items, load_chunk(predictor, items, FetchOptions()), batch_size, thresholds
    )


__all__ = [
    "COLUMNS",
    "Item",
    "Ranks",
    "Summary",
    "file_items",
    "table_items",
    "dataset_items",
    "load_photos",
    "prepare_photos",
    "load_chunk",
    "predict_chunk",
    "predict_catalog",
    "merge_parts",
    "launched_ranks",
    "predict",
]
