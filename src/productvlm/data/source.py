"""Reading a catalog table: a local CSV / TSV / Parquet / JSONL / JSON file, or a Hugging Face hub dataset."""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from productvlm.errors import UserError

LOCAL_SUFFIXES = (".csv", ".tsv", ".parquet", ".jsonl", ".ndjson", ".json")


@dataclass
class Table:
    """Rows of a catalog table as plain dicts, in source order."""

    source: str  # as given by the user
    location: str  # resolved path, or "hub:<id>/<split>"
    columns: list[str]
    rows: list[dict[str, Any]]
    base_dir: Path  # relative image paths are resolved against this folder


def load_table(source: str, hub_split: str = "train", limit: int | None = None) -> Table:
    """Load SOURCE: an existing local file by its suffix, a local copy of a hub dataset repository, else
    a hub dataset id (streamed). The local copy goes through the same `datasets` code as a hub id."""
    path = Path(source).expanduser()
    if is_dataset_repo(path):
        return _load_hub(str(path), hub_split, limit, base_dir=path.resolve())
    if path.exists():
        return _load_local(source, path, limit)
    if path.suffix.lower() in LOCAL_SUFFIXES or source.startswith((".", "/", "~")):
        raise UserError(
            f"source file {source} not found: give a CSV, Parquet or JSONL path, or a hub dataset id"
        )
    return _load_hub(source, hub_split, limit)


def _load_local(source: str, path: Path, limit: int | None) -> Table:
    if path.is_dir():
        raise UserError(
            f"source {source} is a folder: give the table file (CSV, Parquet or JSONL) inside it, or a "
            "folder laid out like a hub dataset repository (README.md with its YAML card, data/*.parquet)"
        )
    if path.stat().st_size == 0:
        raise UserError(f"source file {source} is empty: it needs a header and at least one row")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        columns, rows = _read_csv(path, "\t" if suffix == ".tsv" else ",", limit)
    elif suffix == ".parquet":
        columns, rows = _read_parquet(path, limit)
    elif suffix in (".jsonl", ".ndjson"):
        columns, rows = _read_jsonl(path, limit)
    elif suffix == ".json":
        columns, rows = _read_json(path, limit)
    else:
        raise UserError(
            f"source file {source}: unknown format {suffix or '(no suffix)'}; use .csv, .tsv, .parquet or .jsonl"
        )
    if not rows:
        raise UserError(f"source file {source} has no data rows")
    return Table(source, str(path.resolve()), columns, rows, path.resolve().parent)


def text_encoding(path: Path) -> str:
    """UTF-8 (a BOM is skipped), or UTF-16 where the file starts with its BOM (Excel's "Unicode text")."""
    with open(path, "rb") as f:
        head = f.read(2)
    return "utf-16" if head in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) else "utf-8-sig"


def _not_text(path: Path, encoding: str, hint: str = "save the file as UTF-8") -> UserError:
    """Where a file stops being valid text: decoding it in one go gives the exact offset, hence the line."""
    data = path.read_bytes()
    try:
        data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[: e.start].decode(encoding, errors="replace").count("\n") + 1
        name = "UTF-16" if encoding == "utf-16" else "UTF-8"
        return UserError(
            f"source file {path} line {line}: not {name} text (byte 0x{data[e.start]:02x}); {hint}"
        )
    return UserError(f"source file {path}: not {encoding} text")  # decodes in one go: cannot happen


def _read_csv(path: Path, delimiter: str, limit: int | None) -> tuple[list[str], list[dict[str, Any]]]:
    encoding = text_encoding(path)
    with open(path, newline="", encoding=encoding) as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        try:
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = [{(k or "").strip(): v for k, v in row.items()} for row in islice(reader, limit)]
        except UnicodeDecodeError:
            raise _not_text(path, encoding, "save the file as UTF-8 (in Excel: CSV UTF-8)") from None
        except csv.Error as e:
            raise UserError(
                f"source file {path}: cannot read as CSV near line {reader.line_num} ({e})"
            ) from e
    if not columns:
        raise UserError(f"source file {path} has no header row")
    return columns, rows


def _read_parquet(path: Path, limit: int | None) -> tuple[list[str], list[dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise UserError(f"source file {path}: cannot read as Parquet ({e})") from e
    if limit is not None:
        table = table.slice(0, limit)
    return list(table.column_names), table.to_pylist()


def _read_jsonl(path: Path, limit: int | None) -> tuple[list[str], list[dict[str, Any]]]:
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        try:
            for lineno, line in enumerate(f, 1):
                if limit is not None and len(rows) >= limit:
                    break
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:  # JSONDecodeError, or an integer of over 4300 digits
                    msg = getattr(e, "msg", str(e))
                    raise UserError(f"source file {path} line {lineno}: not valid JSON ({msg})") from e
                if not isinstance(obj, dict):
                    raise UserError(f"source file {path} line {lineno}: expected a JSON object per line")
                rows.append(obj)
        except UnicodeDecodeError:
            raise _not_text(path, "utf-8-sig") from None
    return _columns_of(rows), rows


def _read_json(path: Path, limit: int | None) -> tuple[list[str], list[dict[str, Any]]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise _not_text(path, "utf-8-sig") from None
    except json.JSONDecodeError as e:
        raise UserError(f"source file {path} line {e.lineno}: not valid JSON ({e.msg})") from e
    except ValueError as e:  # an integer of over 4300 digits
        raise UserError(f"source file {path}: not valid JSON ({e})") from e
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UserError(f"source file {path}: expected a JSON list of objects (or use JSON Lines, .jsonl)")
    rows = data[:limit] if limit is not None else data
    return _columns_of(rows), rows


def _columns_of(rows: Iterable[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        seen.update(dict.fromkeys(r))
    return list(seen)


def is_dataset_repo(path: Path) -> bool:
    """A folder laid out like a hub dataset repository: a README.md dataset card with YAML front matter,
    or a data/ folder (what `git clone` of the hub repository gives)."""
    if not path.is_dir():
        return False
    readme = path / "README.md"
    try:
        card = readme.is_file() and readme.read_text(encoding="utf-8", errors="replace").startswith("---")
    except OSError:
        card = False
    return card or (path / "data").is_dir()


def _load_hub(dataset_id: str, split: str, limit: int | None, base_dir: Path | None = None) -> Table:
    """Stream a hub dataset (only the rows, no images yet), so large ones need no full download."""
    import datasets

    try:
        stream = datasets.load_dataset(dataset_id, split=split, streaming=True)
        rows = [dict(r) for r in islice(stream, limit)]
    except Exception as e:  # the hub client raises many types: offline, not found, gated, bad split
        raise UserError(
            f"cannot load hub dataset {dataset_id!r} (split {split!r}): {type(e).__name__}: {e}. "
            "Check the id and network, or pass a local CSV/Parquet/JSONL file"
        ) from e
    if not rows:
        raise UserError(f"hub dataset {dataset_id!r} split {split!r} has no rows")
    columns = list(getattr(stream, "column_names", None) or _columns_of(rows))
    return Table(dataset_id, f"hub:{dataset_id}/{split}", columns, rows, base_dir or Path.cwd())
