"""Mapping source columns to catalog columns and checking each row before anything is downloaded."""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from productvlm.data.folder import CATALOG_COLUMNS
from productvlm.errors import UserError
from productvlm.prices import DEFAULT_MAX_PRICE, PriceError, read_price

REQUIRED_COLUMNS: tuple[str, ...] = ("product_code", "title", "category3_code", "full_price", "imageurl")
PRICE_COLUMNS: tuple[str, ...] = ("full_price", "price", "full_price_eur", "price_eur")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
# Values that stand for "none" in exported catalogs (compared case-insensitively).
PLACEHOLDERS = frozenset({"-", "--", "?", "n.a.", "n/a", "na", "none", "null", "nil", "nan", "tbd", "#n/a"})
# A file path or URL is longer than this; shorter image values are placeholders ("N.A.", "null").
PLACEHOLDER_MAX_CHARS = 4
MAX_CODE_CHARS = 100
_NUMERIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class RowRejected(Exception):
    """This row is left out; `str(e)` is the reason for failures.csv."""


@dataclass(frozen=True)
class ImageSource:
    kind: str  # "url" or "path"
    location: str  # the URL, or an absolute file path


@dataclass(frozen=True)
class RowRules:
    """Checks on values that depend on the import's options."""

    currency: str | None = None  # --currency: a price written with another currency code is refused
    max_price: float = DEFAULT_MAX_PRICE


@dataclass
class CatalogRow:
    number: int  # 1-based data row in the source (the header is not counted)
    values: dict[str, Any]  # every catalog column (None where the source has none)
    image: ImageSource


def parse_mapping(pairs: Iterable[str], image_column: str | None = None) -> dict[str, str]:
    """catalog column -> source column, from `--map catalog=source` pairs (identity by default)."""
    mapping = {c: c for c in CATALOG_COLUMNS}
    for pair in pairs:
        target, sep, src = pair.partition("=")
        target, src = target.strip(), src.strip()
        if not sep or not target or not src:
            raise UserError(
                f"--map {pair!r}: expected CATALOG_COLUMN=SOURCE_COLUMN, e.g. --map title=product_name"
            )
        if target not in mapping:
            raise UserError(
                f"--map {pair!r}: {target!r} is not a catalog column; use one of: {', '.join(CATALOG_COLUMNS)}"
            )
        mapping[target] = src
    if image_column:
        mapping["imageurl"] = image_column
    return mapping


def check_columns(columns: list[str], mapping: dict[str, str], source: str) -> None:
    """Every required catalog column must exist in the source (under its mapped name), and once only."""
    present = set(columns)
    for target, src in mapping.items():
        if columns.count(src) > 1:  # a CSV reader would silently keep the last one
            raise UserError(
                f"{source}: column '{src}' (for {target}) appears {columns.count(src)} times in the header; "
                "rename the copies so that each column name is unique"
            )
    for target in REQUIRED_COLUMNS:
        src = mapping[target]
        if src not in present:
            how = f"--map {target}=<column>" if target != "imageurl" else "--image-column <column>"
            shown = ", ".join(columns[:30]) + (" ..." if len(columns) > 30 else "")
            raise UserError(
                f"{source}: required column '{src}' is missing (needed for {target}); "
                f"the columns are: {shown}. Rename it or pass {how}"
            )


def _blank(v: Any) -> bool:
    return v is None or (isinstance(v, str) and not v.strip()) or (isinstance(v, float) and math.isnan(v))


def _placeholder(v: Any) -> bool:
    return _blank(v) or (isinstance(v, str) and v.strip().casefold() in PLACEHOLDERS)


def read_price_cell(value: Any, column: str, rules: RowRules = RowRules()) -> float | None:
    """The price in a table cell (`prices.read_price` reads it), None when empty; RowRejected with the
    failures.csv reason (the answer parser uses `prices.find_price`, which never refuses)."""
    try:
        price = read_price(value, rules.max_price)
    except PriceError as e:
        raise RowRejected(e.reason(column)) from None
    if price is None:
        return None
    if rules.currency and price.currency and price.currency != rules.currency:
        raise RowRejected(f"{column} in {price.currency}, not {rules.currency} (--currency)")
    return price.value


def parse_product_code(value: Any) -> int | str:
    """An int64 for a code that is an integer (`1290`, `"001290"`, `1290.0`), else the code as text.

    Text codes are stripped and NFC-normalised (the same letters typed on two machines are one code);
    folder.code_text gives the text the split hashes, the same for `1290` and `"1290"`.
    """
    if _placeholder(value):
        raise RowRejected("missing product_code")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise RowRejected(f"bad product_code: {str(value)[:40]!r}")
    if isinstance(value, int):
        return _int64(value)
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise RowRejected(f"bad product_code: {value!r}")
        return _int64(int(value))
    text = unicodedata.normalize("NFC", value.strip())
    if re.fullmatch(r"[-+]?\d+", text):
        # exact, where a float would round a long code; 30 digits are out of range already, and
        # int() refuses strings of over 4300 digits with a ValueError
        return _int64(int(text[:30]))
    if _NUMERIC.fullmatch(text):  # "1290.0", "8.0012345E+07" (spreadsheet exports); "12.5" is no code
        x = float(text)
        if not math.isfinite(x) or x != int(x):
            raise RowRejected(f"bad product_code: {text[:40]!r}")
        return _int64(int(x))
    if len(text) > MAX_CODE_CHARS:
        raise RowRejected(f"product_code longer than {MAX_CODE_CHARS} characters")
    if any(unicodedata.category(c)[0] == "C" for c in text):  # control characters, line breaks
        raise RowRejected(f"bad product_code: {text[:40]!r}")
    return text


def _int64(code: int) -> int:
    if not -(2**63) <= code < 2**63:  # Arrow (datasets, Parquet) stores it as int64
        raise RowRejected("product_code out of range (not a 64-bit integer)")
    return code


def parse_image_source(value: Any, base_dir: Path) -> ImageSource:
    """An http(s) URL, or a local file path (relative to the source file's folder).

    Placeholders (`N.A.`, `-`, `none`, any value of 4 characters or fewer) are a missing image url. A URL
    needs no file extension: the downloaded bytes decide whether it is an image.
    """
    if _placeholder(value):
        raise RowRejected("missing image url")
    if not isinstance(value, str):
        raise RowRejected(f"image column holds {type(value).__name__}, expected a URL or a file path")
    s = value.strip()
    if len(s) <= PLACEHOLDER_MAX_CHARS:
        raise RowRejected("missing image url")
    m = _SCHEME.match(s)
    if m and len(m.group(1)) > 1:  # one letter is a Windows drive, not a scheme
        scheme = m.group(1).lower()
        if scheme not in ("http", "https"):
            raise RowRejected(f"bad url scheme: {scheme}")
        try:
            parts = urlsplit(s)
            ok = bool(parts.hostname) and parts.netloc and not any(c.isspace() for c in s)
            _ = parts.port  # raises on a bad port
        except ValueError:
            ok = False
        if not ok:
            raise RowRejected("malformed url")
        return ImageSource("url", s)
    path = Path(s).expanduser()
    return ImageSource("path", str(path if path.is_absolute() else (base_dir / path).resolve()))


def _text(v: Any) -> str | None:
    return None if _blank(v) else str(v).strip()


def parse_row(
    raw: dict[str, Any], number: int, mapping: dict[str, str], base_dir: Path, rules: RowRules = RowRules()
) -> CatalogRow:
    """Typed catalog values of one source row; raises RowRejected with the reason."""
    get = {c: raw.get(src) for c, src in mapping.items()}
    values: dict[str, Any] = {c: _text(v) for c, v in get.items()}
    values["product_code"] = parse_product_code(get["product_code"])
    for col in PRICE_COLUMNS:
        values[col] = read_price_cell(get[col], col, rules)
    if values["full_price"] is None:
        raise RowRejected("missing price")
    for col in ("title", "category3_code"):
        if values[col] is None:
            raise RowRejected(f"missing {col}")
    flg = get["flg_discount"]
    try:
        values["flg_discount"] = None if _blank(flg) else int(float(flg))
    except (TypeError, ValueError, OverflowError):  # an optional column: unreadable means unknown
        values["flg_discount"] = None
    image = parse_image_source(get["imageurl"], base_dir)
    values["imageurl"] = _text(get["imageurl"])
    return CatalogRow(number, {c: values[c] for c in CATALOG_COLUMNS}, image)
