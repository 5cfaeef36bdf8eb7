"""Validating downloaded image bytes and turning them into the RGB JPEG the dataset stores."""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MIN_SIDE = 16
# Formats catalog photos come in. Pillow's other decoders are never tried: some are rarely exercised
# C code, and EPS would hand the downloaded bytes to Ghostscript.
PHOTO_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
_ORIENTATION_TAG = 0x0112
_JPEG_END = b"\xff\xd9"  # every JPEG the dataset stores ends with this marker
# What Pillow raises on hostile or broken bytes, besides UnidentifiedImageError (an OSError): decoders
# read past the end (EOFError, struct.error, IndexError) or parse nonsense (SyntaxError, ValueError), and
# a header may declare more pixels than Pillow's own bomb limit.
PIL_ERRORS = (
    OSError,
    EOFError,
    SyntaxError,
    ValueError,
    IndexError,
    TypeError,
    struct.error,
    Image.DecompressionBombError,
)


class BadImage(Exception):
    """The bytes are not a usable image; `str(e)` is the short reason written to failures.csv."""


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = DEFAULT_MIN_SIDE


def to_dataset_jpeg(data: bytes, limits: ImageLimits = ImageLimits()) -> bytes:
    """Check that `data` is a whole, sanely sized image and return it as an RGB JPEG.

    The size is read from the header and checked against `max_pixels` before any pixel is decoded
    (decompression-bomb guard). Then the image is decoded fully, so a truncated file is caught. An RGB
    JPEG without an EXIF rotation and nothing after its end marker is kept byte for byte; anything else
    is converted and re-encoded.
    """
    if not data:
        raise BadImage("empty file")
    try:
        im = Image.open(io.BytesIO(data), formats=_photo_formats())  # reads the header only
    except Image.DecompressionBombError as e:  # Pillow's own limit, above 2 * Image.MAX_IMAGE_PIXELS
        raise BadImage("too many pixels") from e
    except UnidentifiedImageError as e:
        raise BadImage("not an image") from e
    except PIL_ERRORS as e:
        raise _unreadable(e) from e
    w, h = im.size
    if w * h > limits.max_pixels:
        raise BadImage(f"too many pixels ({w}x{h})")
    if min(w, h) < limits.min_side:
        raise BadImage(f"image too small ({w}x{h})")
    try:
        im.load()
        rotated = im.getexif().get(_ORIENTATION_TAG, 1) not in (0, 1)
        if im.format == "JPEG" and im.mode == "RGB" and not rotated and data.endswith(_JPEG_END):
            return data
        return _encode_rgb(ImageOps.exif_transpose(im) if rotated else im)
    except PIL_ERRORS as e:
        raise _unreadable(e) from e


def _unreadable(e: Exception) -> BadImage:
    # Pillow says "image file is truncated" or "Truncated File Read", depending on where the data ends
    return BadImage("truncated image" if "truncated" in str(e).lower() else f"corrupt image ({e})")


def _photo_formats() -> list[str]:
    Image.init()
    return [f for f in PHOTO_FORMATS if f in Image.OPEN]  # AVIF only where Pillow was built with it


def _encode_rgb(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    _on_white(im).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _on_white(im: Image.Image) -> Image.Image:
    """RGB, with transparent pixels composited onto white (a plain convert would make them black)."""
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        rgb = Image.new("RGB", rgba.size, (255, 255, 255))
        rgb.paste(rgba, mask=rgba.getchannel("A"))
        return rgb
    return im.convert("RGB")


def normalize_photo(im: Image.Image) -> Image.Image:
    """The photo as the model sees it everywhere (import, training, eval, predict, serving): upright
    (EXIF orientation applied), transparent pixels on white, RGB. Decodes the pixels."""
    return _on_white(ImageOps.exif_transpose(im))


def is_complete_jpeg(path: Path, limits: ImageLimits = ImageLimits()) -> bool:
    """Cheap check of a file we wrote earlier (atomically): an RGB JPEG header with a sane size.

    Only the JPEG parser is tried, and any header it cannot make sense of (another format, a bomb, a
    file without its end marker) means "no": the caller then fetches the image again.
    """
    try:
        with open(path, "rb") as f:
            f.seek(max(f.seek(0, 2) - 2, 0))
            if f.read(2) != _JPEG_END:
                return False
        with Image.open(path, formats=["JPEG"]) as im:
            w, h = im.size
            return im.mode == "RGB" and 0 < w * h <= limits.max_pixels
    except PIL_ERRORS:
        return False
