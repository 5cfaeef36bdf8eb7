"""The dataset folder: one format for `data synth` and `data import`, read by training and `datasets`.

```
DIR/
  train/metadata.jsonl      one JSON object per row: file_name ("images/<key>.jpg") + catalog columns
  train/images/<key>.jpg    <key> = hash of the source URL or path (identical sources share a file)
  validation/...  test/...  same shape; a split with no rows has no folder at all
  failures.csv              row, url, reason (import only)
  dataset.json              source, column mapping, split rule and seed, counts, schema version
```
`datasets.load_dataset("imagefolder", data_dir=DIR)` reads it with its splits. Every file is written
atomically (temporary name in the same folder, fsync, rename), so a file that exists is complete.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from productvlm.errors import UserError

SCHEMA_VERSION = 1
SPLITS: tuple[str, ...] = ("train", "validation", "test")
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.8, 0.1, 0.1)
CATALOG_COLUMNS: list[str] = [
    "website_name",
    "competence_date",
    "country_code",
    "currency_code",
    "brand",
    "category1_code",
    "category2_code",
    "category3_code",
    "product_code",
    "title",
    "itemurl",
    "imageurl",
    "full_price",
    "price",
    "full_price_eur",
    "price_eur",
    "flg_discount",
]
DATASET_JSON = "dataset.json"
FAILURES_CSV = "failures.csv"
METADATA = "metadata.jsonl"
IMAGES = "images"
TMP_SUFFIX = ".tmp"
_TMP_PREFIX = ".partial-"


# ---------------------------------------------------------------- atomic writes


def tmp_path_for(path: Path) -> Path:
    """A temporary name in the same folder (so the rename is atomic); never ends in an image suffix."""
    return path.with_name(f"{_TMP_PREFIX}{path.name}.{os.getpid()}{TMP_SUFFIX}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` so that `path` is either absent, the old file, or complete: temp + fsync + rename."""
    atomic_write_many({Path(path): data})


def atomic_write_many(files: dict[Path, bytes]) -> None:
    """Write several files so that none is replaced unless all could be written (a full disk while
    writing the third leaves the first two as they were): every temporary first, then the renames."""
    pending: list[tuple[Path, Path]] = []
    path = Path(".")
    try:
        for path, data in files.items():
            tmp = tmp_path_for(Path(path))
            pending.append((tmp, Path(path)))
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in pending:
            os.replace(tmp, path)
    except BaseException as e:
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):  # a full disk raises from write()/fsync() with no name: give ours
            e.filename = str(path)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_partial_files(folder: Path) -> int:
    """Delete temporary files left by a killed run; returns how many were removed."""
    if not folder.is_dir():
        return 0
    n = 0
    for p in folder.glob(f"{_TMP_PREFIX}*{TMP_SUFFIX}"):
        p.unlink(missing_ok=True)
        n += 1
    return n


# ---------------------------------------------------------------- keys and splits


def image_key(source: str) -> str:
    """File stem for an image: a hash of its source URL or path, so identical sources share one file."""
    return hashlib.sha256(source.encode("utf-8")).hexdigest()[:24]


def image_file_name(source: str) -> str:
    """`file_name` as stored in metadata.jsonl, relative to the split folder."""
    return f"{IMAGES}/{image_key(source)}.jpg"


def code_text(product_code: int | str) -> str:
    """The text a product code is hashed as: an integer in decimal (`1290`, `"001290"` -> "1290"), any
    other code as written, stripped and NFC-normalised (`"AB-1290-BLK"`)."""
    if not isinstance(product_code, str):
        return str(int(product_code))
    text = unicodedata.normalize("NFC", product_code.strip())
    return str(int(text)) if text.isascii() and text.lstrip("+-").isdigit() and len(text) < 30 else text


def split_hash(product_code: int | str, seed: int = 0) -> float:
    """A uniform number in [0, 1) that depends only on (seed, product_code): sha256 of "seed:code_text"."""
    digest = hashlib.sha256(f"{seed}:{code_text(product_code)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _bucket(u: float, fractions: Sequence[float]) -> str:
    edge = 0.0
    for split, frac in zip(SPLITS, fractions):
        edge += frac
        if u < edge:
            return split
    return SPLITS[-1]


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise UserError(
            f"split fractions must be three non-negative numbers summing to 1 (train,validation,test), got {list(fractions)}"
        )
    return (float(fractions[0]), float(fractions[1]), float(fractions[2]))


def split_of(product_code: int | str, seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> str:
    """The split of one product: a pure function of its product_code (and the seed)."""
    return _bucket(split_hash(product_code, seed), fractions)


def assign_splits(
    product_codes: Sequence[int | str],
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    strata: Sequence[str] | None = None,
) -> list[str]:
    """Split of each product.

    Without `strata`, each product's split is `split_of(code)`: adding products never moves another.
    With `strata` (e.g. the category of each row), products are ranked by their hash inside each
    stratum and cut at the cumulative fractions, so every category is split in the same proportions;
    a grown catalog then moves only the few products near a cut.
    """
    fractions = check_fractions(fractions)
    if strata is None:
        return [split_of(c, seed, fractions) for c in product_codes]
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(strata):
        groups[str(s)].append(i)
    out = [""] * len(product_codes)
    for idx in groups.values():
        idx.sort(key=lambda i: split_hash(product_codes[i], seed))
        n = len(idx)
        for rank, i in enumerate(idx):
            out[i] = _bucket((rank + 0.5) / n, fractions)
    return out


# ---------------------------------------------------------------- writing


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse to write into a non-empty folder unless asked; with `overwrite`, clear what we own there."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a folder: choose another path")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise UserError(f"--out {out_dir} is not empty: choose an empty folder or pass --overwrite")
        for split in SPLITS:
            shutil.rmtree(out_dir / split, ignore_errors=True)
        for name in (DATASET_JSON, FAILURES_CSV):
            (out_dir / name).unlink(missing_ok=True)


def images_dir(out_dir: Path, split: str) -> Path:
    return Path(out_dir) / split / IMAGES


def metadata_bytes(rows: Iterable[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def write_splits(
    out_dir: Path, rows_by_split: dict[str, list[dict[str, Any]]], extra: dict[Path, bytes] | None = None
) -> dict[str, int]:
    """Write every split's metadata (and the `extra` files) all or nothing: atomic_write_many.

    A split with no rows gets no folder (imagefolder rejects empty ones).
    """
    files: dict[Path, bytes] = dict(extra or {})
    counts = {}
    for split in SPLITS:
        rows = rows_by_split.get(split, [])
        counts[split] = len(rows)
        if rows:
            (Path(out_dir) / split).mkdir(parents=True, exist_ok=True)
            files[Path(out_dir) / split / METADATA] = metadata_bytes(rows)
    atomic_write_many(files)
    for split in SPLITS:
        if not counts[split]:
            shutil.rmtree(Path(out_dir) / split, ignore_errors=True)
    return counts


def dataset_json_bytes(info: dict[str, Any]) -> bytes:
    return json.dumps({"schema_version": SCHEMA_VERSION, **info}, indent=2).encode("utf-8")


def write_dataset_json(out_dir: Path, info: dict[str, Any]) -> None:
    atomic_write_bytes(Path(out_dir) / DATASET_JSON, dataset_json_bytes(info))


def failures_bytes(failures: Sequence[tuple[int, str, str]]) -> bytes:
    """`failures.csv`: one (row, url, reason) line per source row left out, sorted by row."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["row", "url", "reason"])
    for row in sorted(failures, key=lambda f: f[0]):
        w.writerow(row)
    return buf.getvalue().encode("utf-8")


# ---------------------------------------------------------------- reading


def read_dataset_info(dataset_dir: Path) -> dict[str, Any]:
    """`dataset.json` as a dict (empty if absent)."""
    path = Path(dataset_dir) / DATASET_JSON
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON (line {e.lineno}): rebuild the dataset folder") from e


def check_dataset_dir(dataset_dir: Path) -> Path:
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise UserError(
            f"dataset folder {dataset_dir} does not exist: create it with `productvlm data synth` or `data import`"
        )
    if not any((dataset_dir / s / METADATA).is_file() for s in SPLITS):
        raise UserError(
            f"{dataset_dir} has no <split>/{METADATA} (train, validation, test): is it a productvlm dataset folder?"
        )
    return dataset_dir


def read_metadata(dataset_dir: Path, split: str) -> list[dict[str, Any]]:
    """Rows of one split's metadata.jsonl as stored (with `file_name`); [] when the split is absent."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    path = Path(dataset_dir) / split / METADATA
    if not path.is_file():
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {lineno}: not valid JSON ({e.msg})") from e
    return rows


def read_split(dataset_dir: str | Path, split: str) -> list[dict[str, Any]]:
    """Rows of one split for training: every metadata column plus `image_path` (absolute path, str).

    Raises UserError if the folder is not a dataset folder or a row names a missing image.
    """
    dataset_dir = check_dataset_dir(Path(dataset_dir)).resolve()
    split_dir = dataset_dir / split
    out = []
    for i, row in enumerate(read_metadata(dataset_dir, split), 1):
        name = row.get("file_name")
        if not name:
            raise UserError(f"{split_dir / METADATA} row {i}: no file_name")
        image_path = split_dir / name
        if not image_path.is_file():
            raise UserError(
                f"{split_dir / METADATA} row {i}: image {name} is missing; re-run the import to fetch it"
            )
        out.append({**row, "image_path": str(image_path)})
    return out
