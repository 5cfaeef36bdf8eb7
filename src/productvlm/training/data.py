"""Catalog rows -> training samples: prompt + answer ids, labels only on the answer, batched with images.

One sample is `<prompt with image slots><answer><|end|>`; labels are -100 on the prompt, the image
slots and the padding, so the loss is on the answer tokens and the closing `<|end|>` only. Token
counts are computed from the image size alone (no pixel decoding), which gives the per-sample
budget check up front and the lengths for length-grouped batching.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from productvlm.errors import UserError

IGNORE = -100
END = "<|end|>"
BLANK_GREY = (128, 128, 128)


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


def load_image(path: str | Path, blank: bool = False) -> Image.Image:
    """The RGB photo, or with `blank` a plain grey image of the same size (the no-image control)."""
    with Image.open(path) as im:
        if blank:
            return Image.new("RGB", im.size, BLANK_GREY)
        return im.convert("RGB")


def image_size(path: str | Path) -> tuple[int, int]:
    with Image.open(path) as im:  # reads the header only
        return im.size


@dataclass(frozen=True)
class Encoded:
    """A sample's token ids and labels; the pixels are loaded when the sample is batched."""

    input_ids: list[int]
    labels: list[int]
    image_path: str
    name: str

    def __len__(self) -> int:
        return len(self.input_ids)


class Encoder:
    """Turns catalog rows into `Encoded` samples with the run's templates, num_crops and token budget."""

    def __init__(self, processor, prompt: str, answer: str, num_crops: int, max_tokens: int):
        self.processor, self.prompt, self.answer = processor, prompt, answer
        self.num_crops, self.max_tokens = num_crops, max_tokens
        self.end_id = processor.tokenizer.convert_tokens_to_ids(END)

    def prompt_ids(self, row: dict[str, Any]) -> list[int]:
        w, h = image_size(row["image_path"])
        n_image = self.processor.num_image_tokens(w, h, self.num_crops)
        return self.processor.encode_prompt(render(self.prompt, row, "prompt"), [n_image])

    def answer_ids(self, row: dict[str, Any]) -> list[int]:
        text = render(self.answer, row, "answer")
        return self.processor.tokenizer(text, add_special_tokens=False).input_ids + [self.end_id]

    def __call__(self, row: dict[str, Any]) -> Encoded:
        prompt, answer = self.prompt_ids(row), self.answer_ids(row)
        n = len(prompt) + len(answer)
        if n > self.max_tokens:
            raise UserError(
                f"sample {sample_name(row)} has {n} tokens, over data.max_tokens_per_sample={self.max_tokens}: "
                "lower data.num_crops or raise the budget"
            )
        return Encoded(prompt + answer, [IGNORE] * len(prompt) + answer, row["image_path"], sample_name(row))


class CatalogDataset(Dataset):
    """Encoded samples; `lengths` (tokens per sample) feed the length-grouped sampler."""

    def __init__(self, rows: list[dict[str, Any]], encoder: Encoder, blank_images: bool = False):
        self.rows = rows
        self.samples = [encoder(row) for row in rows]
        self.blank_images = blank_images

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def lengths(self) -> list[int]:
        return [len(s) for s in self.samples]

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.samples[i]
        return {
            "input_ids": s.input_ids,
            "labels": s.labels,
            "image": load_image(s.image_path, self.blank_images),
        }


class Collator:
    """Pads ids (right: pad id, labels -100) and turns the batch's images into pixel_values/image_sizes."""

    def __init__(self, processor, num_crops: int, padding_side: str = "right"):
        self.processor, self.num_crops, self.side = processor, num_crops, padding_side

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.processor.pad([f["input_ids"] for f in features], self.side)
        labels = torch.full_like(batch["input_ids"], IGNORE)
        for i, f in enumerate(features):
            n = len(f["labels"])
            span = slice(0, n) if self.side == "right" else slice(labels.shape[1] - n, None)
            labels[i, span] = torch.tensor(f["labels"])
        images = self.processor.image_processor(
            [f["image"] for f in features], num_crops=self.num_crops, return_tensors="pt"
        )
        return {
            **batch,
            "labels": labels,
            "pixel_values": images["pixel_values"],
            "image_sizes": images["image_sizes"],
        }
