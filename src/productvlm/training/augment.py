"""Label-preserving geometric augmentation of training photos (`data.augment`), never colour.

One affine warp per photo (scale about the centre, small rotation, translation, optional
horizontal flip), then optionally a JPEG re-compression, done on the photo at the size the model's
processor resizes it to (`at_model_size`). The warp keeps that size and the crop grid, so the
image-token count (computed from the file's header) stays exact. Uncovered corners are filled with
the photo's own border colour (the studio backdrop), not black.

Every draw comes from an RNG seeded by (seed, epoch, sample index): the same sample in the same
epoch gets the same photo in any DataLoader worker and after `--resume`.
"""

from __future__ import annotations

import io
import math
import random

import numpy as np
from PIL import Image

from productvlm.config import AugmentConfig
from productvlm.models.phi3v.image_processing_phi3v import hd_resize
from productvlm.models.phi3v.image_tokens import hd_grid


def at_model_size(img: Image.Image, num_crops: int, crop_size: int) -> Image.Image:
    """The photo resized as the model's processor would resize it, so that the warp works on a
    fraction of the pixels (its cost is most of a sample's); the original photo in the rare case
    where the smaller size would change its crop grid (and so its image-token count)."""
    small = hd_resize(img, num_crops, crop_size)
    same = hd_grid(*small.size, num_crops, crop_size) == hd_grid(*img.size, num_crops, crop_size)
    return small if same else img


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    return random.Random(f"productvlm-augment:{seed}:{epoch}:{index}")


def border_colour(img: Image.Image) -> tuple[int, int, int]:
    """Median colour of the outermost pixel ring: the backdrop of a product photo."""
    a = np.asarray(img)
    ring = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    return tuple(int(v) for v in np.median(ring, axis=0))


def warp(img: Image.Image, scale: float, angle: float, dx: float, dy: float, flip: bool) -> Image.Image:
    """Zoom by `scale` and rotate by `angle` degrees about the centre, then shift by (dx, dy)
    fractions of the width/height; same size out. PIL's affine maps output to input pixels."""
    w, h = img.size
    cx, cy = w / 2, h / 2
    t = math.radians(angle)
    cos, sin = math.cos(t) / scale, math.sin(t) / scale
    ox, oy = cx + dx * w, cy + dy * h  # where the centre lands
    fx = -1.0 if flip else 1.0
    # input = centre + R(-angle)/scale @ (F @ (output - shifted centre)), F flips x
    a, b, d, e = cos * fx, sin, -sin * fx, cos
    coeffs = (a, b, cx - a * ox - b * oy, d, e, cy - d * ox - e * oy)
    return img.transform(
        (w, h), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR, fillcolor=border_colour(img)
    )


def recompress(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as out:
        return out.convert("RGB")


def augment(img: Image.Image, cfg: AugmentConfig, rng: random.Random) -> Image.Image:
    """The augmented RGB photo, same size as `img`. Draws happen in a fixed order whatever is enabled."""
    scale = math.exp(rng.uniform(-1.0, 1.0) * math.log1p(cfg.scale))
    angle = rng.uniform(-cfg.rotate, cfg.rotate)
    dx, dy = rng.uniform(-cfg.translate, cfg.translate), rng.uniform(-cfg.translate, cfg.translate)
    flip = cfg.hflip and rng.random() < 0.5
    quality = rng.randint(*cfg.jpeg_quality) if cfg.jpeg_quality else None
    if scale != 1.0 or angle or dx or dy or flip:
        img = warp(img, scale, angle, dx, dy, flip)
    if quality is not None:
        img = recompress(img, quality)
    return img
