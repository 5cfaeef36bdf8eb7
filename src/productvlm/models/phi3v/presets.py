"""Tiny Phi-3-V models for tests and the CPU demo: same architecture, our own tokenizer
(`tokenizer.build_tokenizer`), a vision tower started at 2-D sin-cos positions (`tower_init`).
`init_model(preset, out)` writes one in the official layout.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedTokenizerFast

from productvlm.models.phi3v.configuration_phi3v import Phi3VConfig
from productvlm.models.phi3v.tokenizer import build_tokenizer
from productvlm.models.phi3v.tower_init import init_positions_2d

PRESETS: dict[str, dict] = {
    # ~3M parameters: trains on a CPU in minutes. 112 px crops -> 4x4 = 16 tokens per crop.
    "tiny": dict(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        vision=dict(
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=112,
        ),
        num_crops=4,
    ),
}
# The tiny shape at 168 px crops, 6x6 = 36 tokens per crop (~1.6x the 112 px model's time per step),
# for recipes that need finer detail. On the demo catalog with configs/tiny-cpu.yaml's augmentation,
# 20 epochs (~470 s): 72.4-84.4% held-out category accuracy over four runs, no better than 112 px in
# the same time (README, Train).
PRESETS["tiny-168"] = {**PRESETS["tiny"], "vision": {**PRESETS["tiny"]["vision"], "image_size": 168}}
# The tiny shape with a 2-layer decoder: the CPU recipe's stage 2 is short of passes over the photos, not of
# depth. On the numerals catalog from one stage-1 tower (78.3%): 4 layers x 12 epochs 75.7% test / 73.6%
# validation, 2 layers x 20 epochs 83.2% / 78.3% in 1.2x the time (9.4 s an epoch vs 13 s; README, Train).
PRESETS["tiny-d2"] = {**PRESETS["tiny"], "num_hidden_layers": 2}


def preset_config(name: str, tokenizer: PreTrainedTokenizerFast, **changes) -> Phi3VConfig:
    """The preset's config; `changes` replace its keys (`vision` as a whole dict)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    p = {**PRESETS[name], **changes}
    head_dim = p["hidden_size"] // p["num_attention_heads"]
    half = head_dim // 2
    vocab_size = -(-len(tokenizer) // 64) * 64
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|image|>")}
    return Phi3VConfig(
        vocab_size=vocab_size,
        hidden_size=p["hidden_size"],
        intermediate_size=p["intermediate_size"],
        num_hidden_layers=p["num_hidden_layers"],
        num_attention_heads=p["num_attention_heads"],
        num_key_value_heads=p["num_key_value_heads"],
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        rope_scaling={
            "type": "su",
            "short_factor": [1.0 + 0.02 * i for i in range(half)],
            "long_factor": [1.0 + 0.5 * i for i in range(half)],
        },
        sliding_window=None,
        bos_token_id=1,
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        image_token_id=ids["<|image|>"],
        img_processor={
            "image_dim_out": p["vision"]["hidden_size"],
            "num_img_tokens": (p["vision"]["image_size"] // 14 // 2) ** 2,
            "vision_config": p["vision"],
        },
    )


def generation_config(tokenizer) -> GenerationConfig:
    """Greedy by default; stop at `<|end|>` or `<|endoftext|>`."""
    end, eot = tokenizer.convert_tokens_to_ids("<|end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return GenerationConfig(bos_token_id=1, eos_token_id=[end, eot], pad_token_id=eot, do_sample=False)


def init_model(preset: str, out: str | Path, seed: int = 0, **changes) -> Path:
    """Write a random `preset` model, its tokenizer and processor to `out` (official layout); `changes`
    replace keys of the preset (`preset_config`), e.g. a smaller shape for a test of the pipeline."""
    from productvlm.models.phi3v import Phi3VForCausalLM, Phi3VImageProcessor, Phi3VProcessor

    out = Path(out)
    tokenizer = build_tokenizer()
    config = preset_config(preset, tokenizer, **changes)
    torch.manual_seed(seed)
    model = Phi3VForCausalLM(config)
    init_positions_2d(model)
    model.generation_config = generation_config(tokenizer)
    image_processor = Phi3VImageProcessor(
        num_crops=changes.get("num_crops", PRESETS[preset]["num_crops"]),
        num_img_tokens=config.img_processor["num_img_tokens"],
        crop_size=config.crop_size,
    )
    model.save_pretrained(out)
    Phi3VProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out
