"""Property-based fuzzing (hypothesis): whatever the input, each entry point either works or raises its
documented error (UserError, BadImage, RowRejected), never another exception.

The answer parser's own properties are in test_parse.py; only what it lacks is here.
"""

from __future__ import annotations

import io
import math
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from productvlm.config import Config, load_config, validate
from productvlm.data.fetch import parse_retry_after
from productvlm.data.images import BadImage, ImageLimits, is_complete_jpeg, to_dataset_jpeg
from productvlm.data.importer import check_rows
from productvlm.data.rows import parse_mapping
from productvlm.data.source import load_table
from productvlm.errors import UserError
from productvlm.models.phi3v.processing_phi3v import check_placeholders
from productvlm.prices import PriceError, find_price, read_price
from productvlm.prompting.parse import parse_answer

# At least 150 examples per test; the profile (tests/conftest.py) decides derandomized or random, and
# `make fuzz` raises the count.
FUZZ = settings(
    max_examples=max(150, settings.default.max_examples),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# ---------------------------------------------------------------- answer parser (what test_parse.py lacks)

numbers = st.one_of(
    st.from_regex(r"[-+]?[0-9][0-9,.' ]{0,40}", fullmatch=True),
    st.integers(-(10**400), 10**400).map(str),  # beyond float range too
)


@FUZZ
@given(st.one_of(st.text(), numbers, numbers.map(lambda n: f"Full Price: {n}")))
def test_parser_fields_are_clean_or_none(text):
    answer = parse_answer(text)
    for field in (answer.title, answer.category):
        assert field is None or (field == field.strip() and field)
    assert answer.price is None or isinstance(answer.price, float)


@FUZZ
@given(numbers)
@example("9" * 400)
def test_parsed_price_is_finite(text):
    for price in (find_price(text), parse_answer(f"Full Price: {text}").price):
        assert price is None or math.isfinite(price)


# ---------------------------------------------------------------- price cells (data/prices.py)


def _group(digits: str, sep: str) -> str:
    head = len(digits) % 3 or 3
    return sep.join([digits[:head]] + [digits[i : i + 3] for i in range(head, len(digits), 3)])


def formatted(cents: int, style: str, mark: str) -> str:
    """A price of `cents` written as spreadsheets and shops write it."""
    units, frac = divmod(cents, 100)
    whole, dec = str(units), f"{frac:02d}"
    text = {
        "plain": f"{whole}.{dec}",
        "us": f"{_group(whole, ',')}.{dec}",
        "eu": f"{_group(whole, '.')},{dec}",
        "space": f"{_group(whole, ' ')},{dec}",
        "swiss": f"{_group(whole, chr(39))}.{dec}",
    }[style]
    return f"{mark} {text}" if mark in ("$", "USD", "US$", "CHF") else f"{text} {mark}".strip()


@FUZZ
@given(
    cents=st.integers(1, 10**11),
    style=st.sampled_from(["plain", "us", "eu", "space", "swiss"]),
    mark=st.sampled_from(["", "$", "USD", "US$", "CHF", "€", "EUR", "kr", "zł", "₩"]),
)
def test_formatted_prices_read_back(cents, style, mark):
    text = formatted(cents, style, mark)
    price = read_price(text)
    assert price is not None and price.value == pytest.approx(cents / 100), text


@FUZZ
@given(st.one_of(st.text(max_size=20), numbers, st.none(), st.integers(), st.floats(), st.booleans()))
@example("1e400")
@example(10**400)
def test_price_cells_are_a_price_or_a_reason(value):
    try:
        price = read_price(value)
    except PriceError as e:
        assert e.reason("full_price").split(":")[0] in (
            "full_price not a number",
            "negative full_price",
            "zero full_price",
            "absurd full_price",
        )
        return
    assert price is None or (math.isfinite(price.value) and 0 < price.value <= 1e9)


# ---------------------------------------------------------------- prompt placeholders

PROMPT_PIECES = st.sampled_from(
    [
        "<|image_1|>",
        "<|image_2|>",
        "<|image_3|>",
        "<|image_0|>",
        "<|image_12|>",
        "<|image_99999999999999999999|>",
        "<|image|>",
        "<|image_",
        "|>",
        "<|image_1|",
        "<|user|>",
        "<|end|>",
        "<|assistant|>",
        "<|endoftext|>",
        "\n",
        " ",
    ]
)
prompts = st.lists(st.one_of(PROMPT_PIECES, st.text(max_size=12)), max_size=10).map("".join)


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from productvlm.models.phi3v import Phi3VProcessor

    return Phi3VProcessor.from_pretrained(tiny_model_dir)


@FUZZ
@given(prompt=st.one_of(prompts, st.text()), tokens=st.lists(st.integers(1, 40), max_size=4))
def test_prompts_encode_or_raise_user_error(processor, prompt, tokens):
    try:
        ids = processor.encode_prompt(prompt, tokens)
    except UserError as e:
        assert str(e).startswith("prompt 0 ")  # says which prompt of the batch
        return
    check_placeholders(prompt, len(tokens))  # what was accepted is valid
    assert all(isinstance(i, int) for i in ids)
    assert ids.count(processor.image_token_id) == sum(tokens)  # one slot per image token, no more


# ---------------------------------------------------------------- config loader


def _field_keys(model: type = Config, prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and hasattr(sub, "model_fields"):
            keys += _field_keys(sub, f"{prefix}{name}.")
        keys.append(prefix + name)
    return keys


KEYS = _field_keys()
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=10),
    st.sampled_from(["lora", "sdpa"]),
)
values = st.recursive(
    scalars,
    lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=5), c, max_size=3)),
    max_leaves=8,
)


def _nest(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        node = out
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {}) if isinstance(node.get(p, {}), dict) else {}
        node[last] = value
    return out


config_dicts = st.one_of(
    st.lists(st.tuples(st.sampled_from(KEYS), values), max_size=6).map(_nest),  # real keys, random values
    st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), values, max_size=4),
)
overrides = st.one_of(
    st.text(max_size=30),
    st.tuples(st.sampled_from(KEYS), st.one_of(st.text(max_size=20), values.map(yaml.safe_dump))).map(
        "=".join
    ),
)


@FUZZ
@given(config_dicts)
def test_config_validate_only_raises_user_error(data):
    try:
        cfg = validate(data)
    except UserError as e:
        assert str(e).startswith("config: ")
        return
    assert isinstance(cfg, Config)


@FUZZ
@given(st.lists(overrides, max_size=4))
def test_config_overrides_only_raise_user_error(items):
    try:
        cfg = load_config(None, items)
    except UserError:
        return
    assert isinstance(cfg, Config)


@FUZZ
@given(st.one_of(st.text(), config_dicts.map(lambda d: yaml.safe_dump(d, allow_unicode=True))))
def test_config_file_text_only_raises_user_error(text):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "run.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            load_config(path)
        except UserError as e:
            assert str(path) in str(e) or str(e).startswith("config")
            return


@pytest.mark.parametrize(
    "content, sets",
    [
        (b"\xff\xfe model: {}", []),
        (b"a: " + b"[" * 3000, []),
        (b"", ["train.lr=" + "[" * 3000]),
        (b"", ["train.lr=.inf"]),
        (b"", ["train.epochs=.inf"]),
    ],
    ids=["latin-1", "deep-file", "deep-set", "inf-lr", "inf-epochs"],
)
def test_config_found_bugs(tmp_path, content, sets):
    path = tmp_path / "run.yaml"
    path.write_bytes(content)
    with pytest.raises(UserError):
        load_config(path, sets)


# ---------------------------------------------------------------- image bytes


def _seed_images() -> dict[str, bytes]:
    im = Image.new("RGB", (40, 30), (200, 30, 10))
    for x in range(40):
        im.putpixel((x, x % 30), (x * 5, 100, 255 - x))
    out = {}
    for fmt in ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"):
        buf = io.BytesIO()
        im.save(buf, fmt)
        out[fmt] = buf.getvalue()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif)
    out["JPEG-EXIF"] = buf.getvalue()
    buf = io.BytesIO()
    im.convert("RGBA").save(buf, "PNG")
    out["PNG-RGBA"] = buf.getvalue()
    return out


SEEDS = _seed_images()
edits = st.lists(
    st.tuples(
        st.sampled_from(["set", "delete", "insert", "truncate"]),
        st.floats(0, 1),
        st.binary(min_size=1, max_size=8),
    ),
    min_size=1,
    max_size=6,
)


def mutate(data: bytes, ops: list[tuple[str, float, bytes]]) -> bytes:
    b = bytearray(data)
    for op, where, payload in ops:
        i = int(where * max(len(b) - 1, 0))
        if op == "set":
            b[i : i + len(payload)] = payload
        elif op == "delete":
            del b[i : i + len(payload)]
        elif op == "insert":
            b[i:i] = payload
        else:
            del b[i:]
    return bytes(b)


image_bytes = st.one_of(
    st.binary(max_size=2000),
    st.sampled_from(sorted(SEEDS)).map(SEEDS.get),
    st.tuples(st.sampled_from(sorted(SEEDS)).map(SEEDS.get), edits).map(lambda t: mutate(*t)),
)


@pytest.mark.filterwarnings("ignore")  # Pillow warns about the corrupt metadata it skips
@settings(FUZZ, max_examples=max(400, FUZZ.max_examples))
@given(image_bytes)
def test_image_bytes_give_an_rgb_jpeg_or_a_reason(data):
    try:
        out = to_dataset_jpeg(data, ImageLimits(min_side=8))
    except BadImage as e:
        assert str(e)  # the reason written to failures.csv
        return
    with Image.open(io.BytesIO(out)) as im:
        im.load()
        assert (im.format, im.mode) == ("JPEG", "RGB") and min(im.size) >= 8
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "a.jpg").write_bytes(out)
        assert is_complete_jpeg(Path(d) / "a.jpg")


@pytest.mark.filterwarnings("ignore")
@FUZZ
@given(image_bytes)
@example(
    b"GIF89a" + bytes(7) + b",\x00\x00\x00\x00\x00\x25\x00\x4a"
)  # 9472x18944 frame: a bomb (test_image_bombs.py)
def test_is_complete_jpeg_never_raises(data):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "a.jpg").write_bytes(data)
        assert is_complete_jpeg(Path(d) / "a.jpg") in (True, False)


# ---------------------------------------------------------------- input tables and rows

COLUMNS = ["product_code", "title", "category3_code", "full_price", "price", "imageurl", "flg_discount"]
cells = st.one_of(
    st.none(),
    st.text(max_size=12),
    st.integers(),
    st.floats(),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
    st.sampled_from(
        ["http://example.com/a.jpg", "ftp://x/y", "file:///etc/passwd", "a.jpg", "-5", "1e400", "NaN"]
    ),
)


@FUZZ
@given(st.lists(st.dictionaries(st.sampled_from(COLUMNS), cells), max_size=12))
@example([{"product_code": "9" * 5000}, {"product_code": 2**64}])  # more digits than int() parses; > int64
@example([{"product_code": 1, "title": "t", "category3_code": "C", "full_price": 1, "flg_discount": "1e400"}])
def test_every_row_is_kept_or_rejected_with_a_reason(rows):
    valid, failures = check_rows(rows, parse_mapping([]), Path("/tmp"))
    assert len(valid) + len(failures) == len(rows)
    numbers = [r.number for r in valid] + [n for n, _, _ in failures]
    assert sorted(numbers) == list(range(1, len(rows) + 1))  # each row exactly once
    assert all(reason for _, _, reason in failures)
    codes = [r.values["product_code"] for r in valid]
    assert len(set(codes)) == len(codes)
    assert all(type(c) is int for c in codes) or all(type(c) is str for c in codes)  # one Arrow type
    assert all(-(2**63) <= c < 2**63 if isinstance(c, int) else 0 < len(c) <= 100 for c in codes)
    assert all(0 < r.values["full_price"] <= 1e9 for r in valid)


@pytest.mark.filterwarnings("ignore")
@FUZZ
@given(
    suffix=st.sampled_from([".csv", ".tsv", ".jsonl", ".json"]),
    content=st.one_of(
        st.binary(max_size=300),
        st.text(max_size=300).map(str.encode),
        st.lists(st.lists(st.text(max_size=6), max_size=5).map(",".join), max_size=5).map(
            lambda r: "\n".join(r).encode()
        ),
    ),
)
def test_any_table_file_loads_or_raises_user_error(suffix, content):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"cat{suffix}"
        path.write_bytes(content)
        try:
            table = load_table(str(path))
        except UserError as e:
            assert str(path) in str(e)
            return
        assert table.rows and all(isinstance(r, dict) for r in table.rows)


@FUZZ
@given(
    st.one_of(
        st.text(max_size=40),
        st.from_regex(r"[A-Z][a-z]{2}, \d{1,2} [A-Z][a-z]{2} \d{1,6} \d\d:\d\d:\d\d GMT"),
    )
)
@example("\u00b2")  # a digit to str.isdigit(), not to float()
def test_retry_after_is_seconds_or_none(value):
    wait = parse_retry_after(value)
    assert wait is None or (isinstance(wait, float) and wait >= 0)


def test_default_profile_is_derandomized():
    """`make test` (and a plain pytest run) must draw the same examples every time: CI never fails by luck."""
    if settings.default.database is not None or not settings.default.derandomize:
        assert settings.get_current_profile_name() == "fuzz", settings.get_current_profile_name()
