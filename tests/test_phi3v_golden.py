"""Our Phi-3-V against vectors computed by Microsoft's official implementation (../shared/reference)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from productvlm.models.phi3v import Phi3VConfig, Phi3VForCausalLM, Phi3VProcessor

from conftest import GOLDEN, REFERENCE, needs_reference

pytestmark = needs_reference

CASES = json.loads((GOLDEN / "cases.json").read_text())["cases"] if GOLDEN.is_dir() else []
IMAGE_TOKEN_ID = 32044


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def models(request):
    return {
        name: Phi3VForCausalLM.from_pretrained(
            GOLDEN / name, dtype=torch.float32, attn_implementation=request.param
        )
        for name in ("tiny-phi3v", "tiny-phi35v")
    }


@pytest.fixture(scope="module")
def processors():
    return {name: Phi3VProcessor.from_pretrained(GOLDEN / name) for name in ("tiny-phi3v", "tiny-phi35v")}


def golden(case):
    return dict(np.load(GOLDEN / f"{case['name']}.npz"))


def encode(processors, case, with_answer=True):
    images = [Image.open(GOLDEN / p) for p in case["images"]]
    text = case["prompt"] + (case["answer"] if with_answer else "")
    return processors[case["model"]](text, images or None, num_crops=case["num_crops"])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_processor_matches_official(processors, case):
    ref = golden(case)
    inputs = encode(processors, case)
    expected_ids = np.where(ref["input_ids"] < 0, IMAGE_TOKEN_ID, ref["input_ids"])
    assert inputs["input_ids"][0].tolist() == expected_ids.tolist()
    assert int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum()) == case["n_image_tokens"]
    if not case["images"]:
        assert "pixel_values" not in inputs
        return
    assert inputs["image_sizes"].tolist() == ref["image_sizes"].tolist()
    pv = inputs["pixel_values"]
    assert list(pv.shape[1:]) == ref["pixel_values_shape"].tolist()[1:]
    first = pv[0]  # per-crop statistics are stored for the first image
    np.testing.assert_allclose(first.mean(dim=(1, 2, 3)).numpy(), ref["pixel_crop_mean"], atol=2e-3)
    np.testing.assert_allclose(first.std(dim=(1, 2, 3)).numpy(), ref["pixel_crop_std"], atol=2e-3)
    if "pixel_values" in ref:
        np.testing.assert_allclose(pv.numpy(), ref["pixel_values"].astype(np.float32), atol=2e-3)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_logits_and_loss_match_official(models, processors, case):
    ref = golden(case)
    inputs = encode(processors, case)
    labels = inputs["input_ids"].clone()
    labels[:, : case["prompt_len"]] = -100
    with torch.no_grad():
        out = models[case["model"]](**inputs, labels=labels)
    logits = out.logits[0, torch.as_tensor(ref["positions"])]
    scale = float(ref["logits_mean_abs"])
    assert (logits - torch.as_tensor(ref["logits"])).abs().max().item() <= 1e-3 * scale
    assert abs(out.loss.item() - float(ref["loss"])) <= 1e-3


@pytest.mark.parametrize(
    "case", [c for c in CASES if "generated" in np.load(GOLDEN / f"{c['name']}.npz")], ids=lambda c: c["name"]
)
def test_greedy_generation_matches_official(models, processors, case):
    ref = golden(case)
    inputs = encode(processors, case, with_answer=False)
    n = len(ref["generated"])
    with torch.no_grad():
        out = models[case["model"]].generate(
            **inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None
        )
    assert out[0, inputs["input_ids"].shape[1] :].tolist() == ref["generated"].tolist()


def test_full_size_weight_names_equal_official_index():
    index = json.loads((REFERENCE / "phi3-vision-128k-instruct" / "model.safetensors.index.json").read_text())
    config = Phi3VConfig.from_json_file(REFERENCE / "phi3-vision-128k-instruct" / "config.json")
    with torch.device("meta"):
        model = Phi3VForCausalLM(config)
    assert sorted(model.state_dict()) == sorted(index["weight_map"])
    assert len(index["weight_map"]) == 592
    n_params = sum(p.numel() for p in model.parameters())
    assert 4.1e9 < n_params < 4.2e9


@pytest.mark.parametrize("name", ["phi3-vision-128k-instruct", "phi3.5-vision-instruct"])
def test_official_configs_load(name):
    config = Phi3VConfig.from_json_file(REFERENCE / name / "config.json")
    assert config.rope_parameters["rope_type"] == "longrope"
    assert config.crop_size == 336 and config.tokens_per_side == 12
    assert config.vision_config.num_hidden_layers == 24 and config.vision_config.hidden_act == "quick_gelu"
    assert config.to_dict()["rope_scaling"]["type"] == "su"  # official code reads this back
