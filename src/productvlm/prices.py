"""The one number reader for prices, shared by `data import` and the answer parser.

Prices come as spreadsheets and models write them: `590`, `590.0`, `$1,290`, `1290 USD`, `US$ 1,290.00`,
`1.290,00 €`, `1 290,50 kr`, `CHF 1'290.-`. The rules:

- A thousands separator is `,` or `.` before groups of exactly three digits, or a space or apostrophe.
- A decimal comma has one or two digits after it (`12,5`, `1.290,00`); `1,290` is one thousand two
  hundred and ninety.
- Currency marks around the number are set aside: symbols (`$`, `€`, `£`, `¥`, `₩` ...), and words of
  at most three letters with an optional `$` or `.` (`USD`, `US$`, `kr.`, `zł`, `руб`).

`find_price` takes the first number in free text (the answer parser); `read_price` reads a whole table
cell and says why it is not a usable price (the importer).
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

# Above this a price is a data error (the Burberry lists go up to 570,000 in their local currencies).
DEFAULT_MAX_PRICE = 1e9

NUMBER_RE = re.compile(r"[-+]?\d[\d,.' \u00a0\u202f]*")
_SPACES = re.compile(r"[' \u00a0\u202f]")
_EUROPEAN = re.compile(r"^\d{1,3}(\.\d{3})+(,\d+)?$|^\d+,\d{1,2}$")
# What a whole cell may hold once spaces and apostrophes are gone: one well-formed number.
_WELL_FORMED = re.compile(
    r"^\d+(\.\d*)?$|^\d+,\d{1,2}$|^\d{1,3}(,\d{3})+(\.\d+)?$|^\d{1,3}(\.\d{3})+(,\d+)?$"
)
_SPACE_GROUPED = re.compile(r"^\d{1,3}([' \u00a0\u202f]\d{3})+([.,]\d+)?$")  # 1 290,50  1'290.00
_CELL = re.compile(
    r"^(?P<sign>[-+]?)(?P<before>[^\d]*?)(?P<number>\d[\d,.' \u00a0\u202f]*?)(?P<after>[^\d]*)$"
)


class PriceError(ValueError):
    """Not a usable price: `kind` ("not a number", "negative", "zero", "absurd") and what was read."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind, self.detail = kind, detail

    def reason(self, column: str) -> str:
        """The failures.csv reason: "full_price not a number: 'abc'", "negative full_price: -5"."""
        head = f"{column} {self.kind}" if self.kind == "not a number" else f"{self.kind} {column}"
        return f"{head}: {self.detail}" if self.detail else head


@dataclass(frozen=True)
class Price:
    value: float
    currency: str | None  # the currency word written in the cell (upper case), if any


def number_from_text(raw: str) -> float | None:
    """One number as written (`1,290.50`, `1.290,50`, `1 290`), sign included; None if it is none."""
    raw = _SPACES.sub("", raw).rstrip(",.")
    sign = -1.0 if raw.startswith("-") else 1.0
    raw = raw.lstrip("+-")
    european = _EUROPEAN.match(raw)  # 1.290,00 -> 1290.00
    raw = raw.replace(".", "").replace(",", ".") if european else raw.replace(",", "")
    if raw.count(".") > 1:  # "1.2.3": keep what reads as a number
        raw = raw[: raw.index(".", raw.index(".") + 1)]
    try:
        value = sign * float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) else None  # 400 digits parse as inf


def find_price(text: str) -> float | None:
    """The first number in free text: `Full Price: $1,290` -> 1290.0, `n/a` -> None."""
    match = NUMBER_RE.search(text)
    return None if match is None else number_from_text(match.group(0))


def currency_mark(text: str) -> str | None:
    """`text` as a currency mark ("" when empty), upper case; None when it is not one."""
    text = text.strip().rstrip(".-").strip()  # "kr.", Swiss "1'290.-"
    letters = "".join(c for c in text if unicodedata.category(c) != "Sc")
    if len(letters) > 3 or not all(c.isalpha() for c in letters):
        return None
    return text.upper()


def read_price(value: Any, max_price: float = DEFAULT_MAX_PRICE) -> Price | None:
    """A table cell as a price; None for an empty cell; PriceError(reason) for anything unusable.

    A plain number (what Python's float() reads, e.g. `1290.5` or `1.29e3`) is taken as is; otherwise
    the cell must be one formatted number with currency marks around it (module docstring).
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise PriceError("not a number", repr(str(value)[:40]))
    if isinstance(value, float) and math.isnan(value):  # a missing cell in Parquet/pandas
        return None
    price = _read_number(value)
    return Price(check_price(price.value, max_price, value), price.currency)


def _read_number(value: int | float | str) -> Price:
    text = value.strip() if isinstance(value, str) else value
    bad = PriceError("not a number", repr(str(text)[:40]))
    try:
        return Price(float(text), None)
    except OverflowError:  # an int of 400 digits
        raise bad from None
    except ValueError:
        pass
    m = _CELL.match(text)
    if m is None:
        raise bad
    sign, before = m["sign"], m["before"].rstrip()
    if before.endswith("-"):  # "$-12", "USD -12"
        sign, before = "-", before[:-1]
    before, after = currency_mark(before), currency_mark(m["after"])
    written = m["number"].strip()
    number = _SPACES.sub("", written)
    if before is None or after is None or (before and after) or not _WELL_FORMED.match(number):
        raise bad
    if number != written and not _SPACE_GROUPED.match(written):  # "1 2" is two numbers, not 12
        raise bad
    x = number_from_text(sign + number)
    if x is None:
        raise bad
    code = (before or after).replace("$", "").strip()
    return Price(x, code if re.fullmatch(r"[A-Z]{3}", code) else None)


def check_price(x: float, max_price: float = DEFAULT_MAX_PRICE, written: Any = None) -> float:
    """`x` if it is a usable price, else PriceError with the reason."""
    if not math.isfinite(x):
        shown = written.strip() if isinstance(written, str) else (x if written is None else written)
        raise PriceError("not a number", repr(str(shown)[:40]))
    if x < 0:
        raise PriceError("negative", f"{x:g}")
    if x == 0:
        raise PriceError("zero")
    if x > max_price:
        raise PriceError("absurd", f"{x:g} (over {max_price:g})")
    return x
