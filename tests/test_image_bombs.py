"""Hostile image headers: every format declaring huge or zero sizes, and truncated files.

The image checks must answer (a BadImage reason, or False) and never raise anything else. The cases that
random search found are pinned here so they run on every `make test`, whatever hypothesis draws.
"""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image

from productvlm.data.images import BadImage, ImageLimits, is_complete_jpeg, to_dataset_jpeg

HUGE = (9472, 18944)  # 179 M pixels: above Pillow's own bomb limit (2 * Image.MAX_IMAGE_PIXELS)
BIG = (8000, 8000)  # 64 M pixels: under Pillow's limit, over our default 40 M


def gif_screen(w: int, h: int) -> bytes:
    """Logical screen of w x h and one empty 1x1 frame."""
    frame = b"," + struct.pack("<HHHHBB", 0, 0, 1, 1, 0, 8)
    return b"GIF89a" + struct.pack("<HHBBB", w, h, 0, 0, 0) + frame


def gif_frame(w: int, h: int) -> bytes:
    """A 0x0 screen whose first frame descriptor is w x h, cut off right after the frame's size."""
    return b"GIF89a" + bytes(7) + b"," + struct.pack("<HHHH", 0, 0, w, h)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def jpeg(w: int, h: int) -> bytes:
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, h, w, 3) + b"\x01\x11\x00\x02\x11\x00\x03\x11\x00"
    return b"\xff\xd8" + sof + b"\xff\xd9"


def webp_vp8x(w: int, h: int) -> bytes:
    body = (
        b"VP8X"
        + struct.pack("<I", 10)
        + bytes(4)
        + (w - 1).to_bytes(3, "little")
        + (h - 1).to_bytes(3, "little")
    )
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body


def webp_vp8l(w: int, h: int) -> bytes:
    bits = (w - 1) | ((h - 1) << 14)
    chunk = b"\x2f" + struct.pack("<I", bits) + bytes(16)
    body = b"VP8L" + struct.pack("<I", len(chunk)) + chunk
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body


def bmp(w: int, h: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info) + 64, 0, 0, 14 + len(info)) + info + bytes(64)


def tiff(w: int, h: int) -> bytes:
    tags = [
        (256, 4, w),
        (257, 4, h),
        (258, 3, 8),
        (259, 3, 1),
        (262, 3, 1),
        (273, 4, 8),
        (277, 3, 1),
        (279, 4, 1),
    ]
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", t, typ, 1, v) for t, typ, v in tags)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + bytes(4)


BUILDERS = {
    "gif-screen": gif_screen,
    "gif-frame": gif_frame,
    "png": png,
    "jpeg": jpeg,
    "webp-vp8x": webp_vp8x,
    "webp-vp8l": webp_vp8l,
    "bmp": bmp,
    "tiff": tiff,
}
SIZES = {"huge": HUGE, "big": BIG, "zero": (0, 0), "zero-width": (0, 300)}


def _real(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buf, fmt)
    return buf.getvalue()


def hostile() -> dict[str, bytes]:
    cases = {}
    for name, build in BUILDERS.items():
        for size_name, (w, h) in SIZES.items():
            if name.startswith("webp") and 0 in (w, h):
                continue  # WebP stores size - 1: zero is not expressible
            cases[f"{name}-{size_name}"] = build(w, h)
    for fmt in ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"):
        data = _real(fmt)
        cuts = {"1": 1, "8": 8, "16": 16, "half": len(data) // 2, "last-byte": len(data) - 1}
        for cut_name, cut in cuts.items():
            cases[f"{fmt.lower()}-truncated-{cut_name}"] = data[:cut]
    cases["empty"] = b""
    return cases


CASES = hostile()
# The only truncated files that still decode whole: a GIF without its trailer byte and a PNG without the
# last byte of IEND's CRC (Pillow stops before either). A JPEG, BMP, TIFF or WebP cut anywhere is refused.
TRUNCATED_THAT_DECODE = {"gif-truncated-last-byte", "png-truncated-last-byte"}


@pytest.mark.filterwarnings("ignore")  # Pillow warns about the bombs and corrupt data it meets
@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_bytes_get_a_reason_not_an_exception(name):
    try:
        out = to_dataset_jpeg(CASES[name], ImageLimits(min_side=8))
    except BadImage as e:
        assert str(e)  # the reason written to failures.csv
        return
    assert name in TRUNCATED_THAT_DECODE, name
    with Image.open(io.BytesIO(out)) as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (64, 48))


@pytest.mark.parametrize("name", sorted(TRUNCATED_THAT_DECODE))
def test_the_truncated_files_that_decode_are_still_those(name):
    """If Pillow starts refusing these, TRUNCATED_THAT_DECODE is stale: shrink it."""
    assert to_dataset_jpeg(CASES[name], ImageLimits(min_side=8))


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("fmt", ["jpeg", "bmp", "tiff"])
def test_cut_in_the_pixels_says_truncated(fmt):
    for cut in ("half", "last-byte"):
        with pytest.raises(BadImage, match="^truncated image$"):
            to_dataset_jpeg(CASES[f"{fmt}-truncated-{cut}"], ImageLimits(min_side=8))


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_files_are_not_complete_jpegs(tmp_path, name):
    path = tmp_path / "a.jpg"
    path.write_bytes(CASES[name])
    assert is_complete_jpeg(path) is False


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    "build, size",
    [(b, s) for b in ("gif-screen", "png", "jpeg", "bmp", "tiff") for s in (HUGE, BIG)]
    + [
        ("gif-frame", HUGE),
        ("webp-vp8x", HUGE),
    ],  # below Pillow's limit these are "not a supported image"/"corrupt"
)
def test_declared_sizes_over_the_limit_say_too_many_pixels(build, size):
    with pytest.raises(BadImage, match="too many pixels"):
        to_dataset_jpeg(BUILDERS[build](*size))


def test_gif_bomb_found_by_fuzzing(tmp_path):
    """Found by hypothesis in test_is_complete_jpeg_never_raises: a GIF whose first frame declares
    9472x18944 pixels made Pillow raise DecompressionBombError out of is_complete_jpeg."""
    data = bytes.fromhex("474946383961" + "00" * 7 + "2c" + "00000000" + "0025" + "004a")
    assert data == gif_frame(*HUGE) and len(data) == 22
    with pytest.raises(Image.DecompressionBombError):  # what Pillow does with it, unguarded
        Image.open(io.BytesIO(data))
    path = tmp_path / "a.jpg"
    path.write_bytes(data)
    assert is_complete_jpeg(path) is False
    with pytest.raises(BadImage, match="too many pixels"):
        to_dataset_jpeg(data)


def test_a_sane_jpeg_still_passes(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(_real("JPEG"))
    assert is_complete_jpeg(path)
    assert is_complete_jpeg(path, ImageLimits(max_pixels=64 * 48 - 1)) is False


def test_cases_declare_what_they_say():
    """The builders make headers Pillow reads as the size asked for (else the bomb tests test nothing)."""
    for name in ("png", "jpeg", "bmp", "tiff", "gif-screen"):
        with Image.open(io.BytesIO(BUILDERS[name](1234, 567))) as im:
            assert im.size == (1234, 567), name


@pytest.mark.filterwarnings("ignore")
def test_stats_reads_a_hostile_image_as_unreadable(tmp_path):
    from productvlm.data.stats import readable_size

    for name in ("gif-frame-huge", "png-huge", "tiff-zero", "jpeg-truncated-8"):
        path = tmp_path / f"{name}.jpg"
        path.write_bytes(CASES[name])
        assert readable_size(path) is None, name
