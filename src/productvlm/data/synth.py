"""`data synth`: a synthetic catalog whose photos determine the answers the model is asked for.

Each row is one product: a silhouette (-> category3_code), a colour and a material/pattern
(-> title words), a size for bags (-> title word and drawn scale), and a price from
category x material x size with a few percent of noise. Nuisance variation that does not change
the answer: photo size and aspect ratio, position, rotation, scale jitter, background, lighting,
JPEG quality. Other kinds (`CATALOGS`) change the products, photo sizes and price rule.
Every row is rendered from its own RNG seeded by (seed, row index), so the output is
byte-identical for a seed no matter how many worker processes render it.
"""

from __future__ import annotations

import functools
import io
import math
import multiprocessing as mp
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
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
    glyph: str = ""  # printed on the product (`numerals`): this character ...
    mirrored: bool = False  # ... mirrored left-right


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


@dataclass(frozen=True)
class Catalog:
    """One kind of synthetic catalog: its products, photo sizes, price rule and table values."""

    name: str
    categories: tuple[Category, ...]
    material_price: dict[str, float]
    sizes: tuple[tuple[str, float, float], ...] = SIZES
    short_side: tuple[int, int, int] = (300, 520, 360)  # triangular(low, high, mode) px
    ratios: tuple[float, ...] = (1.0, 1.0, 1.25, 1.333, 1.5)
    max_side: int = 800
    round_price: Callable[[float], float] = lambda x: _round_price(x)
    price_range: tuple[float, float] = (1.0, float("inf"))
    weights: tuple[float, ...] | None = None  # category frequencies (None: uniform)
    na_share: float = 0.0  # share of rows whose category3_code is "N.A." (unreadable from the photo)
    country: str = "USA"
    currency: str = "USD"
    code_base: int = 80_000_000
    code_span: int = 20_000_000


# ---- `home`: a second balanced catalog (8 home-goods categories, smaller and wider photos,
# additive prices ending in 9, EUR)
HOME_MATERIALS = {
    "Ceramic": 0.0,
    "Striped": 15.0,
    "Dotted": 10.0,
    "Knit": 25.0,
    "Leather": 60.0,
    "Check": 20.0,
}
_HOME_ANY = ("HOME",)
# fmt: off
HOME_CATEGORIES: tuple[Category, ...] = (
    Category("LAMPS", "LIGHTING", "Table Lamp", 149, 0.8, 0.8, ("Ceramic", "Striped", "Check", "Leather"), shapes.lamp, sized=True, genders=_HOME_ANY),
    Category("MUGS", "TABLEWARE", "Mug", 19, 1.15, 0.55, ("Ceramic", "Striped", "Dotted"), shapes.mug, genders=_HOME_ANY),
    Category("VASES", "DECOR", "Vase", 59, 0.62, 0.78, ("Ceramic", "Striped", "Dotted", "Check"), shapes.vase, sized=True, genders=_HOME_ANY),
    Category("CHAIRS", "FURNITURE", "Chair", 229, 0.8, 0.85, ("Leather", "Knit", "Check", "Ceramic"), shapes.chair, genders=_HOME_ANY),
    Category("CLOCKS", "DECOR", "Wall Clock", 45, 1.0, 0.6, ("Ceramic", "Leather", "Dotted"), shapes.clock, genders=_HOME_ANY),
    Category("BOTTLES", "KITCHEN", "Water Bottle", 29, 0.42, 0.8, ("Striped", "Dotted", "Ceramic"), shapes.bottle, genders=_HOME_ANY),
    Category("TEAPOTS", "TABLEWARE", "Teapot", 65, 1.3, 0.62, ("Ceramic", "Dotted", "Striped"), shapes.teapot, genders=_HOME_ANY),
    Category("CUSHIONS", "TEXTILES", "Cushion", 39, 1.0, 0.7, ("Knit", "Check", "Striped", "Dotted"), shapes.cushion, genders=_HOME_ANY),
)
# fmt: on
HOME_SIZES = (("Small", 0.0, 0.78), ("Large", 40.0, 1.2))  # (word, price added, drawn-scale factor)


def _round_to_9(x: float) -> float:
    """49.0, 129.0, ...: nearest ten, minus one."""
    return float(max(1, round(x / 10)) * 10 - 1)


def _round_local(x: float) -> float:
    """Two or three significant figures, as price lists in a local currency have them."""
    step = 1 if x < 100 else 10 if x < 10_000 else 100
    return float(round(x / step) * step)


# ---- `longtail`: shaped like the real price lists: 34 category2_code values, 45 category3_code
# values of very unequal (Zipf) frequency, a few "N.A.", prices 35..570k in a local currency,
# product codes beyond 32 bits.
def _longtail_categories() -> tuple[Category, ...]:
    fashion = {c.code3: c for c in CATEGORIES}
    home = {c.code3: c for c in HOME_CATEGORIES}
    # (category3, category2, noun, base price, template category, materials)
    lines = [
        ("TOTE BAGS", "BAGS", "Tote Bag", 24_000, fashion["TOTE"], ("Check", "Monogram")),
        ("LEATHER TOTES", "LEATHER BAGS", "Leather Tote", 48_000, fashion["TOTE"], ("Leather", "Quilted")),
        ("SHOULDER BAGS", "BAGS", "Shoulder Bag", 32_000, fashion["SHOULDER"], ("Check", "Monogram")),
        ("QUILTED BAGS", "LEATHER BAGS", "Quilted Bag", 52_000, fashion["SHOULDER"], ("Quilted",)),
        ("EXOTIC BAGS", "EXOTICS", "Exotic Bag", 330_000, fashion["SHOULDER"], ("Leather",)),
        ("SCARVES", "CASHMERE SCARVES", "Scarf", 5_600, fashion["SCARVES"], ("Check", "Cashmere")),
        ("KNIT SCARVES", "KNITWEAR ACCESSORIES", "Knit Scarf", 4_200, fashion["SCARVES"], ("Knit",)),
        ("MONOGRAM SCARVES", "SILK", "Monogram Scarf", 6_400, fashion["SCARVES"], ("Monogram",)),
        ("TRENCH COATS", "OUTERWEAR", "Trench Coat", 26_000, fashion["TRENCH COATS"], ("Cotton", "Check")),
        ("QUILTED JACKETS", "JACKETS", "Quilted Jacket", 18_000, fashion["TRENCH COATS"], ("Quilted",)),
        ("LEATHER COATS", "LEATHER OUTERWEAR", "Leather Coat", 61_000, fashion["TRENCH COATS"], ("Leather",)),
        ("SHIRTS", "SHIRTS", "Shirt", 6_900, fashion["SHIRTS"], ("Cotton", "Check")),
        ("POLO SHIRTS", "POLOS", "Polo Shirt", 4_900, fashion["SHIRTS"], ("Monogram",)),
        ("SWEATERS", "KNITWEAR", "Sweater", 9_900, fashion["SHIRTS"], ("Knit",)),
        ("SNEAKERS", "SHOES", "Sneakers", 7_900, fashion["SNEAKERS"], ("Leather", "Check")),
        ("KNIT SNEAKERS", "TRAINERS", "Knit Sneakers", 5_900, fashion["SNEAKERS"], ("Knit",)),
        ("CAPS", "HATS & GLOVES", "Baseball Cap", 3_900, fashion["CAPS"], ("Check", "Cotton")),
        ("BUCKET HATS", "HATS", "Bucket Hat", 4_400, fashion["CAPS"], ("Monogram",)),
        ("BELTS", "BELTS", "Belt", 4_800, fashion["BELTS"], ("Leather",)),
        ("CHECK BELTS", "BELTS", "Check Belt", 4_200, fashion["BELTS"], ("Check", "Monogram")),
        ("WALLETS", "SMALL LEATHER GOODS", "Wallet", 5_200, fashion["WALLETS"], ("Leather", "Quilted")),
        ("CARD CASES", "SMALL LEATHER GOODS", "Card Case", 2_400, fashion["WALLETS"], ("Check", "Monogram")),
        ("KEY RINGS", "CHARMS", "Key Ring", 35, fashion["WALLETS"], ("Cotton",)),
        ("LAMPS", "HOME LIGHTING", "Table Lamp", 12_000, home["LAMPS"], ("Check", "Leather")),
        ("MUGS", "TABLEWARE", "Mug", 900, home["MUGS"], ("Check", "Monogram")),
        ("VASES", "HOME DECOR", "Vase", 3_400, home["VASES"], ("Check", "Monogram")),
        ("CHAIRS", "FURNITURE", "Chair", 90_000, home["CHAIRS"], ("Leather", "Check")),
        ("CLOCKS", "HOME DECOR", "Wall Clock", 2_900, home["CLOCKS"], ("Check", "Leather")),
        ("BOTTLES", "TRAVEL", "Water Bottle", 1_200, home["BOTTLES"], ("Check", "Monogram")),
        ("TEAPOTS", "TABLEWARE", "Teapot", 2_600, home["TEAPOTS"], ("Check", "Monogram")),
        ("CUSHIONS", "HOME TEXTILES", "Cushion", 1_900, home["CUSHIONS"], ("Check", "Knit")),
        ("BLANKETS", "HOME TEXTILES", "Blanket", 8_800, home["CUSHIONS"], ("Cashmere",)),
        ("PET COLLARS", "PETS", "Pet Collar", 1_100, fashion["BELTS"], ("Check",)),
        ("PET BEDS", "PETS", "Pet Bed", 14_000, home["CUSHIONS"], ("Quilted",)),
        (
            "KIDS TRENCH COATS",
            "CHILDREN OUTERWEAR",
            "Kids Trench Coat",
            9_500,
            fashion["TRENCH COATS"],
            ("Knit",),
        ),
        ("KIDS SHIRTS", "CHILDREN", "Kids Shirt", 2_900, fashion["SHIRTS"], ("Quilted",)),
        ("BABY SHOES", "BABY", "Baby Shoes", 1_800, fashion["SNEAKERS"], ("Quilted",)),
        ("GOLF CAPS", "SPORT", "Golf Cap", 2_100, fashion["CAPS"], ("Knit",)),
        ("TRAVEL BOTTLES", "SPORT", "Travel Bottle", 1_500, home["BOTTLES"], ("Knit", "Quilted")),
        ("BAG CHARMS", "CHARMS", "Bag Charm", 600, home["CLOCKS"], ("Monogram",)),
        ("EXOTIC BELTS", "EXOTICS", "Exotic Belt", 65_000, fashion["BELTS"], ("Quilted",)),
        ("GIFT SETS", "GIFTS", "Gift Set", 2_000, home["TEAPOTS"], ("Knit", "Leather")),
        ("SUNGLASSES CASES", "EYEWEAR", "Glasses Case", 1_400, fashion["WALLETS"], ("Knit",)),
        ("FRAGRANCE BOTTLES", "BEAUTY", "Fragrance", 950, home["BOTTLES"], ("Leather",)),
        ("CANDLES", "HOME FRAGRANCE", "Candle", 700, home["MUGS"], ("Knit", "Leather")),
    ]
    return tuple(
        Category(
            code3,
            code2,
            noun,
            base,
            t.aspect,
            t.scale,
            materials,
            t.draw,
            sized=t.sized,
            genders=("WOMAN", "MAN", "KIDS"),
        )
        for code3, code2, noun, base, t, materials in lines
    )


LONGTAIL_CATEGORIES = _longtail_categories()


# ---- `numerals`: 10 tees of one shape and colour distribution, told apart only by the glyph printed on
# the chest. Three classes print the mirror image of another's glyph, so a left-right flip of the photo
# turns one class into another; the four digits' mirror images belong to no class.
NUMERAL_MATERIALS = {"Cotton": 1.0, "Striped": 1.15, "Knit": 1.3}
_TEE = ("Cotton", "Striped", "Knit")
# (category3, glyph as the title names it, glyph drawn, drawn mirrored, base price)
_NUMERALS = (
    ("LETTER B", "b", "b", False, 40),
    ("LETTER D", "d", "b", True, 52),
    ("LETTER P", "p", "p", False, 44),
    ("LETTER Q", "q", "p", True, 58),
    ("LETTER R", "R", "R", False, 48),
    ("REVERSED R", "Reversed R", "R", True, 64),  # "Я" in words: constrained decoding skips byte tokens
    ("NUMBER 2", "2", "2", False, 36),
    ("NUMBER 3", "3", "3", False, 60),
    ("NUMBER 4", "4", "4", False, 42),
    ("NUMBER 7", "7", "7", False, 56),
)
NUMERAL_CATEGORIES: tuple[Category, ...] = tuple(
    Category(code3, "PRINTED TEES", f"Tee {shown}", base, 1.0, 0.78, _TEE, shapes.tee, genders=_ANY,
             glyph=drawn, mirrored=mirrored)
    for code3, shown, drawn, mirrored, base in _NUMERALS
)  # fmt: skip
# Pairs of category3 codes whose photos are mirror images of each other's (up to nuisance variation).
MIRROR_PAIRS: tuple[tuple[str, str], ...] = (
    ("LETTER B", "LETTER D"),
    ("LETTER P", "LETTER Q"),
    ("LETTER R", "REVERSED R"),
)


# ---- `close`: 5 bags of one bounding box, colours and materials, told apart by small symmetric details:
# straight or tapered sides (~15% of the body), one or two handles, a flap.
def _bag(tapered: bool, handles: int, flap: bool = False) -> Draw:
    return functools.partial(shapes.bag_variant, tapered=tapered, handles=handles, flap=flap)


# fmt: off
CLOSE_CATEGORIES: tuple[Category, ...] = (
    Category("TOTES", "BAGS", "Tote", 1290, 1.0, 0.7, _BAG, _bag(False, 2)),
    Category("SHOPPERS", "BAGS", "Shopper", 1590, 1.0, 0.7, _BAG, _bag(True, 2)),
    Category("SATCHELS", "BAGS", "Satchel", 1890, 1.0, 0.7, _BAG, _bag(False, 1)),
    Category("BUCKET BAGS", "BAGS", "Bucket Bag", 2190, 1.0, 0.7, _BAG, _bag(True, 1)),
    Category("FLAP BAGS", "BAGS", "Flap Bag", 2490, 1.0, 0.7, _BAG, _bag(False, 1, flap=True)),
)
# fmt: on
CATALOGS: dict[str, Catalog] = {
    "fashion": Catalog("fashion", CATEGORIES, MATERIAL_PRICE),
    "home": Catalog(
        "home",
        HOME_CATEGORIES,
        HOME_MATERIALS,
        sizes=HOME_SIZES,
        short_side=(224, 360, 256),
        ratios=(1.0, 1.333, 1.333, 1.778),
        max_side=640,
        round_price=_round_to_9,
        country="DEU",
        currency="EUR",
        code_base=40_000_000,
    ),
    "longtail": Catalog(
        "longtail",
        LONGTAIL_CATEGORIES,
        {**MATERIAL_PRICE, "Cashmere": 1.4},
        round_price=_round_local,
        price_range=(35.0, 570_000.0),
        weights=tuple(1.0 / (rank + 1) ** 1.1 for rank in range(len(LONGTAIL_CATEGORIES))),
        na_share=0.03,
        country="JPN",
        currency="JPY",
        code_base=80_000_000_000,
        code_span=19_000_000_000,
    ),
    "numerals": Catalog(
        "numerals",
        NUMERAL_CATEGORIES,
        NUMERAL_MATERIALS,
        round_price=_round_to_9,
        code_base=20_000_000,
    ),
    "close": Catalog("close", CLOSE_CATEGORIES, MATERIAL_PRICE, code_base=60_000_000),
}
KINDS = tuple(CATALOGS)


def category_codes(kind: str = "fashion") -> list[str]:
    """The category3_code values a catalog of this kind can hold, in table order."""
    c = CATALOGS[kind]
    return list(dict.fromkeys(x.code3 for x in c.categories)) + (["N.A."] if c.na_share else [])


# ---------------------------------------------------------------- products


@dataclass(frozen=True)
class ProductSpec:
    """What one synthetic product is; everything the model must predict follows from it."""

    category: Category
    colour: str
    material: str
    size: str  # "" for categories without sizes
    full_price: float
    code3: str = ""  # category3_code when not the category's own ("N.A." rows of the longtail kind)

    @property
    def title(self) -> str:
        words = [self.size, self.colour, self.material, self.category.noun]
        return " ".join(w for w in words if w)


def _round_price(x: float) -> float:
    """Catalog-style prices: 590.0, 1890.0, ... (nearest hundred, minus ten)."""
    return float(max(1, round(x / 100)) * 100 - 10)


def sample_spec(rng: random.Random, catalog: Catalog = CATALOGS["fashion"]) -> ProductSpec:
    if catalog.weights is None:
        cat = rng.choice(catalog.categories)
    else:
        cat = rng.choices(catalog.categories, weights=catalog.weights)[0]
    colour = rng.choice(list(COLOURS))
    material = rng.choice(cat.materials)
    size, size_factor = "", 1.0
    if cat.sized:
        size, size_factor, _ = rng.choice(catalog.sizes)
    noise = math.exp(rng.gauss(0.0, 0.04))
    if catalog.name == "home":  # additive: base + material surcharge + size surcharge (sizes hold amounts)
        surcharge = size_factor if cat.sized else 0.0
        raw = (cat.base_price + catalog.material_price[material] + surcharge) * noise
    else:
        raw = cat.base_price * catalog.material_price[material] * size_factor * noise
    low, high = catalog.price_range
    price = min(high, max(low, catalog.round_price(raw)))
    code3 = "N.A." if catalog.na_share and rng.random() < catalog.na_share else ""
    return ProductSpec(cat, colour, material, size, price, code3)


def row_rng(seed: int, index: int) -> random.Random:
    return random.Random(f"productvlm-synth:{seed}:{index}")


def catalog_row(
    spec: ProductSpec,
    product_code: int,
    rng: random.Random,
    seed: int,
    catalog: Catalog = CATALOGS["fashion"],
) -> dict[str, Any]:
    """The catalog columns of one product (same names and kinds of values as the Burberry table)."""
    discount = rng.random() < 0.15
    price = (
        max(catalog.price_range[0], float(round(spec.full_price * rng.choice((0.5, 0.6, 0.7)) / 10) * 10))
        if discount
        else spec.full_price
    )
    slug = spec.title.lower().replace(" ", "-")
    tag = folder.image_key(f"{seed}:{product_code}")
    return {
        "website_name": "BURBERRY",
        "competence_date": rng.choice(DATES),
        "country_code": catalog.country,
        "currency_code": catalog.currency,
        "brand": "BURBERRY",
        "category1_code": rng.choice(spec.category.genders),
        "category2_code": spec.category.code2,
        "category3_code": spec.code3 or spec.category.code3,
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


def _photo_size(rng: random.Random, aspect: float, catalog: Catalog) -> tuple[int, int]:
    """Photo width and height; fashion: short side 300-520 px (mostly ~360), ratios 1:1 to 3:2, max side 800."""
    short = int(rng.triangular(*catalog.short_side))
    ratio = rng.choice(catalog.ratios)
    long_ = min(catalog.max_side, int(short * ratio))
    wide = rng.random() < (0.75 if aspect > 1.2 else 0.25 if aspect < 0.8 else 0.5)
    return (long_, short) if wide else (short, long_)


def render(spec: ProductSpec, rng: random.Random, catalog: Catalog = CATALOGS["fashion"]) -> Image.Image:
    """The product photo (RGB) for `spec`; all nuisance variation is drawn from `rng`."""
    col = COLOURS[spec.colour]
    cat = spec.category
    W, H = _photo_size(rng, cat.aspect, catalog)
    img = _background(W, H, col, rng)
    size_scale = next((s for name, _, s in catalog.sizes if name == spec.size), 1.0)
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
    if cat.glyph:
        shapes.print_glyph(canvas, cat.glyph, cat.mirrored, col, rng)
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


def make_product(
    seed: int, index: int, product_code: int, kind: str = "fashion"
) -> tuple[dict[str, Any], bytes]:
    """Catalog row and JPEG bytes of product `index` of the catalog of this kind and seed."""
    catalog = CATALOGS[kind]
    rng = (
        row_rng(seed, index)
        if kind == "fashion"
        else random.Random(f"productvlm-synth:{kind}:{seed}:{index}")
    )
    spec = sample_spec(rng, catalog)
    row = catalog_row(spec, product_code, rng, seed, catalog)
    jpeg = encode_jpeg(render(spec, rng, catalog), quality=rng.randint(70, 95))
    return row, jpeg


def product_codes(seed: int, rows: int, kind: str = "fashion") -> list[int]:
    """Distinct product codes, deterministic for the seed (fashion: 8 digits; longtail: 11, beyond 32 bits)."""
    c = CATALOGS[kind]
    return [
        c.code_base + x for x in random.Random(f"productvlm-codes:{seed}").sample(range(c.code_span), rows)
    ]


# ---------------------------------------------------------------- the whole catalog


def _render_task(task: tuple[int, int, int, str, str, tuple[float, ...]]) -> tuple[int, dict[str, Any]]:
    """Worker: render one product, write its image atomically into `out_dir/<split>/images/`."""
    seed, index, code, out_dir, kind, fractions = task
    row, jpeg = make_product(seed, index, code, kind)
    split = folder.split_of(code, 0, fractions)
    path = Path(out_dir) / split / folder.image_file_name(row["imageurl"])
    folder.atomic_write_bytes(path, jpeg)
    return index, {"file_name": folder.image_file_name(row["imageurl"]), **row}


def _pool(workers: int) -> ProcessPoolExecutor:
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx)


def iter_rendered(
    seed: int,
    rows: int,
    out_dir: Path,
    workers: int,
    kind: str = "fashion",
    fractions: Sequence[float] = folder.DEFAULT_FRACTIONS,
) -> Iterator[tuple[int, dict[str, Any]]]:
    codes = product_codes(seed, rows, kind)
    tasks = [(seed, i, code, str(out_dir), kind, tuple(fractions)) for i, code in enumerate(codes)]
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
    kind: str = "fashion",
    fractions: Sequence[float] = folder.DEFAULT_FRACTIONS,
) -> dict[str, Any]:
    """Write a synthetic dataset folder; returns the dataset.json content (with counts and timing).

    `kind`: fashion (the default, 9 balanced categories), home (8 balanced home-goods categories,
    other photo sizes and price rule), longtail (shaped like the real price lists), numerals (10 tees
    told apart only by a printed glyph, three classes the mirror images of three others) or close
    (5 bags told apart only by small symmetric details).
    The split uses the folder's rule (product_code hash, seed 0) with `fractions` (train, validation,
    test; default 80/10/10).
    """
    if rows < 1:
        raise UserError(f"--rows must be at least 1, got {rows}")
    if kind not in CATALOGS:
        raise UserError(f"--kind {kind!r}: choose from {', '.join(KINDS)}")
    fractions = folder.check_fractions(fractions)
    out_dir = Path(out_dir)
    folder.check_output_dir(out_dir, overwrite)
    for split in folder.SPLITS:
        folder.images_dir(out_dir, split).mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    t0 = time.perf_counter()
    by_index: dict[int, dict[str, Any]] = {}
    from productvlm.data.progress import progress_bar

    with progress_bar("rendering", rows, enabled=progress) as advance:
        for index, row in iter_rendered(seed, rows, out_dir, workers, kind, fractions):
            by_index[index] = row
            advance(1)
    rows_by_split: dict[str, list[dict[str, Any]]] = {s: [] for s in folder.SPLITS}
    for index in range(rows):
        row = by_index[index]
        rows_by_split[folder.split_of(row["product_code"], 0, fractions)].append(row)
    counts = folder.write_splits(out_dir, rows_by_split)
    seconds = time.perf_counter() - t0
    info = {
        "source": f"synth:seed={seed}" if kind == "fashion" else f"synth:{kind}:seed={seed}",
        "kind": "synth",
        "column_mapping": {c: c for c in folder.CATALOG_COLUMNS},
        "split": {
            "rule": "sha256(seed:product_code)",
            "seed": 0,
            "fractions": list(fractions),
            "stratify": None,
        },
        "counts": counts,
        "rows": rows,
        "synth": {
            "seed": seed,
            "kind": kind,
            "categories": category_codes(kind),
        },
    }
    folder.write_dataset_json(out_dir, info)
    return {**info, "seconds": seconds}
