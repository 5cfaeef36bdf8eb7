"""Phi3VImageProcessor: golden vectors of the official processor, orientation, modes, errors, round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from productvlm.errors import UserError
from productvlm.models.phi3v.image_processing_phi3v import CLIP_MEAN, CLIP_STD, Phi3VImageProcessor
from productvlm.models.phi3v.image_tokens import hd_grid, num_image_tokens

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
GOLDEN = REFERENCE / "phi3v-golden"
needs_reference = pytest.mark.skipif(
    not (GOLDEN / "cases.json").exists(), reason=f"official reference data not found at {REFERENCE}"
)
MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
STD = torch.tensor(CLIP_STD).view(3, 1, 1)
WHITE = (1.0 - MEAN) / STD  # normalized white, the padding colour


def slow_reference(image: PIL.Image.Image, num_crops: int, cs: int = 336) -> torch.Tensor:
    """The official HD transform of one RGB image, step by step (PIL pad, ToTensor, Normalize, ...)."""
    w, h = image.size
    trans = w < h
    if trans:
        image = image.transpose(PIL.Image.Transpose.TRANSPOSE)
        w, h = h, w
    scale = 1
    while scale * np.ceil(scale / (w / h)) <= num_crops:
        scale += 1
    new_w = (scale - 1) * cs
    new_h = int(new_w / (w / h))
    image = image.resize((new_w, new_h), PIL.Image.Resampling.BILINEAR)
    tar = int(np.ceil(new_h / cs) * cs)
    padded = PIL.Image.new("RGB", (new_w, tar), (255, 255, 255))
    padded.paste(image, (0, int((tar - new_h) / 2)))
    if trans:
        padded = padded.transpose(PIL.Image.Transpose.TRANSPOSE)
    x = torch.from_numpy(np.array(padded)).permute(2, 0, 1).contiguous().float().div(255)
    x = x.sub_(MEAN).div_(STD)
    glob = F.interpolate(x[None], size=(cs, cs), mode="bicubic", align_corners=False)
    _, hh, ww = x.shape
    tiles = x.reshape(1, 3, hh // cs, cs, ww // cs, cs).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3, cs, cs)
    crops = torch.cat([glob, tiles])
    return torch.cat([crops, torch.zeros(num_crops + 1 - len(crops), 3, cs, cs)])


def photo(width: int, height: int, seed: int = 0, mode: str = "RGB") -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([x * 255 / width, y * 255 / height, (x + y) % 256], -1) + rng.normal(
        0, 25, (height, width, 3)
    )
    return PIL.Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).convert(mode)


def untile(pv: torch.Tensor, image_size) -> torch.Tensor:
    """The padded HD image (3, H, W) back from its row-major tiles."""
    h, w = (int(v) for v in image_size)
    cs = pv.shape[-1]
    rows, cols = h // cs, w // cs
    tiles = pv[1 : 1 + rows * cols].reshape(rows, cols, 3, cs, cs)
    return tiles.permute(2, 0, 3, 1, 4).reshape(3, h, w)


# -- golden vectors of the official implementation ------------------------------------------------


def golden_cases():
    if not (GOLDEN / "cases.json").exists():
        return []
    return [c for c in json.loads((GOLDEN / "cases.json").read_text())["cases"] if c["images"]]


@needs_reference
@pytest.mark.reference
@pytest.mark.parametrize("case", golden_cases(), ids=lambda c: c["name"])
def test_matches_official_golden(case):
    proc = Phi3VImageProcessor.from_pretrained(GOLDEN / case["model"])
    paths = [GOLDEN / p for p in case["images"]]
    out = proc(paths, num_crops=case["num_crops"])
    gold = np.load(GOLDEN / f"{case['name']}.npz")
    pv = out["pixel_values"]
    assert pv.dtype == torch.float32
    assert list(pv.shape) == gold["pixel_values_shape"].tolist()
    assert out["image_sizes"].tolist() == gold["image_sizes"].tolist()
    # the golden per-crop statistics are those of the first image's crops
    np.testing.assert_allclose(pv[0].mean(dim=(1, 2, 3)).numpy(), gold["pixel_crop_mean"], atol=2e-3, rtol=0)
    np.testing.assert_allclose(pv[0].std(dim=(1, 2, 3)).numpy(), gold["pixel_crop_std"], atol=2e-3, rtol=0)
    assert sum(out["num_img_tokens"]) == case["n_image_tokens"]
    assert sum(proc.calc_num_image_tokens(paths, num_crops=case["num_crops"])) == case["n_image_tokens"]
    if "pixel_values" in gold.files:  # stored as float16: at most half a float16 step apart (~1e-3 at 2)
        full = torch.from_numpy(gold["pixel_values"].astype(np.float32))
        assert (pv - full).abs().max().item() < 1e-3
        # ours is bit-identical to the official float32 values; allow rare fp16 rounding flips
        assert (pv.half() != torch.from_numpy(gold["pixel_values"])).float().mean().item() < 1e-4


@needs_reference
@pytest.mark.reference
@pytest.mark.parametrize(
    ("folder", "num_crops"), [("phi3-vision-128k-instruct", 16), ("phi3.5-vision-instruct", 4)]
)
def test_loads_official_preprocessor_config(folder, num_crops):
    proc = Phi3VImageProcessor.from_pretrained(REFERENCE / folder)
    assert (proc.num_crops, proc.num_img_tokens, proc.crop_size) == (num_crops, 144, 336)
    assert proc.image_mean == pytest.approx(CLIP_MEAN) and proc.image_std == pytest.approx(CLIP_STD)
    assert "auto_map" not in proc.to_dict()


# -- equal to the step-by-step official algorithm --------------------------------------------------


@pytest.mark.parametrize(
    ("size", "num_crops", "crop_size"),
    [
        ((420, 300), 4, 336),
        ((200, 520), 16, 336),
        ((640, 200), 4, 336),
        ((333, 333), 9, 112),
        ((97, 301), 6, 56),
        ((373, 300), 1, 168),  # one crop: the global view skips the (identity) bicubic resize
        ((300, 373), 1, 112),
    ],
)
def test_fast_path_equals_slow_reference(size, num_crops, crop_size):
    image = photo(*size, seed=sum(size))
    proc = Phi3VImageProcessor(
        num_crops=num_crops, crop_size=crop_size, num_img_tokens=(crop_size // 28) ** 2
    )
    ours = proc(image)["pixel_values"][0]
    assert (ours - slow_reference(image, num_crops, crop_size)).abs().max().item() < 1e-5


def official_padded_size(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """The official calc_hd_transform_size (width, height after resize and padding)."""
    transposed = width < height
    if transposed:
        width, height = height, width
    ratio = width / height
    scale = 1
    while scale * np.ceil(scale / ratio) <= num_crops:
        scale += 1
    new_w = int((scale - 1) * 336)
    padded_h = int(np.ceil(int(new_w / ratio) / 336) * 336)
    return (padded_h, new_w) if transposed else (new_w, padded_h)


def test_token_count_matches_official_formula_on_many_sizes():
    proc = Phi3VImageProcessor(num_crops=16)
    rng = np.random.default_rng(0)
    for width, height, num_crops in zip(
        rng.integers(1, 4000, 3000), rng.integers(1, 4000, 3000), rng.integers(1, 20, 3000), strict=True
    ):
        w, h = official_padded_size(int(width), int(height), int(num_crops))
        official = (h // 336 * w // 336 + 1) * 144 + 1 + (h // 336 + 1) * 12
        assert proc.calc_num_image_tokens_from_image_size(width, height, int(num_crops)) == official


def test_portrait_is_the_transposed_landscape():
    landscape = photo(500, 230, seed=1)
    portrait = landscape.transpose(PIL.Image.Transpose.TRANSPOSE)
    proc = Phi3VImageProcessor(num_crops=8)
    a, b = proc(landscape), proc(portrait)
    (h, w), (h2, w2) = a["image_sizes"][0].tolist(), b["image_sizes"][0].tolist()
    assert (h2, w2) == (w, h) and w > h
    assert torch.equal(
        untile(b["pixel_values"][0], (h2, w2)), untile(a["pixel_values"][0], (h, w)).transpose(1, 2)
    )
    torch.testing.assert_close(
        b["pixel_values"][0, 0], a["pixel_values"][0, 0].transpose(1, 2), atol=1e-5, rtol=0
    )
    assert a["num_img_tokens"] != b["num_img_tokens"]  # one newline per row: rows differ


@pytest.mark.parametrize(
    ("size", "expected"), [((1200, 400), [336, 1008]), ((400, 1000), [672, 336]), ((500, 500), [672, 672])]
)
def test_orientation_shapes_and_tokens(size, expected):
    proc = Phi3VImageProcessor(num_crops=4)
    out = proc([photo(*size)])
    assert out["image_sizes"].tolist() == [expected]
    assert out["image_sizes"].dtype == torch.long
    assert out["pixel_values"].shape == (1, 5, 3, 336, 336)
    rows, cols = hd_grid(*size, 4)
    assert [rows * 336, cols * 336] == expected
    assert out["num_img_tokens"] == [num_image_tokens(*size, 4)] == proc.calc_num_image_tokens(photo(*size))
    assert out["num_img_tokens"][0] == proc.calc_num_image_tokens_from_image_size(*size)


def test_padding_is_white_and_missing_crops_are_zero():
    proc = Phi3VImageProcessor(num_crops=4)
    out = proc(photo(640, 200))  # 1008x315 -> one row of 3 tiles, 21 white rows split 10 / 11
    pv = out["pixel_values"][0]
    assert out["image_sizes"].tolist() == [[336, 1008]]
    assert torch.equal(pv[4], torch.zeros(3, 336, 336))
    hd = untile(pv, (336, 1008))
    torch.testing.assert_close(hd[:, :10], WHITE.expand(3, 10, 1008), atol=1e-6, rtol=0)
    torch.testing.assert_close(hd[:, -11:], WHITE.expand(3, 11, 1008), atol=1e-6, rtol=0)
    assert (hd[:, 10] - WHITE[:, 0]).abs().max() > 0.1  # the image starts right after 10 rows
    assert torch.count_nonzero(pv[:4].flatten(1), dim=1).min() > 0


def test_tiny_image_is_upscaled():
    proc = Phi3VImageProcessor(num_crops=4)
    out = proc(photo(10, 7))
    assert out["image_sizes"].tolist() == [[672, 672]]
    assert out["pixel_values"].shape == (1, 5, 3, 336, 336)


def test_small_crop_size_for_tiny_models():
    proc = Phi3VImageProcessor(num_crops=6, crop_size=56, num_img_tokens=4)
    out = proc([photo(300, 200), photo(90, 400)])
    assert out["pixel_values"].shape == (2, 7, 3, 56, 56)
    assert (out["image_sizes"] % 56 == 0).all()
    assert out["num_img_tokens"] == [
        num_image_tokens(300, 200, 6, 56, 2),
        num_image_tokens(90, 400, 6, 56, 2),
    ]
    with pytest.raises(ValueError, match="num_img_tokens"):
        Phi3VImageProcessor(crop_size=56, num_img_tokens=144)
    with pytest.raises(ValueError, match="multiple of 28"):
        Phi3VImageProcessor(crop_size=50, num_img_tokens=4)


def test_num_crops_per_call_overrides_default():
    proc = Phi3VImageProcessor(num_crops=4)
    image = photo(800, 800)
    assert proc(image, num_crops=16)["pixel_values"].shape == (1, 17, 3, 336, 336)
    assert proc(image)["pixel_values"].shape == (1, 5, 3, 336, 336)
    assert proc.calc_num_image_tokens(image, num_crops=16) == [2509]
    with pytest.raises(ValueError, match="num_crops"):
        proc(image, num_crops=0)


# -- input kinds -----------------------------------------------------------------------------------


def test_modes_rgba_p_l_and_numpy():
    proc = Phi3VImageProcessor(num_crops=1)
    rgb = photo(120, 90)
    base = proc(rgb)["pixel_values"]
    assert torch.equal(proc(np.asarray(rgb))["pixel_values"], base)
    assert torch.equal(proc(rgb.convert("RGBA"))["pixel_values"], base)  # opaque alpha changes nothing

    clear = PIL.Image.new("RGBA", (120, 90), (255, 0, 0, 0))  # fully transparent red -> white
    torch.testing.assert_close(
        proc(clear)["pixel_values"][0, 1], WHITE.expand(3, 336, 336), atol=1e-6, rtol=0
    )
    assert not torch.equal(proc(clear, do_convert_rgb=False)["pixel_values"][0, 1], WHITE.expand(3, 336, 336))

    pal = rgb.convert("P")
    assert torch.equal(proc(pal)["pixel_values"], proc(pal.convert("RGB"))["pixel_values"])

    gray = proc(rgb.convert("L"))["pixel_values"][0] * STD + MEAN  # back to [0, 1]: channels equal
    torch.testing.assert_close(gray[:, 0], gray[:, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(gray[:, 0], gray[:, 2], atol=1e-5, rtol=0)
    assert torch.equal(
        proc(np.asarray(rgb.convert("L")))["pixel_values"], proc(rgb.convert("L"))["pixel_values"]
    )


def test_batch_paths_empty_and_numpy_output(tmp_path):
    path = tmp_path / "a.png"
    photo(300, 200).save(path)
    proc = Phi3VImageProcessor(num_crops=4)
    out = proc([str(path), path, photo(300, 200)], return_tensors="np")
    assert isinstance(out["pixel_values"], np.ndarray) and out["pixel_values"].shape == (3, 5, 3, 336, 336)
    assert np.array_equal(out["pixel_values"][0], out["pixel_values"][2])
    empty = proc([])
    assert empty["pixel_values"].shape == (0, 5, 3, 336, 336) and empty["num_img_tokens"] == []


def test_errors_are_clear(tmp_path):
    proc = Phi3VImageProcessor(num_crops=4)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with pytest.raises(UserError, match="broken.jpg"):
        proc(str(bad))
    truncated = tmp_path / "truncated.png"
    photo(200, 200).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:400])
    with pytest.raises(UserError, match="truncated.png"):
        proc(truncated)
    with pytest.raises(UserError, match="not found"):
        proc(tmp_path / "missing.png")
    with pytest.raises(TypeError, match="PIL image"):
        proc(42)
    with pytest.raises(ValueError, match="uint8"):
        proc(np.zeros((10, 10, 3), dtype=np.float32))
    with pytest.raises(TypeError, match="unexpected"):
        proc(photo(20, 20), size=224)


# -- save / load -----------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    proc = Phi3VImageProcessor(num_crops=6, crop_size=112, num_img_tokens=16)
    proc.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "Phi3VImageProcessor"
    assert (saved["num_crops"], saved["crop_size"], saved["num_img_tokens"]) == (6, 112, 16)
    loaded = Phi3VImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == proc.to_dict()
    image = photo(250, 180)
    assert torch.equal(loaded(image)["pixel_values"], proc(image)["pixel_values"])
    assert Phi3VImageProcessor.from_pretrained(tmp_path, num_crops=2).num_crops == 2


def test_unknown_config_keys_are_tolerated(tmp_path):
    config = {
        "num_crops": 4,
        "num_img_tokens": 144,
        "processor_class": "Phi3VProcessor",
        "some_future_key": 1,
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    assert Phi3VImageProcessor.from_pretrained(tmp_path).num_crops == 4
