"""Every place that feeds a model moves the inputs to the model's device through `inputs.to_model`.

On a CPU-only machine a forgotten move goes unnoticed (the inputs are already where the model is), so
the `moved` fixture swaps in a `to_model` that hands out fresh copies and remembers them, and `watch`
makes a model note every tensor input (to forward or generate) that is not one of those copies.
"""

from __future__ import annotations

import sys

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

import productvlm.inference.decode  # noqa: F401  (its warm-up moves inputs too: patched with the rest)
import productvlm.inference.inputs as inputs_module
from productvlm.evaluation.predict import predict
from productvlm.inference.inputs import batch, prepare_rows
from productvlm.inference.predictor import Predictor
from productvlm.serving.app import ServeSettings, create_app
from productvlm.training.vision_pretrain import GlobalViews, TowerClassifier, ValidationPhotos


@pytest.fixture
def moved(monkeypatch) -> list[torch.Tensor]:
    """The tensors `to_model` handed out (kept alive, so no other tensor reuses their memory)."""
    original = inputs_module.to_model
    handed_out: list[torch.Tensor] = []

    def recording(inputs, model):
        out = {k: v.clone() if torch.is_tensor(v) else v for k, v in original(inputs, model).items()}
        handed_out.extend(v for v in out.values() if torch.is_tensor(v))
        return out

    for name, module in list(sys.modules.items()):
        if name.startswith("productvlm") and getattr(module, "to_model", None) is original:
            monkeypatch.setattr(module, "to_model", recording)
    return handed_out


def watch(model, moved: list[torch.Tensor]) -> tuple[list[str], list[str]]:
    """(checked calls, inputs that bypassed `to_model`) of `model`'s forward and generate from now on;
    the forward calls generate makes itself (from its own tensors) are not checked."""
    checked, bypassed, inside_generate = [], [], []

    def check(what, args, kwargs):
        storages = {t.untyped_storage().data_ptr() for t in moved}
        checked.append(what)
        for key, value in [*enumerate(args), *kwargs.items()]:
            if torch.is_tensor(value) and value.untyped_storage().data_ptr() not in storages:
                bypassed.append(f"{what}: {key}")

    def pre_forward(module, args, kwargs):
        if not inside_generate:
            check("forward", args, kwargs)

    model.register_forward_pre_hook(pre_forward, with_kwargs=True)
    if hasattr(model, "generate"):
        generate = model.generate

        def checked_generate(*args, **kwargs):
            check("generate", args, kwargs)
            inside_generate.append(True)
            try:
                return generate(*args, **kwargs)
            finally:
                inside_generate.pop()

        model.generate = checked_generate
    return checked, bypassed


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "ball.png"
    im = Image.new("RGB", (120, 80), (240, 240, 240))
    ImageDraw.Draw(im).ellipse((20, 10, 100, 70), fill=(200, 30, 30))
    im.save(path)
    return path


@pytest.fixture
def predictor(tiny_model_dir):
    return Predictor(tiny_model_dir, device="cpu", dtype="float32", max_new_tokens=2)


def test_to_model_puts_tensors_on_the_model_device():
    model = torch.nn.Linear(2, 2, device="meta")
    out = inputs_module.to_model({"input_ids": torch.ones(1, 3), "n": 3}, model)
    assert out["input_ids"].device.type == "meta" and out["n"] == 3


def test_the_check_catches_inputs_that_skip_to_model(predictor, photo, moved):
    checked, bypassed = watch(predictor.model, moved)
    rows = prepare_rows(predictor.processor, predictor.settings, [{"image_path": str(photo)}])
    predictor.model.generate(**batch(predictor.processor, rows), max_new_tokens=1)
    assert checked == ["generate"] and {b.split(": ")[1] for b in bypassed} >= {"input_ids", "pixel_values"}


def test_predict_and_serving_feed_the_model_through_to_model(predictor, photo, moved):
    checked, bypassed = watch(predictor.model, moved)
    predict(predictor, [photo], progress=False)  # Predictor -> generate_answers (also the training eval's)
    app = create_app(
        predictor.model, predictor.processor, predictor.settings, ServeSettings(catalog_max_tokens=2)
    )
    with TestClient(app) as client:
        r = client.post("/v1/catalog", files={"file": ("ball.png", photo.read_bytes(), "image/png")})
    assert r.status_code == 200, r.text
    assert checked == ["generate", "generate"] and bypassed == []


def test_stage_one_accuracy_feeds_the_tower_through_to_model(predictor, photo, moved):
    model, processor = predictor.model, predictor.processor
    classifier = TowerClassifier(model.model.vision_embed_tokens, 2)
    checked, bypassed = watch(classifier, moved)
    rows = [{"image_path": str(photo)}] * 3
    photos = ValidationPhotos(rows, [0, 1, 1], GlobalViews(processor, predictor.num_crops), batch=2)
    share = photos.accuracy(classifier)
    assert share in (1 / 3, 2 / 3) and checked == ["forward", "forward"] and bypassed == []
