"""Photos + prompt -> model inputs, the same way for training, eval, predict and serving.

`prepare(processor, prompt, photos, num_crops)` is the one place a prompt (with `<|image_k|>`
placeholders) and its photos become prompt ids and pixel values; `batch` pads prepared rows into one
`generate` input. Training uses the two halves separately, since it sizes every sample before any
pixel is decoded: `prompt_ids` (image slots counted from the photo's size) and `photo_tensors`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from productvlm.data.images import BadImage, image_size, load_photo
from productvlm.errors import UserError
from productvlm.prompting.settings import PromptSettings

BLANK_GREY = (128, 128, 128)


def load_image(path: str | Path, blank: bool = False) -> Image.Image:
    """The photo from disk through the one photo decoder (`data.images.load_photo`: allowed formats,
    limits, normalised), or with `blank` a plain grey image of the same size (the no-image control).
    A file that is no usable photo is a UserError naming it."""
    try:
        if blank:
            return Image.new("RGB", image_size(path), BLANK_GREY)
        return load_photo(path)
    except BadImage as e:
        raise UserError(f"image {path}: {e}") from None


def prompt_ids(processor, prompt: str, sizes: Sequence[tuple[int, int]], num_crops: int) -> list[int]:
    """Token ids of `prompt` with each `<|image_k|>` expanded to the slots of a photo of sizes[k-1]."""
    slots = [processor.num_image_tokens(w, h, num_crops) for w, h in sizes]
    return processor.encode_prompt(prompt, slots)


def photo_tensors(processor, photos: Sequence[Image.Image], num_crops: int) -> dict[str, torch.Tensor]:
    """{"pixel_values", "image_sizes"} of normalised photos, in order."""
    out = processor.image_processor(list(photos), num_crops=num_crops, return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"]}


@dataclass
class Prepared:
    """One row in model terms: prompt ids and its photos' pixel values (None without photos)."""

    ids: list[int]
    pixel_values: torch.Tensor | None = None
    image_sizes: torch.Tensor | None = None


def prepare(processor, prompt: str, photos: Sequence[Image.Image], num_crops: int) -> Prepared:
    """A prompt with `<|image_k|>` placeholders and its photos -> `Prepared` (UserError on placeholder
    mistakes)."""
    ids = prompt_ids(processor, prompt, [p.size for p in photos], num_crops)
    if not photos:
        return Prepared(ids)
    return Prepared(ids, **photo_tensors(processor, photos, num_crops))


def prepare_rows(
    processor, settings: PromptSettings, rows: Sequence[dict[str, Any]], blank: bool = False
) -> list[Prepared]:
    """Catalog rows (`image_path` + the columns the prompt uses) -> `Prepared`, one per row."""
    return [
        prepare(processor, settings.prompt_for(r), [load_image(r["image_path"], blank)], settings.num_crops)
        for r in rows
    ]


def batch(processor, rows: Sequence[Prepared]) -> dict:
    """Left-padded input_ids/attention_mask and every row's pixels in row order (the order of the image
    slots the model fills), on the CPU (`to_model` moves them)."""
    inputs = processor.pad([r.ids for r in rows], "left")
    with_photos = [r for r in rows if r.pixel_values is not None]
    if with_photos:
        inputs["pixel_values"] = torch.cat([r.pixel_values for r in with_photos])
        inputs["image_sizes"] = torch.cat([r.image_sizes for r in with_photos])
    return inputs


def model_device(model) -> torch.device:
    """Where a model's inputs go: its first parameter's device (the embeddings'; a device map's first)."""
    return next(model.parameters()).device


def to_model(inputs: Mapping[str, Any], model) -> dict[str, Any]:
    """`inputs` with its tensors on the model's device: every place that feeds a model goes through here
    (processors make CPU tensors; the model may sit on an accelerator)."""
    device = model_device(model)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


__all__ = [
    "Prepared",
    "prepare",
    "prepare_rows",
    "batch",
    "to_model",
    "model_device",
    "prompt_ids",
    "photo_tensors",
    "load_image",
    "image_size",
    "BLANK_GREY",
]
