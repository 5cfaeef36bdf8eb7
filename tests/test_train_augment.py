"""data.augment: geometric only, same size, same draws for the same (seed, epoch, sample), off for eval."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from productvlm.config import AugmentConfig, load_config
from productvlm.errors import UserError
from productvlm.training.augment import augment, border_colour, sample_rng, warp
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
        def __call__(self, row):
            from productvlm.training.data import Encoded

            return Encoded([1, 2], [-100, 2], row["image_path"])

    rows = [{"image_path": str(path)}]
    off = CatalogDataset(rows, Enc(), augment=AugmentConfig(scale=0.2))[0]["image"]
    assert np.array_equal(np.asarray(off), np.asarray(photo()))
    on = CatalogDataset(rows, Enc(), augment=ON, seed=3)
    first = np.asarray(on[0]["image"])
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
