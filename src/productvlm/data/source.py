"""Reading a catalog table: a local CSV / TSV / Parquet / JSONL / JSON file, or a Hugging Face hub dataset."""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, islice
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


@dataclass
class TableStream:
    """The same as a `Table`, with the rows read as they are consumed (never the whole table in memory)."""

    source: str
    location: str
    columns: list[str]  # JSON lines: the first row's keys
    rows: Iterator[dict[str, Any]]
    base_dir: Path
    columns_from_first: bool = False  # load_table then takes the union of every row's keys


def load_table(source: str, hub_split: str = "train", limit: int | None = None) -> Table:
    """Load SOURCE: an existing local file by its suffix, a local copy of a hub dataset repository, else
    a hub dataset id (streamed). The local copy goes through the same `datasets` code as a hub id."""
    stream = stream_table(source, hub_split)
    try:
        rows = list(islice(stream.rows, limit))
    finally:
        getattr(stream.rows, "close", lambda: None)()
    if not rows:
        where = (
            f"hub dataset {source!r} split {hub_split!r}"
            if stream.location.startswith("hub:")
            else f"source file {source}"
        )
        raise UserError(f"{where} has no data rows")
    columns = stream.columns if not stream.columns_from_first else _columns_of(rows)
    return Table(stream.source, stream.location, columns, rows, stream.base_dir)


def stream_table(source: str, hub_split: str = "train") -> TableStream:
    """SOURCE as `load_table` reads it, as a stream of rows (a `.json` list is the one format read whole)."""
    path = Path(source).expanduser()
    if is_dataset_repo(path):
        return _stream_hub(str(path), hub_split, base_dir=path.resolve())
    if path.exists():
        return _stream_local(source, path)
    if path.suffix.lower() in LOCAL_SUFFIXES or source.startswith((".", "/", "~")):
        raise UserError(
            f"source file {source} not found: give a CSV, Parquet or JSONL path, or a hub dataset id"
        )
    return _stream_hub(source, hub_split)


def _stream_local(source: str, path: Path) -> TableStream:
    if path.is_dir():
        raise UserError(
            f"source {source} is a folder: give the table file (CSV, Parquet or JSONL) inside it, or a "
            "folder laid out like a hub dataset repository (README.md with its YAML card, data/*.parquet)"
        )
    if path.stat().st_size == 0:
        raise UserError(f"source file {source} is empty: it needs a header and at least one row")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        columns, rows = _iter_csv(path, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".parquet":
        columns, rows = _iter_parquet(path)
    elif suffix in (".jsonl", ".ndjson"):
        columns, rows = _peek_columns(_iter_jsonl(path))
    elif suffix == ".json":
        columns, rows = _peek_columns(iter(_read_json(path)))
    else:
        raise UserError(
            f"source file {source}: unknown format {suffix or '(no suffix)'}; use .csv, .tsv, .parquet or .jsonl"
        )
    from_first = suffix in (".jsonl", ".ndjson", ".json")
    return TableStream(source, str(path.resolve()), columns, rows, path.resolve().parent, from_first)


def _peek_columns(rows: Iterator[dict[str, Any]]) -> tuple[list[str], Iterator[dict[str, Any]]]:
    """The first row's keys, and the rows with that one put back."""
    first = next(rows, None)
    if first is None:
        return [], iter(())
    return list(first), chain([first], rows)


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


def _iter_csv(path: Path, delimiter: str) -> tuple[list[str], Iterator[dict[str, Any]]]:
    """The header, and the rows as a stream (the file stays open until the stream ends)."""
    encoding = text_encoding(path)
    f = open(path, newline="", encoding=encoding)  # noqa: SIM115  (closed when the stream ends)
    reader = csv.DictReader(f, delimiter=delimiter)
    try:
        columns = [c.strip() for c in (reader.fieldnames or [])]
    except (UnicodeDecodeError, csv.Error) as e:
        f.close()
        raise _csv_error(path, encoding, reader, e) from None
    if not columns:
        f.close()
        raise UserError(f"source file {path} has no header row")

    def rows() -> Iterator[dict[str, Any]]:
        with f:
            try:
                for row in reader:
                    yield {(k or "").strip(): v for k, v in row.items()}
            except (UnicodeDecodeError, csv.Error) as e:
                raise _csv_error(path, encoding, reader, e) from None

    return columns, rows()


def _csv_error(path: Path, encoding: str, reader, e: Exception) -> UserError:
    if isinstance(e, UnicodeDecodeError):
        return _not_text(path, encoding, "save the file as UTF-8 (in Excel: CSV UTF-8)")
    return UserError(f"source file {path}: cannot read as CSV near line {reader.line_num} ({e})")


def _iter_parquet(path: Path) -> tuple[list[str], Iterator[dict[str, Any]]]:
    """The columns, and the rows batch by batch (a row group at a time in memory)."""
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
        columns = list(file.schema_arrow.names)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise UserError(f"source file {path}: cannot read as Parquet ({e})") from e

    def rows() -> Iterator[dict[str, Any]]:
        try:
            for batch in file.iter_batches(batch_size=1024):
                yield from batch.to_pylist()
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"source file {path}: cannot read as Parquet ({e})") from e

    return columns, rows()


def _iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8-sig") as f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:  # JSONDecodeError, or an integer of over 4300 digits
                    msg = getattr(e, "msg", str(e))
                    raise UserError(f"source file {path} line {lineno}: not valid JSON ({msg})") from e
                if not isinstance(obj, dict):
                    raise UserError(f"source file {path} line {lineno}: expected a JSON object per line")
                yield obj
        except UnicodeDecodeError:
            raise _not_text(path, "utf-8-sig") from None


def _read_json(path: Path) -> list[dict[str, Any]]:
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
    return data


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


def _stream_hub(dataset_id: str, split: str, base_dir: Path | None = None) -> TableStream:
    """Stream a hub dataset (only the rows, no images yet), so large ones need no full download."""
    import datasets

    def failed(e: Exception) -> UserError:
        return UserError(
            f"cannot load hub dataset {dataset_id!r} (split {split!r}): {type(e).__name__}: {e}. "
            "Check the id and network, or pass a local CSV/Parquet/JSONL file"
        )

    try:
        stream = datasets.load_dataset(dataset_id, split=split, streaming=True)
        columns, first = list(getattr(stream, "column_names", None) or []), iter(stream)
        head = next(first, None)
    except Exception as e:  # the hub client raises many types: offline, not found, gated, bad split
        raise failed(e) from e

    def rows() -> Iterator[dict[str, Any]]:
        if head is None:
            return
        yield dict(head)
        try:
            for r in first:
                yield dict(r)
        except Exception as e:  # noqa: BLE001  (as above, mid-stream)
            raise failed(e) from e

    where = f"hub:{dataset_id}/{split}"
    return TableStream(
        dataset_id, where, columns or list(head or {}), rows(), base_dir or Path.cwd(), not columns
    )
