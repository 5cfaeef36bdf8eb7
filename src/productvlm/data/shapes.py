"""Drawing synthetic products: silhouettes (one per category) and material textures.

A silhouette draws the product's outline on a mask and its details (seams, buckles, laces) on a colour
canvas, at any size: coordinates are fractions of the product's bounding box.
"""

from __future__ import annotations

import functools
import math
import random
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

RGB = tuple[int, int, int]
METAL: RGB = (196, 166, 92)

# ---------------------------------------------------------------- drawing helpers


def _shade(c: RGB, f: float) -> RGB:
    return (min(255, int(c[0] * f)), min(255, int(c[1] * f)), min(255, int(c[2] * f)))


def _ink(c: RGB) -> RGB:
    """Colour for seams and details: darker on light products, lighter on dark ones."""
    return _shade(c, 0.55) if sum(c) > 200 else _shade((c[0] + 60, c[1] + 60, c[2] + 60), 1.2)


def _pts(pts: list[tuple[float, float]], w: int, h: int) -> list[tuple[float, float]]:
    return [(x * (w - 1), y * (h - 1)) for x, y in pts]


def _both(
    m: ImageDraw.ImageDraw, c: ImageDraw.ImageDraw, method: str, *args: Any, fill: RGB, **kw: Any
) -> None:
    """Draw the same primitive on the mask (opaque) and on the colour canvas."""
    getattr(m, method)(*args, fill=255, **kw)
    getattr(c, method)(*args, fill=fill, **kw)


# ---------------------------------------------------------------- silhouettes
# Each draws the product's shape on the mask `m` and its details on the colour canvas `c`.


def tote(m: ImageDraw.ImageDraw, c: ImageDraw.ImageDraw, w: int, h: int, col: RGB) -> None:
    m.polygon(_pts([(0.12, 0.38), (0.88, 0.38), (0.98, 1.0), (0.02, 1.0)], w, h), fill=255)
    lw = max(3, int(w * 0.045))
    for x0, x1 in ((0.2, 0.45), (0.55, 0.8)):
        _both(m, c, "arc", [x0 * w, 0.04 * h, x1 * w, 0.72 * h], 180, 360, fill=_shade(col, 0.8), width=lw)
    c.line(_pts([(0.11, 0.44), (0.89, 0.44)], w, h), fill=_ink(col), width=max(1, lw // 3))


def shoulder(m: ImageDraw.ImageDraw, c: ImageDraw.ImageDraw, w: int, h: int, col: RGB) -> None:
    m.rounded_rectangle([0.06 * w, 0.46 * h, 0.94 * w, h - 1], radius=0.07 * w, fill=255)
    _both(
        m,
        c,
        "arc",
        [0.14 * w, 0.0, 0.86 * w, 0.96 * h],
        180,
        360,
        fill=_shade(col, 0.8),
        width=max(2, int(w * 0.018)),
    )
    c.line(_pts([(0.06, 0.47), (0.5, 0.78), (0.94, 0.47)], w, h), fill=_ink(col), width=max(2, w // 90))
    r = 0.035 * w
    c.ellipse([0.5 * w - r, 0.76 * h - r, 0.5 * w + r, 0.76 * h + r], fill=METAL)


def scarf(m: ImageDraw.ImageDraw, c: ImageDraw.ImageDraw, w: int, h: int, col: RGB) -> None:
    m.polygon(_pts([(0.12, 0.0), (0.88, 0.0), (0.96, 0.88), (0.04, 0.88)], w, h), fill=255)
    lw = max(1, w // 40)
    for i in range(12):
        x = (0.07 + 0.86 * i / 11) * w
        _both(m, c, "line", [(x, 0.87 * h), (x + 0.01 * w, h - 1)], fill=_shade(col, 0.9), width=lw)
    c.line(_pts([(0.12, 0.12), (0.88, 0.2)], w, h), fill=_ink(col), width=lw)


def trench(m: ImageDraw.ImageDraw, c: ImageDraw.ImageDraw, w: int, h: int, col: RGB) -> None:
    m.polygon(_pts([(0.3, 0.04), (0.7, 0.04), (0.82, 1.0), (0.18, 1.0)], w, h), fill=255)
    m.polygon(_pts([(0.3, 0.04), (0.17, 0.1), (0.02, 0.74), (0.13, 0.76), (0.27, 0.32)], w, h), fill=255)
    m.polygon(_pts([(0.7, 0.04), (0.83, 0.1), (0.98, 0.74), (0.87, 0.76), (0.73, 0.32)], w, h), fill=255)
    ink, lw = _ink(col), max(2, w // 80)
    c.line(_pts([(0.34, 0.04), (0.5, 0.36), (0.66, 0.04)], w, h), fill=ink, width=lw)
    c.rectangle([0.22 * w, 0.44 * h, 0.78 * w, 0.48 * h], fill=_shade(col, 0.75))
    r = max(2, 0.018 * w)
    for x in (0.43, 0.57):
        for y in (0.22, 0.3, 0.38):
            c.ellipse([x * w - r, y * h - r, x * w + r, y * h + r], fill=ink)


def shirt(m: ImageDraw.ImageDraw, c: ImageDraw.ImageDraw, w: int, h: int, col: RGB) -> None:
    m.rectangle([0.25 * w, 0.1 * h, 0.75 * w, h - 1], fill=255)
    m.polygon(_pts([(0.26, 0.1), (0.04, 0.34), (0.14, 0.46), (0.26, 0.34)], w, h), fill=255)
    m.polygon(_pts([(0.74, 0.1), (0.96, 0.34), (0.86, 0.46), (0.74, 0.34)], w, h), fill=255)
    ink, lw = _ink(col), max(2, w // 90)
    _both(
        m,
        c,
        "polygon",
        _pts([(0.36, 0.04), (0.5, 0.16), (0.64, 0.04), (0.6, 0.1), (0.4, 0.1)], w, h),
        fill=_shade(col, 0.85),
    )
    c.line(_pts([(0.5, 0.16), (0.5, 1.0)], w, h), fill=ink, width=lw)
    r = max(2, 0.012 * w)
    for y in (0.3, 0.48, 0.66, 0.84):
        c.ellipse([0.53 * w - r, y * h - r, 0.53 * w + r, y * h + r], fill=ink)


def sneaker(m: ImageDraw.ImageDraw, c: ImageDraw.ImageDraw, w: int, h: int, col: RGB) -> None:
    upper = [
        (0.04, 0.84),
        (0.04, 0.42),
        (0.28, 0.26),
        (0.44, 0.32),
        (0.55, 0.54),
        (0.9, 0.62),
        (0.99, 0.78),
        (0.99, 0.84),
    ]
    m.polygon(_pts(upper, w, h), fill=255)
    _both(m, c, "rectangle", [0.0, 0.8 * h, w - 1, h - 1], fill=(236, 234, 226))
    ink, lw = _ink(col), max(2, w // 120)
    for i in range(4):
        t = i / 3
        x, y = 0.3 + 0.2 * t, 0.34 + 0.2 * t
        c.line(_pts([(x - 0.04, y + 0.02), (x + 0.05, y - 0.04)], w, h), fill=ink, width=lw)


def cap(m: ImageDraw.ImageDraw, c: ImageDraw.ImageDraw, w: int, h: int, col: RGB) -> None:
    m.chord([0.04 * w, 0.08 * h, 0.76 * w, 1.3 * h], 180, 360, fill=255)
    _both(m, c, "ellipse", [0.5 * w, 0.58 * h, 0.99 * w, 0.86 * h], fill=_shade(col, 0.85))
    ink, lw = _ink(col), max(1, w // 120)
    for x in (0.16, 0.4, 0.64):
        c.line(_pts([(0.4, 0.09), (x, 0.69)], w, h), fill=ink, width=lw)
    r = 0.025 * w
    _both(m, c, "ellipse", [0.4 * w - r, 0.08 * h - r, 0.4 * w + r, 0.08 * h + r], fill=ink)


def belt(m: ImageDraw.ImageDraw, c: ImageDraw.ImageDraw, w: int, h: int, col: RGB) -> None:
    m.polygon(_pts([(0.12, 0.3), (0.93, 0.3), (1.0, 0.5), (0.93, 0.7), (0.12, 0.7)], w, h), fill=255)
    _both(m, c, "rectangle", [0.0, 0.08 * h, 0.17 * w, 0.92 * h], fill=METAL)
    c.rectangle([0.035 * w, 0.24 * h, 0.135 * w, 0.76 * h], fill=_shade(col, 0.9))
    r = max(2, 0.05 * h)
    for x in (0.7, 0.76, 0.82, 0.88):
        c.ellipse([x * w - r, 0.5 * h - r, x * w + r, 0.5 * h + r], fill=_ink(col))


def wallet(m: ImageDraw.ImageDraw, c: ImageDraw.ImageDraw, w: int, h: int, col: RGB) -> None:
    m.rounded_rectangle([0, 0, w - 1, h - 1], radius=0.06 * w, fill=255)
    ink, lw = _ink(col), max(1, w // 100)
    c.rounded_rectangle([0.05 * w, 0.06 * h, 0.95 * w, 0.94 * h], radius=0.05 * w, outline=ink, width=lw)
    c.line(_pts([(0.5, 0.0), (0.5, 1.0)], w, h), fill=ink, width=lw * 2)
    c.rectangle([0.64 * w, 0.42 * h, 0.84 * w, 0.56 * h], fill=METAL)


# ---------------------------------------------------------------- home goods (the `home` catalog)


def lamp(m: ImageDraw.ImageDraw, c: ImageDraw.ImageDraw, w: int, h: int, col: RGB) -> None:
    m.polygon(_pts([(0.22, 0.0), (0.78, 0.0), (0.98, 0.42), (0.02, 0.42)], w, h), fill=255)
    _both(m, c, "rectangle", [0.46 * w, 0.42 * h, 0.54 * w, 0.9 * h], fill=METAL)
    _both(m, c, "ellipse", [0.2 * w, 0.86 * h, 0.8 * w, h - 1], fill=_shade(col, 0.7))


def mug(m: ImageDraw.ImageDraw, c: ImageDraw.ImageDraw, w: int, h: int, col: RGB) -> None:
    m.rounded_rectangle([0.04 * w, 0.04 * h, 0.74 * w, h - 1], radius=0.06 * w, fill=255)
    _both(
        m,
        c,
        "arc",
        [0.58 * w, 0.22 * h, 0.98 * w, 0.74 * h],
        270,
        90,
        fill=_shade(col, 0.8),
        width=max(3, w // 14),
    )
    c.ellipse([0.06 * w, 0.02 * h, 0.72 * w, 0.14 * h], fill=_shade(col, 0.6))


def vase(m: ImageDraw.ImageDraw, c: ImageDraw.ImageDraw, w: int, h: int, col: RGB) -> None:
    m.ellipse([0.0, 0.3 * h, w - 1, h - 1], fill=255)
    m.rectangle([0.34 * w, 0.04 * h, 0.66 * w, 0.5 * h], fill=255)
    _both(m, c, "ellipse", [0.26 * w, 0.0, 0.74 * w, 0.1 * h], fill=_shade(col, 0.7))


def chair(m: ImageDraw.ImageDraw, c: ImageDraw.ImageDraw, w: int, h: int, col: RGB) -> None:
    m.rectangle([0.1 * w, 0.0, 0.26 * w, 0.62 * h], fill=255)
    m.rectangle([0.1 * w, 0.5 * h, 0.92 * w, 0.62 * h], fill=255)
    lw = max(3, w // 18)
    for x in (0.14, 0.86):
        _both(m, c, "line", [(x * w, 0.6 * h), (x * w, h - 1)], fill=_shade(col, 0.6), width=lw)


def clock(m: ImageDraw.ImageDraw, c: ImageDraw.ImageDraw, w: int, h: int, col: RGB) -> None:
    m.ellipse([0, 0, w - 1, h - 1], fill=255)
    c.ellipse([0.1 * w, 0.1 * h, 0.9 * w, 0.9 * h], fill=(240, 238, 230))
    ink, lw = (30, 30, 30), max(2, w // 40)
    c.line(_pts([(0.5, 0.5), (0.5, 0.2)], w, h), fill=ink, width=lw)
    c.line(_pts([(0.5, 0.5), (0.72, 0.6)], w, h), fill=ink, width=lw)
    for i in range(12):
        a = 2 * math.pi * i / 12
        x, y = 0.5 + 0.36 * math.cos(a), 0.5 + 0.36 * math.sin(a)
        c.ellipse([x * w - lw, y * h - lw, x * w + lw, y * h + lw], fill=ink)


def bottle(m: ImageDraw.ImageDraw, c: ImageDraw.ImageDraw, w: int, h: int, col: RGB) -> None:
    m.rounded_rectangle([0.0, 0.34 * h, w - 1, h - 1], radius=0.2 * w, fill=255)
    m.polygon(_pts([(0.0, 0.42), (0.3, 0.2), (0.7, 0.2), (1.0, 0.42)], w, h), fill=255)
    _both(m, c, "rectangle", [0.3 * w, 0.0, 0.7 * w, 0.22 * h], fill=_shade(col, 0.5))
    c.rectangle([0.1 * w, 0.55 * h, 0.9 * w, 0.8 * h], fill=(236, 232, 220))


def teapot(m: ImageDraw.ImageDraw, c: ImageDraw.ImageDraw, w: int, h: int, col: RGB) -> None:
    m.ellipse([0.2 * w, 0.25 * h, 0.8 * w, h - 1], fill=255)
    m.polygon(_pts([(0.78, 0.6), (1.0, 0.3), (0.97, 0.26), (0.74, 0.5)], w, h), fill=255)
    _both(
        m,
        c,
        "arc",
        [0.0, 0.35 * h, 0.36 * w, 0.85 * h],
        90,
        270,
        fill=_shade(col, 0.8),
        width=max(3, w // 20),
    )
    _both(m, c, "ellipse", [0.44 * w, 0.14 * h, 0.56 * w, 0.3 * h], fill=_shade(col, 0.7))


def cushion(m: ImageDraw.ImageDraw, c: ImageDraw.ImageDraw, w: int, h: int, col: RGB) -> None:
    m.polygon(
        _pts(
            [
                (0.0, 0.0),
                (0.5, 0.08),
                (1.0, 0.0),
                (0.92, 0.5),
                (1.0, 1.0),
                (0.5, 0.92),
                (0.0, 1.0),
                (0.08, 0.5),
            ],
            w,
            h,
        ),
        fill=255,
    )
    c.line(_pts([(0.1, 0.1), (0.9, 0.9)], w, h), fill=_ink(col), width=max(1, w // 120))


# ---------------------------------------------------------------- printed tees (the `numerals` catalog)


def tee(m: ImageDraw.ImageDraw, c: ImageDraw.ImageDraw, w: int, h: int, col: RGB) -> None:
    """A left-right symmetric T-shirt; its torso (x 0.22-0.78) carries the printed glyph."""
    m.rectangle([0.22 * w, 0.06 * h, 0.78 * w, h - 1], fill=255)
    m.polygon(_pts([(0.23, 0.06), (0.02, 0.3), (0.12, 0.42), (0.23, 0.3)], w, h), fill=255)
    m.polygon(_pts([(0.77, 0.06), (0.98, 0.3), (0.88, 0.42), (0.77, 0.3)], w, h), fill=255)
    m.chord([0.36 * w, -0.06 * h, 0.64 * w, 0.16 * h], 0, 180, fill=0)  # neckline
    c.arc([0.36 * w, -0.06 * h, 0.64 * w, 0.16 * h], 0, 180, fill=_shade(col, 0.7), width=max(2, w // 50))


GLYPH_PX = 160  # the glyph is rasterised once at this size, then scaled to the product


@functools.cache
def glyph_mask(char: str, mirrored: bool = False) -> Image.Image:
    """A bold `char` as an "L" mask cropped to its ink, mirrored left-right if asked."""
    font = ImageFont.load_default(size=GLYPH_PX)  # the font bundled with Pillow: no system fonts needed
    img = Image.new("L", (2 * GLYPH_PX, 2 * GLYPH_PX), 0)
    ImageDraw.Draw(img).text(
        (GLYPH_PX // 2, GLYPH_PX // 4),
        char,
        font=font,
        fill=255,
        stroke_width=GLYPH_PX // 18,
        stroke_fill=255,
    )
    img = img.crop(img.getbbox())
    return ImageOps.mirror(img) if mirrored else img


def print_glyph(canvas: Image.Image, char: str, mirrored: bool, col: RGB, rng: random.Random) -> None:
    """Print `char` large and high-contrast on the tee's chest, with jittered size, place and tilt."""
    w, h = canvas.size
    mask = glyph_mask(char, mirrored)
    gh = max(4, int(h * rng.uniform(0.34, 0.46)))
    gw = max(2, min(int(0.5 * w), round(mask.width * gh / mask.height)))
    mask = mask.resize((gw, gh), Image.Resampling.BILINEAR)
    mask = mask.rotate(rng.uniform(-8, 8), resample=Image.Resampling.BILINEAR, expand=True)
    cx = w * (0.5 + rng.uniform(-0.03, 0.03))
    cy = h * (0.6 + rng.uniform(-0.04, 0.04))
    lum = 0.3 * col[0] + 0.59 * col[1] + 0.11 * col[2]
    ink = (246, 244, 238) if lum < 125 else (18, 18, 22)
    canvas.paste(ink, (round(cx - mask.width / 2), round(cy - mask.height / 2)), mask)


# ---------------------------------------------------------------- close bag variants (the `close` catalog)


def bag_variant(
    m: ImageDraw.ImageDraw,
    c: ImageDraw.ImageDraw,
    w: int,
    h: int,
    col: RGB,
    *,
    tapered: bool,
    handles: int,
    flap: bool = False,
) -> None:
    """One body (straight or tapered sides), one or two top handles, optionally a V flap; all symmetric.

    Every variant fills the same bounding box, so only these details tell them apart.
    """
    top = 0.2 if tapered else 0.06  # inset of the body's top corners
    m.polygon(_pts([(top, 0.42), (1 - top, 0.42), (0.94, 1.0), (0.06, 1.0)], w, h), fill=255)
    lw = max(3, int(w * 0.055))
    arcs = ((0.2, 0.46), (0.54, 0.8)) if handles == 2 else ((0.3, 0.7),)
    for x0, x1 in arcs:
        _both(m, c, "arc", [x0 * w, 0.02 * h, x1 * w, 0.8 * h], 180, 360, fill=_shade(col, 0.78), width=lw)
    c.line(_pts([(top + 0.01, 0.46), (0.99 - top, 0.46)], w, h), fill=_ink(col), width=max(1, lw // 3))
    if flap:
        flap_pts = [(top, 0.42), (1 - top, 0.42), (0.94, 0.5), (0.5, 0.62), (0.06, 0.5)]
        c.polygon(_pts(flap_pts, w, h), fill=_shade(col, 0.7))  # ~20% of the bag's area
        r = 0.035 * w
        c.ellipse([0.5 * w - r, 0.6 * h - r, 0.5 * w + r, 0.6 * h + r], fill=METAL)


# ---------------------------------------------------------------- materials (numpy textures)


def texture(material: str, col: RGB, w: int, h: int, rng: random.Random) -> np.ndarray:
    """An HxWx3 float image of the material in colour `col`; the pattern period scales with the product."""
    x = np.arange(w, dtype=np.float32)[None, :] + rng.uniform(0, 50)
    y = np.arange(h, dtype=np.float32)[:, None] + rng.uniform(0, 50)
    base = np.array(col, dtype=np.float32)
    img = np.broadcast_to(base, (h, w, 3)).copy()
    p = max(8.0, max(w, h) / rng.uniform(6.0, 8.0))
    if material == "Check":
        dark = ((x % p) < 0.2 * p) | ((y % p) < 0.2 * p)
        img[dark] = img[dark] * 0.45
        thin = max(1.0, 0.05 * p)
        white = (np.abs(x % p - 0.55 * p) < thin) | (np.abs(y % p - 0.55 * p) < thin)
        img[white] = img[white] * 0.3 + 0.7 * 245
        red = (np.abs(x % p - 0.8 * p) < thin) | (np.abs(y % p - 0.8 * p) < thin)
        img[red] = img[red] * 0.3 + 0.7 * np.array((175, 30, 35), np.float32)
    elif material == "Quilted":
        q = p * 0.8
        puff = 1.0 + 0.08 * np.cos(2 * math.pi * (x + y) / q)
        img *= puff[..., None]
        lw = max(1.5, 0.07 * q)
        seam = ((x + y) % q < lw) | ((x - y) % q < lw)
        img[seam] = img[seam] * 0.55
    elif material == "Leather":
        g = 1.25 - 0.5 * ((x - x.min()) / w * 0.6 + (y - y.min()) / h * 0.4)
        img *= g[..., None]
    elif material == "Knit":
        rib = max(3.0, w / 24)
        img *= (1.0 + 0.16 * np.sign(np.sin(2 * math.pi * x / rib)))[..., None]
        img *= (1.0 - 0.05 * (np.sin(2 * math.pi * y / (rib * 0.7)) > 0.6))[..., None]
    elif material == "Monogram":
        q = p * 0.6
        row = np.floor(y / q)
        dx = (x + 0.5 * q * (row % 2)) % q - 0.5 * q
        dy = y % q - 0.5 * q
        r = np.sqrt(dx * dx + dy * dy)
        ring = np.abs(r - 0.22 * q) < max(1.0, 0.07 * q)
        mark = np.array((235, 225, 200) if sum(col) < 450 else (90, 70, 45), np.float32)
        img[ring] = img[ring] * 0.35 + 0.65 * mark
    elif material == "Striped":
        band = max(4.0, p * 0.5)
        img *= np.where((y % band) < 0.45 * band, 0.55, 1.0)[..., None]
    elif material == "Dotted":
        q = max(6.0, p * 0.5)
        dx, dy = x % q - 0.5 * q, y % q - 0.5 * q
        dot = (dx * dx + dy * dy) < (0.2 * q) ** 2
        img[dot] = np.array((245, 242, 235), np.float32)
    else:  # Cotton, Cashmere, Ceramic: matte, barely shaded
        img *= (1.0 - 0.08 * (y - y.min()) / h)[..., None]
    return img
