"""Only catalog photo formats reach a decoder (data.images: JPEG, PNG, WebP, GIF, BMP, TIFF).

EPS (Pillow would hand it to Ghostscript), PSD, ICO, SVG, PDF and polyglots (a JPEG that is also a ZIP
archive, a PDF or an HTML page) are refused with "not a supported image": as a failures.csv row by
`data import` (a real HTTP server, tests/faultserver.py) and as a 400 `invalid_image` by the API (the
real server around the tiny model). Each file is built here and checked to be what it claims.
"""

from __future__ import annotations

import csv
import io
import re
import struct
import zipfile

import httpx
import pytest
from PIL import Image

from faultserver import ImageServer
from productvlm.data import folder
from productvlm.data.fetch import FetchOptions
from productvlm.data.images import BadImage, decode_photo, to_dataset_jpeg
from productvlm.data.importer import import_dataset
from productvlm.errors import UserError
from productvlm.models.phi3v.image_processing_phi3v import Phi3VImageProcessor
from productvlm.photo_formats import PHOTO_FORMATS
from serve_helpers import data_url, image_message, product_jpeg, running_server

RED = (200, 20, 20)
SCRIPT = b"<script>window.__pwned=1</script>"


def _pillow(fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), RED).save(buf, fmt, **kw)
    return buf.getvalue()


def psd(w: int = 64, h: int = 48) -> bytes:
    """A raw 8-bit RGB Photoshop file (Pillow reads PSD but cannot write it)."""
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, h, w, 8, 3)  # version, channels, h, w, depth, RGB
    sections = struct.pack(">III", 0, 0, 0)  # colour mode data, image resources, layers: all empty
    return header + sections + struct.pack(">H", 0) + bytes(w * h * 3)  # compression 0: raw planes


def svg() -> bytes:
    return (
        b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="48"><rect width="64" height="48"/></svg>'
    )


def jpeg_with_zip() -> bytes:
    """A JPEG with a ZIP archive appended: a browser shows the photo, a ZIP (or JAR) reader the archive."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("index.html", SCRIPT)
    return _pillow("JPEG") + buf.getvalue()


def jpeg_with_html() -> bytes:
    """A whole JPEG (it ends in its end marker) whose comment is a script: served as text/html, it runs.
    Before the decoder looked, import kept such a JPEG byte for byte."""
    return _pillow("JPEG", comment=b"<html><body>" + SCRIPT + b"</body></html>")


def jpeg_with_pdf() -> bytes:
    """A JPEG whose comment starts a PDF: PDF readers look for %PDF- in the first 1024 bytes."""
    return _pillow("JPEG", comment=b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF")


HOSTILE = {
    "eps": _pillow("EPS"),
    "psd": psd(),
    "ico": _pillow("ICO"),
    "svg": svg(),
    "pdf": _pillow("PDF"),
    "jpeg+zip": jpeg_with_zip(),
    "jpeg+html": jpeg_with_html(),
    "jpeg+pdf": jpeg_with_pdf(),
}


def test_the_files_are_what_they_claim():
    """Pillow, left to itself, parses EPS, PSD and ICO (so refusing them is the decoder's doing), and each
    polyglot is a whole JPEG and the other thing at once."""
    for name, fmt in (("eps", "EPS"), ("psd", "PSD"), ("ico", "ICO")):
        with Image.open(io.BytesIO(HOSTILE[name])) as im:
            assert im.format == fmt and min(im.size) >= 16, name
    assert HOSTILE["svg"].startswith(b"<svg") and HOSTILE["pdf"].startswith(b"%PDF-")
    for name in ("jpeg+zip", "jpeg+html", "jpeg+pdf"):
        with Image.open(io.BytesIO(HOSTILE[name])) as im:
            im.load()
            assert (im.format, im.size) == ("JPEG", (64, 48)), name
    assert zipfile.ZipFile(io.BytesIO(HOSTILE["jpeg+zip"])).read("index.html") == SCRIPT
    assert HOSTILE["jpeg+html"].endswith(b"\xff\xd9") and SCRIPT in HOSTILE["jpeg+html"]
    assert b"%PDF-" in HOSTILE["jpeg+pdf"][:1024]


SAID = {  # what the reason says each one is
    "eps": "looks like PostScript/EPS",
    "psd": "looks like PSD",
    "ico": "looks like ICO",
    "svg": "looks like markup",
    "pdf": "looks like PDF",
    "jpeg+zip": "a JPEG that is also a ZIP archive",
    "jpeg+html": "a JPEG that is also an HTML page",
    "jpeg+pdf": "a JPEG that is also a PDF",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_the_decoder_refuses_them(name):
    with pytest.raises(BadImage, match=rf"^not a supported image \({re.escape(SAID[name])}"):
        decode_photo(HOSTILE[name])
    with pytest.raises(BadImage, match=r"^not a supported image \("):
        to_dataset_jpeg(HOSTILE[name])


def test_no_other_parser_is_ever_called(monkeypatch):
    """Pillow's other plugins (EPS -> Ghostscript, PSD, ICO...) never see the bytes, not even to open them."""
    Image.init()
    called = []
    for fmt, (_, accept) in list(Image.OPEN.items()):
        if fmt not in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"):
            monkeypatch.setitem(Image.OPEN, fmt, (lambda *a, f=fmt: called.append(f), accept))
    for data in HOSTILE.values():
        with pytest.raises(BadImage):
            decode_photo(data)
    assert called == []


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_the_six_formats_decode(fmt):
    im = decode_photo(_pillow(fmt))
    assert (im.mode, im.size) == ("RGB", (64, 48))
    assert abs(im.getpixel((10, 10))[0] - RED[0]) < 12


def test_photo_metadata_is_no_polyglot():
    """XMP (XML inside a JPEG) and a phone's extra frames (MPO) are ordinary photo metadata."""
    xmp = b'<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF/></x:xmpmeta>'
    assert decode_photo(_pillow("JPEG", xmp=xmp)).size == (64, 48)
    buf = io.BytesIO()
    frames = [Image.new("RGB", (64, 48), c) for c in (RED, (0, 0, 200))]
    frames[0].save(buf, "MPO", save_all=True, append_images=frames[1:])
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        assert im.format == "MPO"
    assert decode_photo(buf.getvalue()).size == (64, 48)


# ------------------------------------------------------------------ the model's image processor


@pytest.mark.parametrize("name", ["eps", "psd", "ico", "svg", "pdf"])
def test_the_image_processor_opens_files_with_the_same_parsers(tmp_path, monkeypatch, name):
    """A path given to the model's processor (predict on image files, a transformers pipeline) is opened
    with the six photo parsers only: EPS, PSD and ICO, which Pillow alone parses, get a UserError."""
    path = tmp_path / f"photo.{name}"
    path.write_bytes(HOSTILE[name])
    Image.init()
    called = []
    for fmt, (_, accept) in list(Image.OPEN.items()):
        if fmt not in PHOTO_FORMATS:
            monkeypatch.setitem(Image.OPEN, fmt, (lambda *a, f=fmt: called.append(f), accept))
    processor = Phi3VImageProcessor(num_crops=1)
    refused = rf"cannot read image {re.escape(str(path))}: not a supported image"
    with pytest.raises(UserError, match=refused):
        processor(path)
    with pytest.raises(UserError, match=refused):
        processor.calc_num_image_tokens([path])  # reads the header only
    assert called == []


def test_the_image_processor_still_opens_the_six_formats(tmp_path):
    processor = Phi3VImageProcessor(num_crops=1)
    for fmt in PHOTO_FORMATS:
        path = tmp_path / f"photo.{fmt.lower()}"
        path.write_bytes(_pillow(fmt))
        from_file, decoded = processor(path), processor(decode_photo(_pillow(fmt)))
        assert from_file["pixel_values"].equal(decoded["pixel_values"]), fmt


# ------------------------------------------------------------------ import


def test_import_lists_each_as_not_a_supported_image(tmp_path):
    good = product_jpeg(3)
    names = {f"{name.replace('+', '-')}.jpg": data for name, data in HOSTILE.items()} | {"good.jpg": good}
    with ImageServer(names) as server:
        rows = [
            {"product_code": 1000 + i, "title": f"Item {i}", "category3_code": "BAGS", "full_price": "12.5",
             "imageurl": server.url(f"/img/{name}")}
            for i, name in enumerate(names)
        ]  # fmt: skip
        table = tmp_path / "catalog.csv"
        with open(table, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=folder.CATALOG_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        out = tmp_path / "out"
        fetch = FetchOptions(concurrency=4, per_host=4, timeout=5.0, retries=0)
        result = import_dataset(str(table), out, fetch=fetch, progress=False)
    with open(out / folder.FAILURES_CSV) as f:
        reasons = {r["url"].rsplit("/", 1)[1]: r["reason"] for r in csv.DictReader(f)}
    assert sorted(reasons) == sorted(n for n in names if n != "good.jpg")
    for name, reason in reasons.items():
        assert reason.startswith("not a supported image ("), (name, reason)
    assert result.reasons() == {"not a supported image": len(HOSTILE)}
    assert sum(result.counts.values()) == 1


# ------------------------------------------------------------------ API


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    from productvlm.serving.app import ServeSettings, app_from_folder

    with running_server(app_from_folder(tiny_model_dir, ServeSettings(model_name="tiny"))) as url:
        yield url


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_the_api_answers_400_invalid_image(server, name):
    upload = httpx.post(
        f"{server}/v1/catalog", files={"file": (f"{name}.jpg", HOSTILE[name], "image/jpeg")}, timeout=30
    )
    assert upload.status_code == 400, upload.text
    error = upload.json()["error"]
    assert error["code"] == "invalid_image" and "not a supported image" in error["message"]
    chat = httpx.post(
        f"{server}/v1/chat/completions",
        json={"messages": image_message(data_url(HOSTILE[name])), "max_tokens": 2},
        timeout=30,
    )
    assert chat.status_code == 400 and chat.json()["error"]["code"] == "invalid_image", chat.text


def test_the_api_still_reads_a_photo(server):
    r = httpx.post(
        f"{server}/v1/catalog", files={"file": ("a.jpg", product_jpeg(1), "image/jpeg")}, timeout=60
    )
    assert r.status_code == 200 and {"title", "category", "price", "raw"} <= set(r.json())
