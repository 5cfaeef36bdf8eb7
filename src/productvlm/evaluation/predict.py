"""`predict`: catalog entries for image files, with the model prompted exactly as it was trained
(`inference.predictor.Predictor` loads it with its prompt settings)."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from productvlm.data.images import BadImage, image_size
from productvlm.errors import UserError
from productvlm.inference.predictor import Predictor
from productvlm.prompting.parse import parse_answer


def check_images(paths: Sequence[str | Path], where: str = "") -> None:
    """Every path is a supported, sanely sized photo (`data.images.image_size` reads its header), else a
    UserError naming it (before any generation)."""
    for i, path in enumerate(paths):
        at = f"{where} row {i + 1}: " if where else ""
        try:
            image_size(path)
        except FileNotFoundError:
            raise UserError(f"{at}image {path}: no such file") from None
        except (BadImage, OSError) as e:
            raise UserError(f"{at}image {path}: {e}") from None


def read_image_csv(path: Path, column: str) -> list[str]:
    """Image paths from a CSV column; relative paths are taken relative to the CSV's folder."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            if column not in fields:
                raise UserError(
                    f"{path}: no column {column!r} (columns: {', '.join(fields) or 'none'}); "
                    "name the image column with --column"
                )
            values = [(row.get(column) or "").strip() for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: cannot read it as a CSV ({e})") from None
    for i, value in enumerate(values):
        if not value:
            raise UserError(f"{path} row {i + 2}: column {column!r} is empty")
    return [v if Path(v).is_absolute() else str(path.parent / v) for v in values]


def predict(
    predictor: Predictor, images: Sequence[str | Path], batch_size: int = 8, progress: bool = True
) -> list[dict[str, Any]]:
    """One record per image: file, title, category, price (None where the answer lacks it), raw text."""
    rows = [{"image_path": str(p)} for p in images]
    raw = predictor.answers(rows, batch_size, progress, what="predicting")
    out = []
    for path, text in zip(images, raw):
        a = parse_answer(text)
        price = a.price if a.price is not None and math.isfinite(a.price) else None  # "9"*400 is inf
        out.append({"file": str(path), "title": a.title, "category": a.category, "price": price, "raw": text})
    return out


__all__ = ["predict", "read_image_csv", "check_images"]
