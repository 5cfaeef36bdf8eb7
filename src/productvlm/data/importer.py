"""`data import`: a catalog table (local file or hub dataset) with image URLs/paths -> a dataset folder.

1. read the table, map its columns, check every row (rejects go to failures.csv with a reason);
2. split the rows by product_code hash (optionally stratified by category3_code);
3. fetch each distinct image once (concurrently, with retries), validate it, store it atomically as
   `<split>/images/<hash of source>.jpg`; an image already there from an earlier run is not fetched;
4. write `<split>/metadata.jsonl`, `failures.csv` and `dataset.json`.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from productvlm.data import folder
from productvlm.data.fetch import Fetcher, FetchError, FetchOptions
from productvlm.data.images import BadImage, ImageLimits, is_complete_jpeg, to_dataset_jpeg
from productvlm.data.progress import progress_bar
from productvlm.data.rows import CatalogRow, ImageSource, RowRejected, check_columns, parse_mapping, parse_row
from productvlm.data.source import load_table
from productvlm.errors import UserError

LOCK_FILE = ".import.lock"


@dataclass
class ImageJob:
    """One distinct image source and the splits whose rows use it."""

    key: str
    source: ImageSource
    splits: set[str] = field(default_factory=set)


@dataclass
class ImportResult:
    out_dir: Path
    source_rows: int
    counts: dict[str, int]
    failures: list[tuple[int, str, str]]
    images_fetched: int = 0
    images_reused: int = 0
    images_failed: int = 0
    bytes_fetched: int = 0
    requests: int = 0
    seconds: float = 0.0

    def reasons(self) -> Counter[str]:
        """Failures per reason, details in parentheses dropped ("too many pixels (9000x9000)" -> "too many pixels")."""
        return Counter(reason_kind(reason) for _, _, reason in self.failures)


def reason_kind(reason: str) -> str:
    """A failure reason without its details: "bad url scheme: ftp" -> "bad url scheme"."""
    return reason.split(" (")[0].split(":")[0]


# ---------------------------------------------------------------- rows


def check_rows(
    raw_rows: Sequence[dict[str, Any]], mapping: dict[str, str], base_dir: Path
) -> tuple[list[CatalogRow], list[tuple[int, str, str]]]:
    """Valid rows (first of each product_code) and (row, url, reason) for the others."""
    valid: list[CatalogRow] = []
    failures: list[tuple[int, str, str]] = []
    first_row: dict[int, int] = {}
    image_col = mapping["imageurl"]
    for number, raw in enumerate(raw_rows, 1):
        url = "" if raw.get(image_col) is None else str(raw.get(image_col))
        try:
            row = parse_row(raw, number, mapping, base_dir)
            code = row.values["product_code"]
            if code in first_row:
                raise RowRejected(f"duplicate product_code (first at row {first_row[code]}, code {code})")
        except RowRejected as e:
            failures.append((number, url, str(e)))
            continue
        first_row[code] = number
        valid.append(row)
    return valid, failures


def plan_jobs(rows: Sequence[CatalogRow], splits: Sequence[str]) -> dict[str, ImageJob]:
    jobs: dict[str, ImageJob] = {}
    for row, split in zip(rows, splits):
        key = folder.image_key(row.image.location)
        jobs.setdefault(key, ImageJob(key, row.image)).splits.add(split)
    return jobs


# ---------------------------------------------------------------- files


@contextmanager
def import_lock(out_dir: Path):
    """One import at a time per folder (a killed run's stale lock is taken over)."""
    path = out_dir / LOCK_FILE
    try:
        pid = int(path.read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        pid = 0
    if pid and pid != os.getpid() and _alive(pid):
        raise UserError(f"{out_dir} is being written by another import (pid {pid}); wait for it or stop it")
    path.write_text(str(os.getpid()))
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _image_path(out_dir: Path, split: str, key: str) -> Path:
    return folder.images_dir(out_dir, split) / f"{key}.jpg"


def find_existing(out_dir: Path, key: str) -> Path | None:
    """A complete image for `key` from an earlier run, in any split folder."""
    for split in folder.SPLITS:
        p = _image_path(out_dir, split, key)
        if p.is_file() and is_complete_jpeg(p):
            return p
    return None


def place_copies(src: Path, out_dir: Path, job: ImageJob) -> None:
    """Make the image visible in every split that uses it (hard link, else copy), atomically."""
    for split in job.splits:
        dst = _image_path(out_dir, split, job.key)
        if dst.exists() and (dst.samefile(src) or is_complete_jpeg(dst)):
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.tmp_path_for(dst)
        try:
            os.link(src, tmp)
            os.replace(tmp, dst)
        except OSError:
            tmp.unlink(missing_ok=True)
            folder.atomic_write_bytes(dst, src.read_bytes())


# ---------------------------------------------------------------- downloads


def _read_local(path: str, max_bytes: int) -> bytes:
    p = Path(path)
    try:
        if not p.is_file():
            raise BadImage("file not found")
        if p.stat().st_size > max_bytes:
            raise BadImage(f"too large ({p.stat().st_size} bytes)")
        return p.read_bytes()
    except OSError as e:  # unreadable (permissions, a dangling mount...): this row's failure only
        raise BadImage(f"cannot read file ({e.strerror or type(e).__name__})") from e


def _store(data: bytes, target: Path, limits: ImageLimits) -> None:
    folder.atomic_write_bytes(target, to_dataset_jpeg(data, limits))


async def download_all(
    jobs: Sequence[ImageJob],
    out_dir: Path,
    fetch: FetchOptions,
    limits: ImageLimits,
    advance: Callable[[int], None],
) -> tuple[dict[str, str | None], int, int]:
    """Fetch, validate and store every job; returns ({key: failure reason or None}, requests, bytes)."""
    loop = asyncio.get_running_loop()
    results: dict[str, str | None] = {}
    nbytes = 0
    queue: asyncio.Queue[ImageJob] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)

    async def one(job: ImageJob, fetcher: Fetcher, pool: ThreadPoolExecutor) -> str | None:
        nonlocal nbytes
        target = _image_path(out_dir, min(job.splits, key=folder.SPLITS.index), job.key)
        try:
            if job.source.kind == "url":
                data = await fetcher.get(job.source.location)
            else:
                data = await loop.run_in_executor(pool, _read_local, job.source.location, fetch.max_bytes)
            nbytes += len(data)
            await loop.run_in_executor(pool, _store, data, target, limits)
        except (FetchError, BadImage) as e:
            return str(e)
        await loop.run_in_executor(pool, place_copies, target, out_dir, job)
        return None

    async def worker(fetcher: Fetcher, pool: ThreadPoolExecutor) -> None:
        while not queue.empty():
            job = queue.get_nowait()
            results[job.key] = await one(job, fetcher, pool)
            advance(1)

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        async with Fetcher(fetch) as fetcher:
            n = max(1, min(fetch.concurrency, len(jobs)))
            await asyncio.gather(*(worker(fetcher, pool) for _ in range(n)))
            return results, fetcher.requests, nbytes


# ---------------------------------------------------------------- the verb


def import_dataset(
    source: str,
    out_dir: str | Path,
    *,
    mapping: dict[str, str] | None = None,
    fetch: FetchOptions = FetchOptions(),
    limits: ImageLimits = ImageLimits(),
    split_seed: int = 0,
    fractions: Sequence[float] = folder.DEFAULT_FRACTIONS,
    stratify: bool = False,
    hub_split: str = "train",
    limit: int | None = None,
    progress: bool = True,
) -> ImportResult:
    """Import SOURCE into the dataset folder `out_dir` (resumable: rerun to finish a killed import)."""
    t0 = time.perf_counter()
    fractions = folder.check_fractions(fractions)
    if fetch.concurrency < 1 or fetch.per_host < 1:
        raise UserError("--concurrency and --per-host must be at least 1")
    table = load_table(source, hub_split=hub_split, limit=limit)
    mapping = mapping or parse_mapping([])
    check_columns(table.columns, mapping, table.source)
    rows, failures = check_rows(table.rows, mapping, table.base_dir)
    codes = [r.values["product_code"] for r in rows]
    strata = [r.values["category3_code"] for r in rows] if stratify else None
    splits = folder.assign_splits(codes, split_seed, fractions, strata)
    jobs = plan_jobs(rows, splits)

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a folder: choose another path")
    out_dir.mkdir(parents=True, exist_ok=True)
    result = ImportResult(out_dir, len(table.rows), {}, failures)
    with import_lock(out_dir):
        for split in folder.SPLITS:
            folder.remove_partial_files(folder.images_dir(out_dir, split))
        for split in set(splits):
            folder.images_dir(out_dir, split).mkdir(parents=True, exist_ok=True)
        pending = []
        for job in jobs.values():
            existing = find_existing(out_dir, job.key)
            if existing is None:
                pending.append(job)
            else:
                place_copies(existing, out_dir, job)
                result.images_reused += 1
        with progress_bar(f"images ({result.images_reused} already here)", len(pending), progress) as advance:
            outcome, result.requests, result.bytes_fetched = (
                asyncio.run(download_all(pending, out_dir, fetch, limits, advance)) if pending else ({}, 0, 0)
            )
        result.images_failed = sum(r is not None for r in outcome.values())
        result.images_fetched = len(outcome) - result.images_failed
        rows_by_split: dict[str, list[dict[str, Any]]] = {s: [] for s in folder.SPLITS}
        for row, split in zip(rows, splits):
            key = folder.image_key(row.image.location)
            reason = outcome.get(key)
            if reason is None:
                rows_by_split[split].append({"file_name": f"{folder.IMAGES}/{key}.jpg", **row.values})
            else:
                failures.append((row.number, row.values["imageurl"] or "", reason))
        result.counts = folder.write_splits(out_dir, rows_by_split)
        folder.write_failures(out_dir, failures)
        folder.write_dataset_json(
            out_dir,
            _dataset_info(table.source, table.location, mapping, result, split_seed, fractions, stratify),
        )
    result.failures = sorted(failures)
    result.seconds = time.perf_counter() - t0
    if not any(result.counts.values()):
        raise UserError(_nothing_imported(table.source, out_dir, result))
    return result


def _nothing_imported(source: str, out_dir: Path, result: ImportResult) -> str:
    """A dataset with no rows is no dataset: say why, from the most common failure."""
    (reason, n), *_ = result.reasons().most_common(1)
    row, _, detail = next(f for f in result.failures if reason_kind(f[2]) == reason)
    return (
        f"{source}: none of its {result.source_rows} rows could be imported; {n} failed with '{reason}' "
        f"(first at row {row}: {detail}). Every row and its reason is in {out_dir / folder.FAILURES_CSV}"
    )


def _dataset_info(
    source: str,
    location: str,
    mapping: dict[str, str],
    result: ImportResult,
    seed: int,
    fractions: Sequence[float],
    stratify: bool,
) -> dict[str, Any]:
    return {
        "source": source,
        "source_location": location,
        "kind": "import",
        "column_mapping": mapping,
        "split": {
            "rule": "sha256(seed:product_code)" + (", ranked within category3_code" if stratify else ""),
            "seed": seed,
            "fractions": list(fractions),
            "stratify": "category3_code" if stratify else None,
        },
        "counts": result.counts,
        "rows": result.source_rows,
        "rows_failed": len(result.failures),
        "failure_reasons": dict(result.reasons()),
        "failures_row_numbering": "1-based data row of the source (header not counted)",
    }
