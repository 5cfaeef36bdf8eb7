"""The inference layer: one photo normalisation and one input path for training, predict and serving;
per-row stops."""

from __future__ import annotations

import torch
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from productvlm.evaluation.predict import predict
from productvlm.inference.generate import RowStops
from productvlm.inference.inputs import load_image, photo_tensors
from productvlm.inference.predictor import Predictor
from productvlm.serving.app import ServeSettings, create_app
from productvlm.training.data import CatalogDataset, Collator, Encoder


def cutout(path, background: tuple[int, ...]) -> None:
    """A red product on `background` (RGBA (0, 0, 0, 0) = transparent black, as cut-out PNGs store it)."""
    im = Image.new("RGBA", (120, 80), background)
    ImageDraw.Draw(im).ellipse((20, 10, 100, 70), fill=(200, 30, 30, 255))
    im.save(path)


def spy_on_generate(model, seen: list) -> None:
    generate = model.generate

    def recording(*args, **kwargs):
        seen.append(kwargs["pixel_values"].detach().clone())
        return generate(*args, **kwargs)

    model.generate = recording


def test_transparent_png_gives_the_same_pixels_in_training_predict_and_serving(tiny_model_dir, tmp_path):
    photo, white = tmp_path / "cutout.png", tmp_path / "white.png"
    cutout(photo, (0, 0, 0, 0))
    cutout(white, (255, 255, 255, 255))
    predictor = Predictor(tiny_model_dir, device="cpu", dtype="float32", max_new_tokens=2)
    settings, processor = predictor.settings, predictor.processor

    row = {"image_path": str(photo), "title": "Red ball", "category3_code": "BALL", "full_price": 9}
    encoder = Encoder(processor, settings.prompt, settings.answer, settings.num_crops, 4096)
    training = Collator(processor, settings.num_crops)([CatalogDataset([row], encoder)[0]])["pixel_values"]

    seen: list[torch.Tensor] = []
    spy_on_generate(predictor.model, seen)
    predict(predictor, [photo], progress=False)
    app = create_app(predictor.model, processor, settings, ServeSettings(catalog_max_tokens=2))
    with TestClient(app) as client:
        r = client.post("/v1/catalog", files={"file": ("cutout.png", photo.read_bytes(), "image/png")})
    assert r.status_code == 200, r.text
    predicted, served = seen

    assert torch.equal(predicted, training) and torch.equal(served, training)
    on_white = photo_tensors(processor, [load_image(white)], settings.num_crops)["pixel_values"]
    assert torch.equal(training, on_white)  # transparent pixels are white, not black


def test_row_stops_end_each_row_at_its_limit_or_a_stop_token():
    stops = RowStops([2, 1, 5], {7})
    steps = [[4, 5, 3], [6, 6, 7], [9, 9, 9]]  # the token of each row, one list per decoding step
    done = [stops(torch.tensor([[t] for t in step]), None).tolist() for step in steps]
    assert done == [[False, True, False], [True, True, True], [True, True, True]]
    assert stops.tokens == [[4, 6], [5], [3]]  # the stop token is not kept
    assert stops.finish == ["length", "length", "stop"]
