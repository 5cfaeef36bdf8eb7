"""Run a trained model on rows or image files: the model is prompted exactly as it was trained.

`Predictor` loads a model folder (full, adapter or run folder) with the run's prompt, answer template
and num_crops (`trained_settings`), and answers rows in batches with a rich progress bar.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from productvlm.data.progress import progress_bar
from productvlm.errors import UserError
from productvlm.evaluation.constrained import AnswerConstraint, known_choices
from productvlm.evaluation.parse import parse_answer
from productvlm.models.loading import load_pretrained, resolve_model_dir, trained_settings
from productvlm.training.data import Encoder
from productvlm.training.evaluate import generate_answers

MAX_PROMPT_TOKENS = 1 << 20  # the prompt budget is a training concern; inference takes what it gets


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def pick_dtype(dtype: str, device: str) -> str:
    if dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    return dtype


class Predictor:
    """A loaded model with its processor and the prompt settings it was trained with."""

    def __init__(
        self,
        model_path: str | Path,
        num_crops: int | None = None,
        device: str = "auto",
        dtype: str = "auto",
        max_new_tokens: int = 64,
    ):
        self.model_dir = resolve_model_dir(model_path)
        self.settings = trained_settings(self.model_dir)
        if num_crops is not None:
            self.settings["num_crops"] = num_crops
        device = pick_device(device)
        self.model, self.processor = load_pretrained(self.model_dir, pick_dtype(dtype, device), device)
        self.encoder = Encoder(
            self.processor,
            self.settings["prompt"],
            self.settings["answer"],
            self.settings["num_crops"],
            MAX_PROMPT_TOKENS,
        )
        self.max_new_tokens = max_new_tokens
        self.constraint: AnswerConstraint | None = None

    @property
    def num_crops(self) -> int:
        return self.settings["num_crops"]

    def constrain(self, train_rows: Sequence[dict[str, Any]]) -> None:
        """Restrict decoding to the answer template, with the categories seen in `train_rows`."""
        eos = self.model.generation_config.eos_token_id
        self.constraint = AnswerConstraint(
            self.processor.tokenizer,
            self.settings["answer"],
            known_choices(self.settings["answer"], train_rows),
            eos if isinstance(eos, list) else [eos],
            self.max_new_tokens,
        )

    def answers(
        self,
        rows: Sequence[dict[str, Any]],
        batch_size: int = 8,
        progress: bool = True,
        what: str = "generating",
    ) -> list[str]:
        """Raw answers, one per row (`image_path` is required; template columns when the prompt uses them)."""
        with progress_bar(what, len(rows), enabled=progress) as advance:
            return generate_answers(
                self.model,
                self.processor,
                self.encoder,
                list(rows),
                self.max_new_tokens,
                batch_size,
                advance=advance,
                constraint=self.constraint,
            )


def check_images(paths: Sequence[str | Path], where: str = "") -> None:
    """Every path is a readable image, else a UserError naming it (before any generation)."""
    for i, path in enumerate(paths):
        at = f"{where} row {i + 1}: " if where else ""
        try:
            with Image.open(path) as im:
                im.verify()
        except FileNotFoundError:
            raise UserError(f"{at}image {path}: no such file") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise UserError(f"{at}image {path}: not a readable image ({e.__class__.__name__})") from None


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


__all__ = ["Predictor", "predict", "read_image_csv", "check_images", "pick_device", "pick_dtype"]
