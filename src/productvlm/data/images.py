"""The one photo decoder for bytes from outside (import, training, eval, predict, serving), its limits,
and the RGB JPEG the dataset stores.

Only catalog photo formats are parsed: JPEG, PNG, WebP, GIF (first frame), BMP and TIFF. Pillow's
other decoders are never tried: EPS hands the bytes to Ghostscript (a classic remote-code path), and
PSD, ICO, PDF, SVG-like and other rarely used parsers are C or Python code no catalog photo needs.
Bytes that also read as a document in another format (a PDF, a ZIP archive, an HTML page inside a
JPEG: a polyglot) are refused too. The size is read from the header and checked before any pixel is
decoded (decompression-bomb guard); then the image is decoded fully, so a truncated file is caught.
"""

from __future__ import annotations

import io
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from productvlm.photo_formats import OPENED_AS, PHOTO_FORMATS, SUPPORTED

DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_BYTES = 50 * 2**20
DEFAULT_MIN_SIDE = 16
_ORIENTATION_TAG = 0x0112
_JPEG_END = b"\xff\xd9"  # every JPEG the dataset stores ends with this marker
# What Pillow raises on hostile or broken bytes: decoders read past the end (EOFError, struct.error,
# IndexError) or parse nonsense (SyntaxError, ValueError), and a header may declare more pixels than
# Pillow's own bomb limit. UnidentifiedImageError is an OSError.
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
# First bytes of what people upload instead of a photo, to say what it is
_MAGIC = {
    b"%!PS": "PostScript/EPS",
    b"\xc5\xd0\xd3\xc6": "EPS",
    b"%PDF": "PDF",
    b"8BPS": "PSD",
    b"\x00\x00\x01\x00": "ICO",
    b"\x00\x00\x02\x00": "CUR",
    b"PK\x03\x04": "ZIP",
}
_MARKUP = re.compile(rb"<\s*(script|html|body|iframe|svg|object|embed)\b", re.I)
_ZIP_END = b"PK\x05\x06"  # the end-of-central-directory record a ZIP reader looks for at the end


class BadImage(Exception):
    """The bytes are not a usable photo; `str(e)` is the short reason (failures.csv, API errors):
    "not a supported image (...)", "too many pixels (WxH)", "image too small (WxH)", "too large (N bytes)",
    "empty file", "truncated image", "corrupt image (...)"."""


class ImageTooLarge(BadImage):
    """Over `ImageLimits.max_pixels` or `max_bytes` (the API answers `image_too_large`)."""


@dataclass(frozen=True)
class ImageLimits:
    """What a photo may be, checked before any pixel is decoded."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    min_side: int = DEFAULT_MIN_SIDE


def open_photo(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """The photo in `data` with only its header read (allowed format, sane size, no other document
    inside), or BadImage with the reason. Decode it with `normalize_photo` or `im.load()`."""
    if not data:
        raise BadImage("empty file")
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"too large ({len(data):,} bytes, over {limits.max_bytes:,})")
    im = _open_header(io.BytesIO(data))
    if (other := _also_a_document(data)) is not None:
        raise BadImage(f"not a supported image (a {im.format} that is also {other})")
    _check_size(im, limits)
    return im


def decode_photo(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """`data` as the model sees it (`normalize_photo`), or BadImage with the reason."""
    im = open_photo(data, limits)
    try:
        return normalize_photo(im)
    except PIL_ERRORS as e:
        raise _unreadable(e) from e


def load_photo(path: str | Path, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """The photo file at `path`, decoded as `decode_photo` does; BadImage names no path (the caller
    knows which row or file it is). A missing file is FileNotFoundError."""
    return decode_photo(_read(Path(path), limits), limits)


def image_size(path: str | Path, limits: ImageLimits = ImageLimits()) -> tuple[int, int]:
    """(width, height) of the photo file as `load_photo` returns it (EXIF rotation applied), from the
    header only; BadImage when the header is not an allowed, sane photo."""
    with open(path, "rb") as f:
        im = _open_header(f)
        _check_size(im, limits)
        w, h = im.size
        try:
            rotated = im.getexif().get(_ORIENTATION_TAG, 1) in (5, 6, 7, 8)  # by 90 or 270 degrees
        except PIL_ERRORS as e:
            raise _unreadable(e) from e
        return (h, w) if rotated else (w, h)


def _read(path: Path, limits: ImageLimits) -> bytes:
    with open(path, "rb") as f:
        data = f.read(limits.max_bytes + 1)
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"too large (over {limits.max_bytes:,} bytes)")
    return data


def _open_header(fp) -> Image.Image:
    try:
        im = Image.open(fp, formats=PHOTO_FORMATS)  # reads the header only, with these parsers only
    except Image.DecompressionBombError as e:  # Pillow's own limit, above 2 * Image.MAX_IMAGE_PIXELS
        raise ImageTooLarge("too many pixels") from e
    except UnidentifiedImageError as e:
        raise BadImage(f"not a supported image ({_what(fp)}; {SUPPORTED} expected)") from e
    except PIL_ERRORS as e:
        raise _unreadable(e) from e
    if im.format not in OPENED_AS:  # a plugin registered under another name: never decode it
        raise BadImage(f"not a supported image ({im.format}; {SUPPORTED} expected)")
    return im


def _check_size(im: Image.Image, limits: ImageLimits) -> None:
    w, h = im.size
    if w * h > limits.max_pixels:
        raise ImageTooLarge(f"too many pixels ({w}x{h})")
    if min(w, h) < limits.min_side:
        raise BadImage(f"image too small ({w}x{h})")


def _what(fp) -> str:
    fp.seek(0)
    head = fp.read(64)
    for magic, name in _MAGIC.items():
        if head.startswith(magic):
            return f"looks like {name}"
    return "looks like markup" if head.lstrip()[:1] == b"<" else "unknown format"


def _also_a_document(data: bytes) -> str | None:
    """What else `data` reads as: PDF readers look for `%PDF-` in the first 1024 bytes, ZIP readers
    for an end record at the end, browsers run markup anywhere in a page. XMP metadata (XML in a
    JPEG) is no document."""
    if b"%PDF-" in data[:1024]:
        return "a PDF"
    at = data.rfind(_ZIP_END, max(0, len(data) - 22 - 0xFFFF))  # the record: 22 bytes + a comment
    if at >= 0 and at + 22 + int.from_bytes(data[at + 20 : at + 22], "little") == len(data):
        return "a ZIP archive"
    if _MARKUP.search(data) is not None:
        return "an HTML page"  # named, not quoted: the bytes are the sender's
    return None


def _unreadable(e: Exception) -> BadImage:
    # Pillow says "image file is truncated" or "Truncated File Read", depending on where the data ends
    return BadImage("truncated image" if "truncated" in str(e).lower() else f"corrupt image ({e})")


def to_dataset_jpeg(data: bytes, limits: ImageLimits = ImageLimits()) -> bytes:
    """Check that `data` is a whole, allowed, sanely sized photo and return it as an RGB JPEG.

    An RGB JPEG without an EXIF rotation and nothing after its end marker is kept byte for byte;
    anything else is decoded, normalised (`normalize_photo`) and re-encoded.
    """
    im = open_photo(data, limits)
    try:
        im.load()
        rotated = im.getexif().get(_ORIENTATION_TAG, 1) not in (0, 1)
        if im.format == "JPEG" and im.mode == "RGB" and not rotated and data.endswith(_JPEG_END):
            return data
        buf = io.BytesIO()
        normalize_photo(im).save(buf, "JPEG", quality=95)
        return buf.getvalue()
    except PIL_ERRORS as e:
        raise _unreadable(e) from e


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
