"""`data synth`: a synthetic catalog whose photos determine the answers the model is asked for.

Each row is one product: a silhouette (-> category3_code), a colour and a material/pattern
(-> title words), a size for bags (-> title word and drawn scale), and a price from
category x material x size with a few percent of noise. Nuisance variation that does not change
the answer: photo size and aspect ratio, position, rotation, scale jitter, background, lighting,
JPEG quality. Every row is rendered from its own RNG seeded by (seed, row index), so the output is
byte-identical for a seed no matter how many worker processes render it.
"""

from __future__ import annotations

import io
import math
import multiprocessing as mp
import os
import random
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from productvlm.data import folder, shapes
from productvlm.data.shapes import RGB
from productvlm.errors import UserError

Draw = Callable[[ImageDraw.ImageDraw, ImageDraw.ImageDraw, int, int, RGB], None]

EUR_PER_USD = 0.9214
DATES = ("2023-11-13", "2023-11-14", "2023-11-15", "2023-11-16", "2023-11-17")
COLOURS: dict[str, RGB] = {
    "Black": (28, 28, 30),
    "Beige": (206, 178, 132),
    "Camel": (160, 110, 62),
    "Navy": (32, 42, 84),
    "Red": (165, 32, 38),
    "Grey": (128, 128, 132),
    "Green": (42, 96, 58),
    "Pink": (226, 150, 168),
    "White": (238, 236, 230),
}
MATERIAL_PRICE = {
    "Cotton": 1.0,
    "Cashmere": 1.0,
    "Knit": 0.9,
    "Check": 1.1,
    "Monogram": 1.15,
    "Quilted": 1.2,
    "Leather": 1.3,
}
# (title word, price factor, drawn-scale factor); only categories with `sized=True` use them.
SIZES = (("Small", 0.75, 0.8), ("Medium", 1.0, 1.0), ("Large", 1.3, 1.18))


@dataclass(frozen=True)
class Category:
    code3: str
    code2: str
    noun: str
    base_price: float
    aspect: float  # width / height of the product's bounding box
    scale: float  # typical fraction of the photo's short side the product spans
    materials: tuple[str, ...]
    draw: Draw
    sized: bool = False
    genders: tuple[str, ...] = ("WOMAN", "MAN")


# fmt: off
_BAG = ("Check", "Leather", "Quilted", "Monogram")
_ANY = ("WOMAN", "MAN", "KIDS")
CATEGORIES: tuple[Category, ...] = (
    Category("TOTE", "BAGS", "Tote Bag", 1890, 1.0, 0.68, _BAG, shapes.tote, sized=True),
    Category("SHOULDER", "BAGS", "Shoulder Bag", 2290, 1.0, 0.7, _BAG, shapes.shoulder, sized=True),
    Category("SCARVES", "CASHMERE SCARVES", "Scarf", 490, 0.42, 0.86, ("Check", "Knit", "Cashmere", "Monogram"), shapes.scarf),
    Category("TRENCH COATS", "OUTERWEAR", "Trench Coat", 2390, 0.72, 0.88, ("Cotton", "Check", "Quilted", "Leather"), shapes.trench, genders=_ANY),
    Category("SHIRTS", "SHIRTS", "Shirt", 750, 1.0, 0.76, ("Cotton", "Check", "Monogram", "Knit"), shapes.shirt, genders=_ANY),
    Category("SNEAKERS", "SHOES", "Sneakers", 690, 2.2, 0.82, ("Leather", "Check", "Knit"), shapes.sneaker, genders=_ANY),
    Category("CAPS", "HATS & GLOVES", "Baseball Cap", 390, 1.5, 0.66, ("Check", "Cotton", "Monogram"), shapes.cap),
    Category("BELTS", "BELTS", "Belt", 520, 4.0, 0.86, ("Leather", "Check", "Monogram"), shapes.belt),
    Category("WALLETS", "SMALL LEATHER GOODS", "Wallet", 550, 1.3, 0.5, _BAG, shapes.wallet),
)
# fmt: on
CATEGORY_CODES: list[str] = [c.code3 for c in CATEGORIES]


# ---------------------------------------------------------------- products


@dataclass(frozen=True)
class ProductSpec:
    """What one synthetic product is; everything the model must predict follows from it."""

    category: Category
    colour: str
    material: str
    size: str  # "" for categories without sizes
    full_price: float

    @property
    def title(self) -> str:
        words = [self.size, self.colour, self.material, self.category.noun]
        return " ".join(w for w in words if w)


def _round_price(x: float) -> float:
    """Catalog-style prices: 590.0, 1890.0, ... (nearest hundred, minus ten)."""
    return float(max(1, round(x / 100)) * 100 - 10)


def sample_spec(rng: random.Random) -> ProductSpec:
    cat = rng.choice(CATEGORIES)
    colour = rng.choice(list(COLOURS))
    material = rng.choice(cat.materials)
    size, size_factor = "", 1.0
    if cat.sized:
        size, size_factor, _ = rng.choice(SIZES)
    noise = math.exp(rng.gauss(0.0, 0.04))
    price = _round_price(cat.base_price * MATERIAL_PRICE[material] * size_factor * noise)
    return ProductSpec(cat, colour, material, size, price)


def row_rng(seed: int, index: int) -> random.Random:
    return random.Random(f"productvlm-synth:{seed}:{index}")


def catalog_row(spec: ProductSpec, product_code: int, rng: random.Random, seed: int) -> dict[str, Any]:
    """The catalog columns of one product (same names and kinds of values as the Burberry table)."""
    discount = rng.random() < 0.15
    price = (
        float(round(spec.full_price * rng.choice((0.5, 0.6, 0.7)) / 10) * 10) if discount else spec.full_price
    )
    slug = spec.title.lower().replace(" ", "-")
    tag = folder.image_key(f"{seed}:{product_code}")
    return {
        "website_name": "BURBERRY",
        "competence_date": rng.choice(DATES),
        "country_code": "USA",
        "currency_code": "USD",
        "brand": "BURBERRY",
        "category1_code": rng.choice(spec.category.genders),
        "category2_code": spec.category.code2,
        "category3_code": spec.category.code3,
        "product_code": product_code,
        "title": spec.title,
        "itemurl": f"https://us.burberry.com/{slug}-p{product_code}",
        "imageurl": f"https://assets.burberry.com/is/image/Burberryltd/{tag}?$BBY_V3_SL_1$&wid=1000&hei=1000",
        "full_price": spec.full_price,
        "price": price,
        "full_price_eur": round(spec.full_price * EUR_PER_USD, 2),
        "price_eur": round(price * EUR_PER_USD, 2),
        "flg_discount": int(discount),
    }


def _background(w: int, h: int, product: RGB, rng: random.Random) -> Image.Image:
    """A plain studio backdrop with a soft vertical gradient, contrasting with the product."""
    light_product = sum(product) / 3 > 140
    lum = rng.uniform(95, 150) if light_product else rng.uniform(205, 248)
    tint = [rng.uniform(-10, 10) for _ in range(3)]
    top = tuple(int(min(255, max(0, lum + t))) for t in tint)
    bottom = tuple(int(min(255, max(0, lum * rng.uniform(0.82, 0.97) + t))) for t in tint)
    grad = Image.linear_gradient("L").resize((w, h))
    return Image.composite(Image.new("RGB", (w, h), bottom), Image.new("RGB", (w, h), top), grad)


def _photo_size(rng: random.Random, aspect: float) -> tuple[int, int]:
    """Photo width and height: short side 300-520 px (mostly ~380), ratios 1:1 to 3:2, max side 800."""
    short = int(rng.triangular(300, 520, 360))
    ratio = rng.choice((1.0, 1.0, 1.25, 1.333, 1.5))
    long_ = min(800, int(short * ratio))
    wide = rng.random() < (0.75 if aspect > 1.2 else 0.25 if aspect < 0.8 else 0.5)
    return (long_, short) if wide else (short, long_)


def render(spec: ProductSpec, rng: random.Random) -> Image.Image:
    """The product photo (RGB) for `spec`; all nuisance variation is drawn from `rng`."""
    col = COLOURS[spec.colour]
    cat = spec.category
    W, H = _photo_size(rng, cat.aspect)
    img = _background(W, H, col, rng)
    size_scale = next((s for name, _, s in SIZES if name == spec.size), 1.0)
    span = cat.scale * size_scale * rng.uniform(0.9, 1.1) * min(W, H)
    if cat.aspect >= 1:
        ow, oh = int(min(span * 1.15, W * 0.96)), int(min(span * 1.15, W * 0.96) / cat.aspect)
    else:
        oh, ow = int(min(span, H * 0.96)), int(min(span, H * 0.96) * cat.aspect)
    ow, oh = max(ow, 24), max(oh, 16)
    tex = shapes.texture(spec.material, col, ow, oh, rng)
    canvas = Image.fromarray(np.clip(tex, 0, 255).astype(np.uint8), "RGB")
    mask = Image.new("L", (ow, oh), 0)
    cat.draw(ImageDraw.Draw(mask), ImageDraw.Draw(canvas), ow, oh, col)
    angle = rng.uniform(-12, 12)
    canvas = canvas.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    mask = mask.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    cw, ch = canvas.size
    x = int(rng.uniform(0, max(0, W - cw))) if cw < W else (W - cw) // 2
    y = int(rng.uniform(0, max(0, H - ch))) if ch < H else (H - ch) // 2
    shadow = mask.reduce(4).filter(ImageFilter.BoxBlur(2)).resize(mask.size).point(lambda v: int(v * 0.35))
    img.paste((20, 20, 20), (x + max(2, cw // 40), y + max(2, ch // 30)), shadow)
    img.paste(canvas, (x, y), mask)
    return _light(img, rng)


def _light(img: Image.Image, rng: random.Random) -> Image.Image:
    """Exposure and a soft directional light gradient."""
    a = np.asarray(img, dtype=np.float32)
    h, w = a.shape[:2]
    theta = rng.uniform(0, 2 * math.pi)
    ramp = (np.arange(w, dtype=np.float32)[None, :] / w - 0.5) * math.cos(theta)
    ramp = ramp + (np.arange(h, dtype=np.float32)[:, None] / h - 0.5) * math.sin(theta)
    gain = rng.uniform(0.85, 1.12) * (1.0 + rng.uniform(0.0, 0.22) * ramp)
    return Image.fromarray(np.clip(a * gain[..., None], 0, 255).astype(np.uint8), "RGB")


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_product(seed: int, index: int, product_code: int) -> tuple[dict[str, Any], bytes]:
    """Catalog row and JPEG bytes of product `index` of the catalog with this seed."""
    rng = row_rng(seed, index)
    spec = sample_spec(rng)
    row = catalog_row(spec, product_code, rng, seed)
    jpeg = encode_jpeg(render(spec, rng), quality=rng.randint(70, 95))
    return row, jpeg


def product_codes(seed: int, rows: int) -> list[int]:
    """Distinct 8-digit product codes, deterministic for the seed."""
    return [80_000_000 + c for c in random.Random(f"productvlm-codes:{seed}").sample(range(20_000_000), rows)]


# ---------------------------------------------------------------- the whole catalog


def _render_task(task: tuple[int, int, int, str]) -> tuple[int, dict[str, Any]]:
    """Worker: render one product, write its image atomically into `out_dir/<split>/images/`."""
    seed, index, code, out_dir = task
    row, jpeg = make_product(seed, index, code)
    split = folder.split_of(code, seed=0)
    path = Path(out_dir) / split / folder.image_file_name(row["imageurl"])
    folder.atomic_write_bytes(path, jpeg)
    return index, {"file_name": folder.image_file_name(row["imageurl"]), **row}


def _pool(workers: int) -> ProcessPoolExecutor:
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx)


def iter_rendered(seed: int, rows: int, out_dir: Path, workers: int) -> Iterator[tuple[int, dict[str, Any]]]:
    tasks = [(seed, i, code, str(out_dir)) for i, code in enumerate(product_codes(seed, rows))]
    if workers <= 1 or rows < 64:
        yield from map(_render_task, tasks)
        return
    with _pool(workers) as pool:
        yield from pool.map(_render_task, tasks, chunksize=16)


def synthesize(
    out_dir: str | Path,
    rows: int = 1000,
    seed: int = 0,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write a synthetic dataset folder; returns the dataset.json content (with counts and timing).

    The split uses the folder's default rule (product_code hash, seed 0, 80/10/10).
    """
    if rows < 1:
        raise UserError(f"--rows must be at least 1, got {rows}")
    out_dir = Path(out_dir)
    folder.check_output_dir(out_dir, overwrite)
    for split in folder.SPLITS:
        folder.images_dir(out_dir, split).mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    t0 = time.perf_counter()
    by_index: dict[int, dict[str, Any]] = {}
    from productvlm.data.progress import progress_bar

    with progress_bar("rendering", rows, enabled=progress) as advance:
        for index, row in iter_rendered(seed, rows, out_dir, workers):
            by_index[index] = row
            advance(1)
    rows_by_split: dict[str, list[dict[str, Any]]] = {s: [] for s in folder.SPLITS}
    for index in range(rows):
        row = by_index[index]
        rows_by_split[folder.split_of(row["product_code"])].append(row)
    counts = folder.write_splits(out_dir, rows_by_split)
    seconds = time.perf_counter() - t0
    info = {
        "source": f"synth:seed={seed}",
        "kind": "synth",
        "column_mapping": {c: c for c in folder.CATALOG_COLUMNS},
        "split": {
            "rule": "sha256(seed:product_code)",
            "seed": 0,
            "fractions": list(folder.DEFAULT_FRACTIONS),
            "stratify": None,
        },
        "counts": counts,
        "rows": rows,
        "synth": {"seed": seed, "categories": CATEGORY_CODES},
    }
    folder.write_dataset_json(out_dir, info)
    return {**info, "seconds": seconds}
