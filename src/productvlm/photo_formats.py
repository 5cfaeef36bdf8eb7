"""The image formats any photo file is opened as: data/images.py's decoder and the model's image processor
(models/phi3v) pass these to Pillow, so no other parser (EPS -> Ghostscript, PSD, ICO ...) ever runs."""

PHOTO_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # Pillow plugin names
OPENED_AS = frozenset({*PHOTO_FORMATS, "MPO"})  # a JPEG with extra frames (phones' depth maps) opens as MPO
SUPPORTED = "JPEG, PNG, WebP, GIF, BMP or TIFF"
