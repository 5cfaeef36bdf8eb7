"""The HTML pages the package writes (the eval report, the dataset stats page): jinja2 templates shipped
in `productvlm/templates/`, rendered with autoescape on, one stylesheet (`style.css`) and one way to
embed a picture (`data_uri`). Every value a page shows goes through a template variable, so catalog
text (titles, categories, file names) is escaped by construction: no page assembles HTML by hand."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined

PNG_DPI = 90


@dataclass(frozen=True)
class PageFigure:
    """A plot on a page: its element id, caption and the matplotlib Figure (embedded as PNG)."""

    id: str
    caption: str
    picture: Any


@cache
def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("productvlm", "templates"), autoescape=True, undefined=StrictUndefined
    )
    env.filters["data_uri"] = data_uri
    return env


def render_page(template: str, **context: Any) -> str:
    """`templates/<template>` rendered with `context` (every value escaped unless a template says otherwise)."""
    return _environment().get_template(template).render(**context)


def template_text(name: str) -> str:
    """A file of `templates/` as it is (a static page)."""
    return resources.files("productvlm").joinpath("templates", name).read_text(encoding="utf-8")


def data_uri(picture: Any) -> str:
    """A matplotlib figure (as PNG) or a PIL image (as JPEG) as a `data:` URI for an `<img src>`."""
    buf = io.BytesIO()
    if hasattr(picture, "savefig"):
        picture.savefig(buf, format="png", dpi=PNG_DPI, bbox_inches="tight")
        mime = "image/png"
    else:
        picture.save(buf, format="JPEG", quality=80)
        mime = "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"
