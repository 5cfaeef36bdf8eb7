"""data.augment: geometric only, same size, same draws for the same (seed, epoch, sample), off for eval."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from productvlm.config import AugmentConfig, load_config
from productvlm.errors import UserError
from productvlm.models.phi3v import Phi3VImageProcessor
from productvlm.training.augment import at_model_size, augment, border_colour, sample_rng, warp
from productvlm.training.data import CatalogDataset

ON = AugmentConfig(enabled=True, scale=0.1, translate=0.1, rotate=10, hflip=True, jpeg_quality=(50, 95))


def photo(w=120, h=90) -> Image.Image:
    """A red square on a light backdrop, off centre."""
    img = Image.new("RGB", (w, h), (230, 230, 225))
    ImageDraw.Draw(img).rectangle([20, 20, 60, 60], fill=(200, 30, 30))
    return img


def test_same_size_and_deterministic_per_seed_epoch_and_sample():
    img = photo()
    a = augment(img, ON, sample_rng(0, 1, 7))
    assert a.size == img.size and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(augment(img, ON, sample_rng(0, 1, 7))))
    others = [sample_rng(0, 2, 7), sample_rng(0, 1, 8), sample_rng(1, 1, 7)]
    assert all(not np.array_equal(np.asarray(a), np.asarray(augment(img, ON, r))) for r in others)


def test_colours_are_kept_and_corners_filled_with_the_backdrop():
    img = photo()
    out = np.asarray(warp(img, 1.0, 20, 0.1, 0.0, False)).reshape(-1, 3)
    assert border_colour(img) == (230, 230, 225)
    # every output pixel is the backdrop, the product red, or a blend of the two (bilinear edges)
    colours = {tuple(p) for p in out}
    assert (230, 230, 225) in colours and (200, 30, 30) in colours
    assert all(p[1] == p[2] or abs(p[1] - p[2]) <= 5 for p in colours)  # no hue from anywhere else


def test_identity_warp_and_flip_move_the_product():
    img = photo()
    same = warp(img, 1.0, 0.0, 0.0, 0.0, False)
    assert np.abs(np.asarray(same, dtype=int) - np.asarray(img, dtype=int)).max() <= 1
    flipped = np.asarray(warp(img, 1.0, 0.0, 0.0, 0.0, True))
    assert tuple(flipped[40, 119 - 40]) == (200, 30, 30) and tuple(flipped[40, 40]) == (230, 230, 225)
    shifted = np.asarray(warp(img, 1.0, 0.0, 0.25, 0.0, False))  # 30 px to the right
    assert tuple(shifted[40, 85]) == (200, 30, 30) and tuple(shifted[40, 25]) == (230, 230, 225)


def test_disabled_changes_nothing_and_blank_images_stay_blank(tmp_path):
    path = tmp_path / "p.png"
    photo().save(path)

    class Enc:
        num_crops, processor = 1, SimpleNamespace(image_processor=SimpleNamespace(crop_size=56))

        def __call__(self, row):
            from productvlm.training.data import Encoded

            return Encoded([1, 2], [-100, 2], row["image_path"])

    rows = [{"image_path": str(path)}]
    off = CatalogDataset(rows, Enc(), augment=AugmentConfig(scale=0.2))[0]["image"]
    assert np.array_equal(np.asarray(off), np.asarray(photo()))
    on = CatalogDataset(rows, Enc(), augment=ON, seed=3)
    first = np.asarray(on[0]["image"])
    assert on[0]["image"].size == (56, 42)  # warped at the size the processor resizes it to
    on.set_epoch(1)
    assert not np.array_equal(first, np.asarray(on[0]["image"]))
    on.set_epoch(0)
    assert np.array_equal(first, np.asarray(on[0]["image"]))
    blank = CatalogDataset(rows, Enc(), blank_images=True, augment=ON)[0]["image"]
    assert len(set(blank.getdata())) == 1


@pytest.mark.parametrize(
    "item, key",
    [
        ("data.augment.scale=0.9", "data.augment.scale"),
        ("data.augment.rotate=-1", "data.augment.rotate"),
        ("data.augment.translate=0.5", "data.augment.translate"),
        ("data.augment.jpeg_quality=[90,40]", "data.augment.jpeg_quality"),
        ("data.augment.jpeg_quality=[0,40]", "data.augment.jpeg_quality"),
        ("data.augment.jpeg_quality=70", "data.augment.jpeg_quality"),
        ("data.augment.colour=0.1", "data.augment.colour: unknown key"),
    ],
)
def test_bad_augment_values_are_named(item, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_config(None, [item])


@pytest.mark.parametrize("num_crops, crop", [(1, 112), (1, 168), (4, 112), (16, 56)])
def test_augmenting_at_model_size_keeps_token_counts_and_pixels(num_crops, crop):
    """The warp works on the photo at the processor's size: same image tokens for every size, and
    the same pixel values as the full-size photo whenever the processor's resize is then a copy."""
    proc = Phi3VImageProcessor(num_crops=num_crops, crop_size=crop, num_img_tokens=(crop // 28) ** 2)
    exact = 0
    for w, h in [(120, 90), (90, 120), (373, 373), (800, 533), (533, 800), (300, 520), (1000, 61), (61, 700)]:
        img = photo(w, h)
        small = at_model_size(img, num_crops, crop)
        assert proc.calc_num_image_tokens(small) == proc.calc_num_image_tokens(img)
        a, b = proc(small)["pixel_values"], proc(img)["pixel_values"]
        assert a.shape == b.shape
        if torch.equal(a, b):
            exact += 1
    assert exact >= 6
