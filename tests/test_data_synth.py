"""`data synth`: determinism, schema, and that the photo determines the answers."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from productvlm.data import folder, shapes, synth
from productvlm.errors import UserError

ROWS = 90  # > 64, so the process pool renders them


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("synth") / "ds"
    synth.synthesize(d, rows=ROWS, seed=5, workers=2, progress=False)
    return d


def all_rows(d: Path) -> list[dict]:
    return [r for s in folder.SPLITS for r in folder.read_split(d, s)]


def files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_regardless_of_workers(ds, tmp_path):
    again = tmp_path / "again"
    synth.synthesize(again, rows=ROWS, seed=5, workers=1, progress=False)
    a, b = files(ds), files(again)
    assert a.keys() == b.keys() and len(a) == ROWS + 4  # images + 3 metadata + dataset.json
    assert all(a[k] == b[k] for k in a)
    other = tmp_path / "other"
    synth.synthesize(other, rows=ROWS, seed=6, workers=1, progress=False)
    assert files(other).keys() != a.keys()


def test_schema_and_values(ds):
    rows = all_rows(ds)
    assert len(rows) == ROWS
    assert len({r["product_code"] for r in rows}) == ROWS
    for r in rows:
        assert set(r) == {*folder.CATALOG_COLUMNS, "file_name", "image_path"}
        assert isinstance(r["product_code"], int) and 10_000_000 <= r["product_code"] < 100_000_000
        assert r["currency_code"] == "USD" and r["country_code"] == "USA" and r["brand"] == "BURBERRY"
        assert r["category1_code"] in ("WOMAN", "MAN", "KIDS")
        assert r["imageurl"].startswith("https://") and r["itemurl"].startswith("https://")
        assert r["full_price"] % 100 == 90 and r["full_price"] >= 290
        assert r["full_price_eur"] == round(r["full_price"] * synth.EUR_PER_USD, 2)
        assert (r["price"] < r["full_price"]) == bool(r["flg_discount"])
        assert r["file_name"] == folder.image_file_name(r["imageurl"])
    assert len({r["category3_code"] for r in rows}) >= 8
    info = json.loads((ds / "dataset.json").read_text())
    assert info["counts"] == {s: len(folder.read_metadata(ds, s)) for s in folder.SPLITS}
    assert info["schema_version"] == folder.SCHEMA_VERSION


def test_answers_follow_from_the_product(ds):
    """category3 <-> noun in title; title words = size/colour/material; price = category x material x size."""
    by_code = {c.code3: c for c in synth.CATEGORIES}
    for r in all_rows(ds):
        cat = by_code[r["category3_code"]]
        assert r["title"].endswith(cat.noun)
        words = r["title"][: -len(cat.noun)].split()
        if cat.sized:
            size, colour, material = words
            size_factor = {s: f for s, f, _ in synth.SIZES}[size]
        else:
            (colour, material), size_factor = words, 1.0
        assert colour in synth.COLOURS and material in cat.materials
        expected = cat.base_price * synth.MATERIAL_PRICE[material] * size_factor
        assert abs(math.log(r["full_price"] / expected)) < 0.2


def test_images_vary_and_decode(ds):
    sizes, means = [], []
    for r in all_rows(ds):
        with Image.open(r["image_path"]) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            im.load()
            sizes.append(im.size)
            means.append(np.asarray(im).mean())
    assert all(min(s) >= 300 and max(s) <= 800 for s in sizes)
    assert len(set(sizes)) > ROWS // 2 and len({round(w / h, 2) for w, h in sizes}) >= 4
    assert np.std(means) > 10  # backgrounds, colours and lighting differ


def test_product_drawn_with_its_colour():
    """The colour named in the title is the most common palette colour among the product's pixels."""
    names = list(synth.COLOURS)
    palette = np.array([synth.COLOURS[c] for c in names], np.float32)
    hits = 0
    for i in range(40):
        rng = synth.row_rng(0, i)
        spec = synth.sample_spec(rng)
        a = np.asarray(synth.render(spec, rng), dtype=np.float32)
        background = np.median(np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]), axis=0)
        product = a[np.abs(a - background).sum(-1) > 60]
        nearest = np.abs(product[:, None, :] - palette[None]).sum(-1).argmin(1)
        hits += names[np.bincount(nearest, minlength=len(names)).argmax()] == spec.colour
    assert hits >= 32  # 90% measured; patterns (check lines, monogram rings, soles) take the rest


def test_imagefolder_reads_synth(ds, tmp_path):
    import datasets

    d = datasets.load_dataset("imagefolder", data_dir=str(ds), cache_dir=str(tmp_path / "hf"))
    assert set(d) == set(folder.SPLITS)
    assert {s: d[s].num_rows for s in d} == {s: len(folder.read_metadata(ds, s)) for s in folder.SPLITS}
    row = d["validation"][0]
    assert row["image"].size[0] >= 300 and row["category3_code"] in synth.CATEGORY_CODES


def test_refuses_non_empty_out_unless_overwrite(ds, tmp_path):
    out = tmp_path / "o"
    synth.synthesize(out, rows=5, seed=1, progress=False)
    with pytest.raises(UserError, match="not empty"):
        synth.synthesize(out, rows=5, seed=1, progress=False)
    synth.synthesize(out, rows=7, seed=2, overwrite=True, progress=False)
    assert sum(len(folder.read_metadata(out, s)) for s in folder.SPLITS) == 7
    assert len(list(out.glob("*/images/*.jpg"))) == 7


def test_cli_synth(tmp_path):
    from productvlm.cli import app

    out = tmp_path / "cli"
    res = CliRunner().invoke(app, ["data", "synth", "--out", str(out), "--rows", "12", "--seed", "3", "-q"])
    assert res.exit_code == 0, res.output
    assert "wrote 12 rows" in res.output
    rows = [r for s in folder.SPLITS for r in folder.read_metadata(out, s)]
    assert len(rows) == 12 and Counter(r["website_name"] for r in rows) == {"BURBERRY": 12}


def test_cli_synth_splits_by_the_given_proportions(tmp_path):
    from productvlm.cli import app

    out = tmp_path / "split"
    args = [
        "data",
        "synth",
        "--out",
        str(out),
        "--rows",
        "200",
        "--split",
        "60,20,20",
        "--workers",
        "1",
        "-q",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    counts = {s: len(folder.read_metadata(out, s)) for s in folder.SPLITS}
    assert sum(counts.values()) == 200 and 100 <= counts["train"] <= 140 and min(counts.values()) >= 25
    for s in folder.SPLITS:  # each photo in its own split's folder, each row's split the hash's
        rows = folder.read_metadata(out, s)
        assert {r["file_name"].split("/")[-1] for r in rows} == {
            p.name for p in folder.images_dir(out, s).iterdir()
        }
        assert {folder.split_of(r["product_code"], 0, (0.6, 0.2, 0.2)) for r in rows} == {s}
    assert json.loads((out / "dataset.json").read_text())["split"]["fractions"] == [0.6, 0.2, 0.2]
    bad = CliRunner().invoke(app, ["data", "synth", "--out", str(tmp_path / "b"), "--split", "60,20", "-q"])
    assert bad.exit_code != 0 and "--split '60,20'" in str(bad.exception)


# ---------------------------------------------------------------- the other kinds


def specs(kind: str, n: int) -> list:
    catalog = synth.CATALOGS[kind]
    return [synth.sample_spec(random.Random(f"t:{kind}:{i}"), catalog) for i in range(n)]


def test_home_kind_is_balanced_with_its_own_products_sizes_and_prices(tmp_path):
    out = tmp_path / "home"
    info = synth.synthesize(out, rows=40, seed=1, workers=1, progress=False, kind="home")
    assert info["source"] == "synth:home:seed=1" and info["synth"]["kind"] == "home"
    rows = all_rows(out)
    codes = {c.code3 for c in synth.HOME_CATEGORIES}
    assert len(codes) <= 10 and not codes & set(synth.CATEGORY_CODES) - {"N.A."}
    assert all(r["category3_code"] in codes and r["currency_code"] == "EUR" for r in rows)
    assert all(r["full_price"] % 10 == 9 for r in rows)  # prices end in 9, unlike fashion's 90
    for r in rows:
        with Image.open(r["image_path"]) as im:
            assert 224 <= min(im.size) <= 360 and max(im.size) <= 640
    counts = Counter(s.category.code3 for s in specs("home", 4000))
    assert max(counts.values()) / min(counts.values()) < 1.3
    for s in specs("home", 300):  # additive price: base + material + size surcharge, ~4% noise
        surcharge = dict((w, a) for w, a, _ in synth.HOME_SIZES).get(s.size, 0.0)
        expected = s.category.base_price + synth.HOME_MATERIALS[s.material] + surcharge
        assert abs(s.full_price - expected) <= 0.15 * expected + 10


def test_longtail_kind_is_shaped_like_the_price_lists(tmp_path):
    drawn = specs("longtail", 6000)
    code3 = Counter(s.code3 or s.category.code3 for s in drawn)
    assert len({s.category.code2 for s in drawn}) >= 28 and len(code3) >= 40
    frequent = code3.most_common()
    assert frequent[0][1] > 15 * frequent[-1][1]  # very unequal frequencies
    assert 0.01 < code3["N.A."] / len(drawn) < 0.06
    prices = [s.full_price for s in drawn]
    assert min(prices) == 35.0 and 300_000 < max(prices) <= 570_000
    out = tmp_path / "lt"
    synth.synthesize(out, rows=20, seed=0, workers=1, progress=False, kind="longtail")
    rows = all_rows(out)
    assert all(r["product_code"] > 2**32 and isinstance(r["product_code"], int) for r in rows)
    assert all("." not in r["imageurl"].rsplit("/", 1)[1].split("?")[0] for r in rows)  # no extension


def test_unknown_kind_is_named(tmp_path):
    with pytest.raises(UserError, match="--kind 'toys'"):
        synth.synthesize(tmp_path / "x", rows=2, kind="toys", progress=False)


def test_cli_makes_the_other_kinds(tmp_path):
    from typer.testing import CliRunner

    from productvlm.cli import app

    out = tmp_path / "home"
    result = CliRunner().invoke(
        app, ["data", "synth", "--out", str(out), "--rows", "12", "--kind", "home", "-q"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads((out / "dataset.json").read_text())["synth"]["kind"] == "home"
    bad = CliRunner().invoke(
        app, ["data", "synth", "--out", str(tmp_path / "x"), "--rows", "2", "--kind", "toys"]
    )
    assert isinstance(bad.exception, UserError) and "--kind 'toys'" in str(bad.exception)  # main() exits 2


# ---------------------------------------------------------------- numerals and close: hard on purpose


def photo_at_112(img: Image.Image) -> np.ndarray:
    """The photo as the tiny recipe's 112 px crop sees it: long side 112 (then padded)."""
    scale = 112 / max(img.size)
    small = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
    return np.asarray(small, dtype=np.float32)


def render_as(kind: str, category: synth.Category, state: str) -> Image.Image:
    """The photo of a product of `category` drawn with the random state `state` (same spec otherwise)."""
    rng = random.Random(state)
    spec = synth.sample_spec(rng, synth.CATALOGS[kind])
    spec = synth.ProductSpec(category, spec.colour, spec.material, "", spec.full_price)
    return synth.render(spec, rng, synth.CATALOGS[kind])


@pytest.mark.parametrize("kind", ["numerals", "close"])
def test_hard_kinds_same_seed_same_bytes_balanced_and_schema(kind, tmp_path):
    a, b, c = (tmp_path / n for n in "abc")
    for out, seed in ((a, 3), (b, 3), (c, 4)):
        synth.synthesize(out, rows=24, seed=seed, workers=1, progress=False, kind=kind)
    assert files(a) == files(b) and files(a).keys() != files(c).keys()
    catalog = synth.CATALOGS[kind]
    by_code = {x.code3: x for x in catalog.categories}
    assert len(by_code) == {"numerals": 10, "close": 5}[kind]
    for r in all_rows(a):
        assert set(r) == {*folder.CATALOG_COLUMNS, "file_name", "image_path"}
        cat = by_code[r["category3_code"]]
        colour, material, *noun = r["title"].split()
        assert " ".join(noun) == cat.noun and colour in synth.COLOURS and material in cat.materials
        expected = cat.base_price * catalog.material_price[material]
        assert abs(math.log(r["full_price"] / expected)) < 0.2
        with Image.open(r["image_path"]) as im:
            assert im.format == "JPEG" and min(im.size) >= 300 and max(im.size) <= 800
    counts = Counter(s.category.code3 for s in specs(kind, 3000))
    assert counts.keys() == by_code.keys() and max(counts.values()) / min(counts.values()) < 1.25
    colours = Counter((s.category.code3, s.colour) for s in specs(kind, 3000))
    # every colour in every class: the colour does not tell the class
    assert len(colours) == len(by_code) * len(synth.COLOURS)


def test_numerals_differ_only_by_a_glyph_readable_at_112_px():
    """Same random state, two classes: the photos differ only where the glyph is, and it is large."""
    cats = {c.code3: c for c in synth.NUMERAL_CATEGORIES}
    assert {x.noun for x in cats.values()} >= {"Tee b", "Tee d", "Tee p", "Tee q", "Tee R", "Tee Reversed R"}
    for i, (one, other) in enumerate(
        [("LETTER B", "LETTER D"), ("LETTER R", "NUMBER 7"), ("NUMBER 2", "LETTER Q")]
    ):
        state = f"glyph:{i}"
        same = photo_at_112(render_as("numerals", cats[one], state))
        assert np.array_equal(same, photo_at_112(render_as("numerals", cats[one], state)))
        diff = np.abs(same - photo_at_112(render_as("numerals", cats[other], state))).sum(-1) > 90
        ys, xs = np.nonzero(diff)
        assert diff.sum() >= 150, (one, other, diff.sum())  # measured 270-600 px of 112 x 75-112
        assert ys.max() - ys.min() <= 0.5 * same.shape[0] and xs.max() - xs.min() <= 0.5 * same.shape[1]
        assert ys.max() - ys.min() >= 20  # the glyphs span 27-44 px of the 112 (measured)


def test_numerals_mirror_pairs_print_mirrored_glyphs_and_no_glyph_is_symmetric():
    cats = {c.code3: c for c in synth.NUMERAL_CATEGORIES}
    for left, right in synth.MIRROR_PAIRS:
        a, b = cats[left], cats[right]
        assert a.glyph == b.glyph and a.mirrored != b.mirrored
        drawn = np.asarray(shapes.glyph_mask(a.glyph, a.mirrored))
        assert np.array_equal(drawn[:, ::-1], np.asarray(shapes.glyph_mask(b.glyph, b.mirrored)))
    for c in cats.values():  # so a left-right flip of any photo prints a glyph of another class or none
        ink = np.asarray(shapes.glyph_mask(c.glyph, c.mirrored)) > 127
        overlap = (ink & ink[:, ::-1]).sum() / (ink | ink[:, ::-1]).sum()
        assert overlap < 0.8, (c.code3, overlap)  # measured 0.44-0.74


def test_close_bags_share_one_symmetric_outline_box_and_differ_in_details():
    """Drawn alone: one bounding box, left-right symmetric, pairwise 10-50% of the bag's pixels differ."""
    col = synth.COLOURS["Camel"]
    drawn = {}
    for c in synth.CLOSE_CATEGORIES:
        mask, canvas = Image.new("L", (200, 200)), Image.new("RGB", (200, 200), col)
        c.draw(ImageDraw.Draw(mask), ImageDraw.Draw(canvas), 200, 200, col)
        drawn[c.code3] = (np.asarray(mask) > 127, np.asarray(canvas, dtype=np.int32))
    boxes = set()
    for code, (m, _) in drawn.items():
        ys, xs = np.nonzero(m)
        boxes.add((ys.min(), ys.max(), xs.min(), xs.max()))
        assert (m != m[:, ::-1]).mean() < 0.03, code  # 1-2% measured: rounding of the outlines
    assert len(boxes) == 1
    codes = sorted(drawn)
    for i, one in enumerate(codes):
        for other in codes[i + 1 :]:
            (m1, c1), (m2, c2) = drawn[one], drawn[other]
            differ = (m1 != m2) | (m1 & m2 & (np.abs(c1 - c2).sum(-1) > 30))
            share = differ.sum() / (m1 | m2).sum()
            assert 0.1 < share < 0.5, (one, other, share)  # measured 0.14-0.47
