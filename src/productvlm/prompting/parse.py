"""Read title, category and price back from a generated answer, whatever the model did to the format.

`Product: <title>, Category: <code>, Full Price: <price>` is what the default template asks for;
the parser also accepts the fields in any order, missing fields (returned as None), other labels
(`Title:`, `Price:`), prices like `590.0`, `$1,290`, `1290 USD`, `1.290,00 EUR`, and never raises.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from productvlm.prices import find_price  # the one number reader, shared with `data import`

# Label -> field; longer labels first so that "Full Price" wins over "Price".
_LABELS = {
    "full price": "price",
    "price": "price",
    "product": "title",
    "title": "title",
    "name": "title",
    "category": "category",
}
_LABEL_RE = re.compile(
    r"(?<![A-Za-z])(" + "|".join(re.escape(k) for k in _LABELS) + r")\s*:", flags=re.IGNORECASE
)


@dataclass(frozen=True)
class Answer:
    title: str | None = None
    category: str | None = None
    price: float | None = None

    @property
    def complete(self) -> bool:
        return None not in (self.title, self.category, self.price)


def _clean(value: str) -> str | None:
    value = value.strip().rstrip(",;").strip()
    return value or None


def field_spans(text: str) -> dict[str, tuple[int, int]]:
    """Where each field's value sits in `text`: name -> (start, end), stripped as the parser strips it.
    The first occurrence of each label wins; a missing field is absent."""
    if not isinstance(text, str):
        return {}
    labels = list(_LABEL_RE.finditer(text))
    spans: dict[str, tuple[int, int]] = {}
    for i, m in enumerate(labels):
        name = _LABELS[m.group(1).lower()]
        start, end = m.end(), labels[i + 1].start() if i + 1 < len(labels) else len(text)
        if i + 1 == len(labels) and "\n" in text[start:end]:
            end = text.index("\n", start)  # trailing chatter after the last field
        while start < end and text[start].isspace():
            start += 1
        for strip in (str.isspace, lambda c: c in ",;", str.isspace):  # as _clean: strip, rstrip(",;"), strip
            while end > start and strip(text[end - 1]):
                end -= 1
        spans.setdefault(name, (start, end))
    return spans


def parse_answer(text: str) -> Answer:
    """Fields found in `text`; the first occurrence of each label wins; a missing field is None."""
    fields = {name: text[a:b] for name, (a, b) in field_spans(text).items()}
    title = _clean(fields.get("title", ""))
    category = _clean(fields.get("category", ""))
    price = find_price(fields["price"]) if "price" in fields else None
    return Answer(title=title, category=category.upper() if category else None, price=price)


__all__ = ["Answer", "parse_answer", "field_spans"]
