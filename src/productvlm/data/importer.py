"""`data import`: a catalog table (local file or hub dataset) with image URLs/paths -> a dataset folder.

1. read the table, map its columns, check every row (rejects go to failures.csv with a reason);
2. split the rows by product_code hash (optionally stratified by category3_code);
3. fetch each distinct image once (concurrently, with retries), validate it with the one photo decoder
   (`data.images`: allowed formats and limits), store it atomically as `<split>/images/<hash of
   source>.jpg`; an image already there from an earlier run is not fetched;
4. write `<split>/metadata.jsonl`, `failures.csv` and `dataset.json`.
"""

from __future__ import annotations

import asyncio
import errno
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
from productvlm.data.images import BadImage, ImageLimits, ImageTooLarge, is_complete_jpeg, to_dataset_jpeg
from productvlm.data.progress import progress_bar
from productvlm.data.rows import (
    CatalogRow,
    ImageSource,
    RowRejected,
    RowRules,
    check_columns,
    parse_mapping,
    parse_row,
)
from productvlm.data.source import Table, load_table
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
    raw_rows: Sequence[dict[str, Any]], mapping: dict[str, str], base_dir: Path, rules: RowRules = RowRules()
) -> tuple[list[CatalogRow], list[tuple[int, str, str]]]:
    """Valid rows (first of each product_code) and (row, url, reason) for the others.

    Product codes are int64 when every valid one is an integer, else all are text (one type per column:
    Arrow reads metadata.jsonl). Duplicates are found on folder.code_text, so `12` and `"12"` are one.
    """
    valid: list[CatalogRow] = []
    failures: list[tuple[int, str, str]] = []
    first_row: dict[str, int] = {}
    image_col = mapping["imageurl"]
    for number, raw in enumerate(raw_rows, 1):
        url = "" if raw.get(image_col) is None else str(raw.get(image_col))
        try:
            row = parse_row(raw, number, mapping, base_dir, rules)
            code = folder.code_text(row.values["product_code"])
            if code in first_row:
                raise RowRejected(f"duplicate product_code (first at row {first_row[code]}, code {code})")
        except RowRejected as e:
            failures.append((number, url, str(e)))
            continue
        first_row[code] = number
        valid.append(row)
    if any(isinstance(r.values["product_code"], str) for r in valid):
        for r in valid:
            r.values["product_code"] = folder.code_text(r.values["product_code"])
    return valid, failures


def category_filter(
    rows: Sequence[CatalogRow], drop: Sequence[str], min_rows: int, stage: str = ""
) -> tuple[list[CatalogRow], list[tuple[int, str, str]]]:
    """Rows kept, and (row, url, reason) for rows of a --drop-category category (matched ignoring case)
    or of a category with fewer than `min_rows` rows among `rows`."""
    dropped = {d.strip().casefold() for d in drop}
    counts = Counter(r.values["category3_code"] for r in rows)
    kept, out = [], []
    for r in rows:
        cat = r.values["category3_code"]
        if cat.casefold() in dropped:
            reason = f"category dropped: {cat} (--drop-category)"
        elif counts[cat] < min_rows:
            reason = f"rare category: {cat} ({counts[cat]} rows{stage}, --min-per-category {min_rows})"
        else:
            kept.append(r)
            continue
        out.append((r.number, r.values["imageurl"] or "", reason))
    return kept, out


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
            raise ImageTooLarge(f"too large ({p.stat().st_size:,} bytes, over {max_bytes:,})")
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
                data = await loop.run_in_executor(pool, _read_local, job.source.location, limits.max_bytes)
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


@dataclass(frozen=True)
class Categories:
    """Category hygiene: categories to leave out, and the fewest rows a category needs to stay."""

    drop: tuple[str, ...] = ()
    min_rows: int = 1


_DISK_HINTS = {
    errno.ENOSPC: "free some space and run the same command again: it resumes where it stopped",
    errno.EDQUOT: "free some space and run the same command again: it resumes where it stopped",
    errno.EROFS: "choose a writable --out folder",
    errno.EACCES: "choose a writable --out folder",
    errno.EPERM: "choose a writable --out folder",
    errno.ENOENT: "a file or folder was removed while the import ran: run the same command again",
}


@contextmanager
def disk_errors(out_dir: Path):
    """An OSError while writing `out_dir` (full disk, read-only, removed under us) -> one UserError line."""
    try:
        yield
    except OSError as e:
        where = e.filename or out_dir
        code = errno.errorcode.get(e.errno, "?") if e.errno else type(e).__name__
        hint = _DISK_HINTS.get(e.errno, "fix that and run the same command again")
        raise UserError(f"cannot write {where}: {e.strerror or e} ({code}); {hint}") from e


def import_dataset(
    source: str,
    out_dir: str | Path,
    *,
    mapping: dict[str, str] | None = None,
    fetch: FetchOptions = FetchOptions(),
    limits: ImageLimits = ImageLimits(),
    rules: RowRules = RowRules(),
    categories: Categories = Categories(),
    split_seed: int = 0,
    fractions: Sequence[float] = folder.DEFAULT_FRACTIONS,
    stratify: bool = False,
    hub_split: str = "train",
    limit: int | None = None,
    progress: bool = True,
) -> ImportResult:
    """Import SOURCE into the dataset folder `out_dir` (resumable: rerun to finish a killed import).

    A full disk, a read-only folder or a file removed under us ends in one UserError line. Every file
    is written atomically, and metadata, failures.csv and dataset.json are replaced all together.
    """
    t0 = time.perf_counter()
    fractions = folder.check_fractions(fractions)
    if fetch.concurrency < 1 or fetch.per_host < 1:
        raise UserError("--concurrency and --per-host must be at least 1")
    if categories.min_rows < 1:
        raise UserError(f"--min-per-category must be at least 1, got {categories.min_rows}")
    table = load_table(source, hub_split=hub_split, limit=limit)
    mapping = mapping or parse_mapping([])
    check_columns(table.columns, mapping, table.source)
    rows, failures = check_rows(table.rows, mapping, table.base_dir, rules)
    rows, excluded = category_filter(rows, categories.drop, categories.min_rows)
    failures += excluded
    codes = [r.values["product_code"] for r in rows]
    strata = [r.values["category3_code"] for r in rows] if stratify else None
    splits = folder.assign_splits(codes, split_seed, fractions, strata)

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a folder: choose another path")
    result = ImportResult(out_dir, len(table.rows), {}, failures)
    with disk_errors(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        with import_lock(out_dir):
            outcome = _fetch_images(out_dir, plan_jobs(rows, splits), fetch, limits, progress, result)
            rows_by_split = _rows_with_images(rows, splits, outcome, categories.min_rows, failures)
            info = _dataset_info(table, mapping, result, rules, categories, split_seed, fractions, stratify)
            info["counts"] = {s: len(rows_by_split[s]) for s in folder.SPLITS}
            info["rows_failed"], info["failure_reasons"] = len(failures), dict(result.reasons())
            result.counts = folder.write_splits(
                out_dir,
                rows_by_split,
                {
                    out_dir / folder.FAILURES_CSV: folder.failures_bytes(failures),
                    out_dir / folder.DATASET_JSON: folder.dataset_json_bytes(info),
                },
            )
    result.failures = sorted(failures)
    result.seconds = time.perf_counter() - t0
    if not any(result.counts.values()):
        raise UserError(_nothing_imported(table.source, out_dir, result))
    return result


def _fetch_images(
    out_dir: Path,
    jobs: dict[str, ImageJob],
    fetch: FetchOptions,
    limits: ImageLimits,
    progress: bool,
    result: ImportResult,
) -> dict[str, str | None]:
    """Reuse or fetch every image; {key: failure reason or None} for the fetched ones."""
    for split in folder.SPLITS:
        folder.remove_partial_files(folder.images_dir(out_dir, split))
    for split in {s for job in jobs.values() for s in job.splits}:
        folder.images_dir(out_dir, split).mkdir(parents=True, exist_ok=True)
    pending = []
    for job in jobs.values():
        existing = find_existing(out_dir, job.key)
        try:
            if existing is not None:
                place_copies(existing, out_dir, job)
                result.images_reused += 1
                continue
        except FileNotFoundError:  # removed by someone else since we looked: fetch it again
            pass
        pending.append(job)
    with progress_bar(f"images ({result.images_reused} already here)", len(pending), progress) as advance:
        outcome, result.requests, result.bytes_fetched = (
            asyncio.run(download_all(pending, out_dir, fetch, limits, advance)) if pending else ({}, 0, 0)
        )
    result.images_failed = sum(r is not None for r in outcome.values())
    result.images_fetched = len(outcome) - result.images_failed
    return outcome


def _rows_with_images(
    rows: Sequence[CatalogRow],
    splits: Sequence[str],
    outcome: dict[str, str | None],
    min_rows: int,
    failures: list[tuple[int, str, str]],
) -> dict[str, list[dict[str, Any]]]:
    """metadata rows per split; rows whose image failed, or whose category fell under --min-per-category
    because of those, are added to `failures`."""
    split_of_row = dict(zip((r.number for r in rows), splits))
    with_image = []
    for row in rows:
        reason = outcome.get(folder.image_key(row.image.location))
        if reason is None:
            with_image.append(row)
        else:
            failures.append((row.number, row.values["imageurl"] or "", reason))
    kept, rare = category_filter(with_image, (), min_rows, " with an image")
    failures += rare
    rows_by_split: dict[str, list[dict[str, Any]]] = {s: [] for s in folder.SPLITS}
    for row in kept:
        file_name = f"{folder.IMAGES}/{folder.image_key(row.image.location)}.jpg"
        rows_by_split[split_of_row[row.number]].append({"file_name": file_name, **row.values})
    return rows_by_split


def _nothing_imported(source: str, out_dir: Path, result: ImportResult) -> str:
    """A dataset with no rows is no dataset: say why, from the most common failure."""
    (reason, n), *_ = result.reasons().most_common(1)
    row, _, detail = next(f for f in result.failures if reason_kind(f[2]) == reason)
    return (
        f"{source}: none of its {result.source_rows} rows could be imported; {n} failed with '{reason}' "
        f"(first at row {row}: {detail}). Every row and its reason is in {out_dir / folder.FAILURES_CSV}"
    )


def _dataset_info(
    table: Table,
    mapping: dict[str, str],
    result: ImportResult,
    rules: RowRules,
    categories: Categories,
    seed: int,
    fractions: Sequence[float],
    stratify: bool,
) -> dict[str, Any]:
    return {
        "source": table.source,
        "source_location": table.location,
        "kind": "import",
        "column_mapping": mapping,
        "currency": rules.currency,
        "max_price": rules.max_price,
        "categories": {"dropped": list(categories.drop), "min_rows": categories.min_rows},
        "split": {
            "rule": "sha256(seed:product_code)" + (", ranked within category3_code" if stratify else ""),
            "product_code_text": "an integer in decimal; any other code stripped and NFC-normalised",
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
