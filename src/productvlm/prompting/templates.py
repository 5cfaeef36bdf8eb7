"""Prompt and answer templates: `str.format` strings filled from a catalog row."""

from __future__ import annotations

import string
from typing import Any

from productvlm.errors import UserError

END = "<|end|>"  # closes the answer the model writes (and every chat turn)


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def render(template: str, row: dict[str, Any], what: str) -> str:
    """Fill a template from a row; a column the row lacks is a UserError naming it."""
    missing = [f for f in template_fields(template) if f not in row]
    if missing:
        raise UserError(
            f"data.{what} template uses column(s) {', '.join(missing)} that the dataset does not have "
            f"(row {sample_name(row)}); columns: {', '.join(sorted(row))}"
        )
    return template.format_map(row)


def sample_name(row: dict[str, Any]) -> str:
    return f"{row.get('file_name', '?')} (product_code {row.get('product_code', '?')})"


__all__ = ["END", "render", "sample_name", "template_fields"]
