"""The native Phi-3-V model and processor on the tiny preset: batching, saving, loading, errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor

from productvlm.errors import UserError
from productvlm.models.phi3v import Phi3VConfig, Phi3VForCausalLM, Phi3VProcessor

from conftest import GOLDEN, needs_reference


def photo(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return Phi3VProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def model(request, tiny_model_dir):
    return Phi3VForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation=request.param
    )


PROMPTS = [
    ("<|user|>\n<|image_1|>What is shown in this image?<|end|>\n<|assistant|>\n", [photo(300, 200, 0)]),
    (
        "<|user|>\n<|image_1|>\n<|image_2|>\nCompare them.<|end|>\n<|assistant|>\n",
        [photo(150, 400, 1), photo(90, 90, 2)],
    ),
    ("<|user|>\nName one product.<|end|>\n<|assistant|>\n", None),
]


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_prompt_alone(model, processor, side):
    batch = processor([p for p, _ in PROMPTS], [ims for _, ims in PROMPTS], padding_side=side)
    with torch.no_grad():
        batched = model(**batch).logits
    for i, (prompt, images) in enumerate(PROMPTS):
        alone = processor(prompt, images)
        with torch.no_grad():
            single = model(**alone).logits[0]
        real = batch["attention_mask"][i].bool()
        assert real.sum() == single.shape[0]
        assert (batched[i][real] - single).abs().max().item() <= 1e-4


def test_batched_generation_equals_one_at_a_time(model, processor):
    batch = processor([p for p, _ in PROMPTS], [ims for _, ims in PROMPTS], padding_side="left")
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.no_grad():
        together = model.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1] :]
        for i, (prompt, images) in enumerate(PROMPTS):
            alone = processor(prompt, images)
            one = model.generate(**alone, **kwargs)[0, alone["input_ids"].shape[1] :]
            assert together[i].tolist() == one.tolist()


def test_image_slots_match_size_only_count(processor):
    for w, h in [(300, 200), (150, 400), (90, 90), (1200, 130)]:
        inputs = processor("<|image_1|>hi", [photo(w, h, 3)])
        slots = int((inputs["input_ids"] == processor.image_token_id).sum())
        assert slots == processor.num_image_tokens(w, h)


def test_input_ids_not_modified_and_reusable(model, processor):
    inputs = processor(*PROMPTS[0])
    before = inputs["input_ids"].clone()
    with torch.no_grad():
        a = model(**inputs).logits
        b = model(**inputs).logits
    assert torch.equal(inputs["input_ids"], before)
    assert torch.equal(a, b)


def test_save_then_load_is_bit_exact(tiny_model_dir, tmp_path):
    model = Phi3VForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.save_pretrained(tmp_path)
    again = Phi3VForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@needs_reference
def test_saved_names_are_the_official_ones_and_unique(tmp_path):
    model = Phi3VForCausalLM.from_pretrained(GOLDEN / "tiny-phi3v")
    model.save_pretrained(tmp_path)
    with safe_open(GOLDEN / "tiny-phi3v" / "model.safetensors", "pt") as f:
        official = set(f.keys())
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        saved = set(f.keys())
        ptrs = [f.get_tensor(k).data_ptr() for k in saved]
    assert saved == official
    assert not any("wte" in k for k in saved)
    assert len(set(ptrs)) == len(ptrs)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "phi3_v" and config["rope_scaling"]["type"] == "su"


def test_auto_classes_load_the_folder(tiny_model_dir):
    assert isinstance(AutoConfig.from_pretrained(tiny_model_dir), Phi3VConfig)
    assert isinstance(AutoModelForCausalLM.from_pretrained(tiny_model_dir), Phi3VForCausalLM)
    assert isinstance(AutoProcessor.from_pretrained(tiny_model_dir), Phi3VProcessor)


def test_attention_defaults_to_sdpa_whatever_config_says(tiny_model_dir, tmp_path):
    for f in tiny_model_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["_attn_implementation"] = "flash_attention_2"
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert Phi3VForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"


def test_pickle_weights_refused_unless_allowed(tiny_model_dir, tmp_path):
    model = Phi3VForCausalLM.from_pretrained(tiny_model_dir)
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match="pickle"):
        Phi3VForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(UserError, match="allow_pickle"):
        Phi3VForCausalLM.from_pretrained(tiny_model_dir, use_safetensors=False)


@pytest.mark.parametrize(
    "prompt, n_images, message",
    [
        ("<|image_1|> and <|image_3|>", 2, "no gaps"),
        ("<|image_2|><|image_1|>", 2, "in order"),
        ("<|image_1|> only one", 2, "1 image placeholder"),
        ("no placeholder", 1, "0 image placeholder"),
        ("raw <|image|> token", 0, "reserved token"),
    ],
)
def test_placeholder_errors_are_clear(processor, prompt, n_images, message):
    with pytest.raises(UserError, match=message):
        processor(prompt, [photo(64, 64, i) for i in range(n_images)] or None)


def test_model_rejects_images_that_do_not_match_slots(model, processor):
    inputs = processor(*PROMPTS[0])
    inputs["input_ids"] = inputs["input_ids"][:, :-3].clone()
    inputs["input_ids"][0, -1] = processor.image_token_id
    inputs["attention_mask"] = inputs["attention_mask"][:, :-3]
    with pytest.raises(ValueError, match="do not match"):
        model(**inputs)


def test_generation_across_the_longrope_switch_keeps_the_image(tiny_model_dir, processor):
    """Past 4096 tokens Phi-3 drops the KV cache and recomputes: the image must be fed again."""
    model = Phi3VForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    prompt = f"<|user|>\n<|image_1|>{' scarf' * 1994}<|end|>\n<|assistant|>\n"  # ' scarf' is 2 tokens
    inputs = processor(prompt, [photo(300, 200, 5)])
    n = inputs["input_ids"].shape[1]
    assert 4090 <= n <= 4096
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        # Greedy tokens must be the argmax of one uncached forward over the whole sequence.
        full = model(
            input_ids=out[:, :-1], pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
        )
    assert out.shape[1] > 4097
    assert full.logits[0, n - 1 :].argmax(-1).tolist() == out[0, n:].tolist()


def test_prompt_with_image_slots_but_no_images_is_refused(model, processor):
    inputs = processor(*PROMPTS[0])
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])


def test_decode_step_embeds_without_reading_the_ids(model, processor):
    """A one-token step never holds an image: no slot count (a host sync that breaks fullgraph compile)."""
    assert Phi3VForCausalLM._can_compile_fullgraph
    step = torch.tensor([[processor.image_token_id], [7]])
    with torch.no_grad():
        embeds = model.model.embed(step)
        assert torch.equal(embeds, model.model.embed_tokens(step))
        explained = torch._dynamo.explain(model.model.embed)(step)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_training_loss_on_labelled_positions_equals_full_logits_loss(processor, tiny_model_dir):
    """Training applies the LM head only where labels are; loss and gradients equal the full-logits
    loss (transformers' ForCausalLMLoss), with and without the Trainer's num_items_in_batch."""
    model = Phi3VForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    batch = processor([p for p, _ in PROMPTS], [ims for _, ims in PROMPTS], padding_side="right")
    labels = batch["input_ids"].clone()
    labels[:, : labels.shape[1] // 2] = -100  # a prompt part without labels
    labels[batch["attention_mask"] == 0] = -100
    for items in (None, torch.tensor(int((labels[:, 1:] != -100).sum()) + 3)):
        extra = {} if items is None else {"num_items_in_batch": items}
        losses, grads = [], []
        for training in (False, True):
            model.train(training)
            model.zero_grad()
            out = model(**batch, labels=labels, **extra)
            out.loss.backward()
            losses.append(out.loss.detach())
            grads.append(model.lm_head.weight.grad.clone())
        assert out.logits.shape == (int((labels[:, 1:] != -100).sum()), model.config.vocab_size)
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)


def test_preset_vision_positions_start_as_2d_sincos(tiny_model_dir):
    """A from-scratch preset starts its patch positions at 2-D sin-cos codes: each patch's code is
    more similar to its neighbours' than to far patches', along rows and columns alike; CLS is zero."""
    model = Phi3VForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    weight = model.model.vision_embed_tokens.img_processor.vision_model.embeddings.position_embedding.weight
    grid = model.model.vision_embed_tokens.grid
    codes = torch.nn.functional.normalize(weight[1:].detach(), dim=-1).reshape(grid, grid, -1)
    assert weight[0].abs().sum() == 0
    sim = lambda a, b: float((codes[a] * codes[b]).sum())  # noqa: E731
    centre = (grid // 2, grid // 2)
    for near, far in [
        ((grid // 2, grid // 2 + 1), (grid // 2, 0)),
        ((grid // 2 + 1, grid // 2), (0, grid // 2)),
    ]:
        assert sim(centre, near) > sim(centre, far) + 0.1


def test_one_crop_image_is_encoded_once_and_serves_as_its_global_view(tiny_model_dir, processor):
    """At one crop the global view is the crop itself (bit-identical pixels), so the tower encodes it
    once and the image tokens equal encoding both views; at 4 crops every crop is encoded."""
    model = Phi3VForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    embedding = model.model.vision_embed_tokens
    seen = []
    hook = embedding.img_processor.vision_model.register_forward_hook(lambda m, a, o: seen.append(len(a[0])))
    images = [photo(300, 200, 0), photo(90, 150, 1), photo(700, 300, 2)]
    with torch.no_grad():
        one = processor(["<|image_1|>"] * 3, [[im] for im in images], num_crops=1)
        tokens = embedding(one["pixel_values"], one["image_sizes"]).reshape(3, -1, model.config.hidden_size)
        assert seen == [3]  # not 6
        for pixels, got in zip(one["pixel_values"], tokens):
            assert torch.equal(pixels[0], pixels[1])
            glb, crop = embedding.crop_features(pixels[:2])  # both views, as the official model encodes them
            both = torch.cat(
                [embedding.with_newlines(crop), embedding.glb_GN.reshape(1, -1), embedding.with_newlines(glb)]
            )
            torch.testing.assert_close(got, embedding.img_projection(both), rtol=1e-5, atol=1e-6)
        four = processor(["<|image_1|>"] * 3, [[im] for im in images], num_crops=4)
        embedding(four["pixel_values"], four["image_sizes"])
    hook.remove()
    crops = [
        (int(h) // embedding.crop_size) * (int(w) // embedding.crop_size) for h, w in four["image_sizes"]
    ]
    assert min(crops) > 1 and seen[-1] == sum(1 + n for n in crops)
