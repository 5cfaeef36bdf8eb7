"""The model a run trains: the base (a folder, hub id or preset written into RUN/base-model), loaded,
then frozen or wrapped with peft for `train.method`, and its parameters grouped per part for the optimizer."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from productvlm.config import Config
from productvlm.errors import UserError
from productvlm.models.loading import DTYPES, qlora_config
from productvlm.models.phi3v import Phi3VForCausalLM, Phi3VProcessor

VISION_PREFIX = "model.vision_embed_tokens.img_processor"
VISION_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
PROJECTOR = ("img_projection", "glb_GN", "sub_GN")


def model_dir(cfg: Config, run: Path) -> str:
    """The folder or hub id to load; a preset is written once into RUN/base-model."""
    if cfg.model.preset is None:
        return cfg.model.path
    from productvlm.models.phi3v.presets import PRESETS, init_model

    if cfg.model.preset not in PRESETS:
        raise UserError(f"model.path: unknown preset {cfg.model.preset!r}; choose from {', '.join(PRESETS)}")
    base = run / "base-model"
    if not (base / "config.json").is_file():
        init_model(cfg.model.preset, base, seed=cfg.train.seed)
    return str(base)


def load_model(cfg: Config, path: str, quantized: bool = True):
    """The model and processor in `path`; for method qlora in 4-bit unless `quantized=False` (stage 1)."""
    try:
        model = Phi3VForCausalLM.from_pretrained(
            path,
            dtype=DTYPES[cfg.model.dtype],
            attn_implementation=cfg.model.attention,
            **(quantization(cfg) if quantized else {}),
        )
        processor = Phi3VProcessor.from_pretrained(path)
    except OSError as e:
        raise UserError(f"model.path {path!r}: cannot load it ({str(e).splitlines()[0]})") from e
    return model, processor


def quantization(cfg: Config) -> dict[str, Any]:
    """from_pretrained's arguments for a qlora base: 4-bit (models.loading.qlora_config) on this process's
    device (the local rank's GPU under DDP)."""
    if cfg.train.method != "qlora":
        return {}
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        raise UserError(
            "train.method qlora under FSDP: sharding 4-bit weights needs a bnb_4bit_quant_storage this "
            "recipe does not set; use DDP (configs/accelerate/ddp.yaml) or method lora"
        )
    from accelerate import PartialState

    return {"quantization_config": qlora_config(cfg.model.dtype), "device_map": {"": PartialState().device}}


def unused_tower_parts(model) -> list[torch.nn.Module]:
    """The CLIP tower's last encoder layer and `post_layernorm`: the model takes the penultimate layer's
    features (as the official one does), so these never get a gradient."""
    vit = model.model.vision_embed_tokens.img_processor.vision_model
    return [vit.encoder.layers[-1], vit.post_layernorm]


def freeze_unused_tower(model) -> None:
    """Frozen, the unused tower weights stay as loaded and saved: trainable, they would stop DDP
    ("parameters that were not used in producing loss"), whose `find_unused_parameters` transformers
    turns off under gradient checkpointing."""
    for part in unused_tower_parts(model):
        part.requires_grad_(False)


def apply_method(model, cfg: Config):
    """Freeze / wrap the model for train.method; returns the model to train."""
    method = cfg.train.method
    freeze_unused_tower(model)
    if method == "full":
        return model
    if method == "frozen_vision":
        model.model.vision_embed_tokens.img_processor.requires_grad_(False)
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if method == "qlora":
        # freezes everything and casts what is not 4-bit (embeddings, norms, projector, lm_head) to fp32;
        # gradient checkpointing is the Trainer's (train.gradient_checkpointing, non-reentrant)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)

    lora = cfg.train.lora
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora_targets(lora.targets, lora.vision, tower_depth(model)),
        use_dora=lora.dora,
        task_type="CAUSAL_LM",
    )
    # peft casts adapters to fp32 unless told not to; in the compute dtype (bf16) they train ~1.4x
    # faster on a GPU (issue 13). fp16 mixed precision needs fp32 adapters (its grad scaler
    # cannot unscale fp16 gradients).
    fp32 = lora.adapter_dtype == "float32" or cfg.train.precision == "fp16"
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=fp32)
    if method == "lora+projector" or lora.projector:
        # requires_grad rather than peft's modules_to_save: the model indexes img_projection[0],
        # which a ModulesToSaveWrapper does not support; these weights are saved beside the adapter.
        embedding = peft_model.base_model.model.model.vision_embed_tokens
        for part in (embedding.img_projection, embedding.glb_GN, embedding.sub_GN):
            part.requires_grad_(True)
    return peft_model


def tower_depth(model) -> int:
    return len(model.model.vision_embed_tokens.img_processor.vision_model.encoder.layers)


def lora_targets(decoder: list[str], vision: bool, tower_layers: int) -> str:
    """peft's target regex: the decoder layers' `decoder` projections, plus with `vision` the CLIP
    tower's, except in its last layer (of `tower_layers`), which the model never uses."""
    names = "|".join(re.escape(t) for t in decoder)
    pattern = rf"^model\.layers\.\d+\..*\.({names})$"
    if vision:
        layers = rf"{re.escape(VISION_PREFIX)}\.vision_model\.encoder\.layers\.(?!{tower_layers - 1}\.)\d+"
        pattern += rf"|^{layers}\..*\.({'|'.join(VISION_TARGETS)})$"
    return pattern


def model_part(name: str) -> str:
    """vision (the CLIP tower), projector (image projection and separators) or decoder."""
    if ".img_processor." in name:
        return "vision"
    if any(f".{p}" in name for p in PROJECTOR):
        return "projector"
    return "decoder"


def param_groups(model, t, decay: set[str] | list[str]) -> list[dict[str, Any]]:
    """Trainable parameters grouped by (part, weight decay), each part at its own learning rate."""
    rates = {"decoder": t.lr, "vision": t.lr_vision or t.lr, "projector": t.lr_projector or t.lr}
    decay = set(decay)
    groups: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((model_part(name), name in decay), []).append(p)
    return [
        {"params": ps, "lr": rates[part], "weight_decay": t.weight_decay if decayed else 0.0, "part": part}
        for (part, decayed), ps in sorted(groups.items())
    ]


def extra_trainables(model) -> dict[str, torch.Tensor]:
    """Trainable parameters a peft adapter file does not hold (train.lora.projector: img_projection, glb_GN, sub_GN)."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return {}
    return {
        n: p.detach().contiguous()
        for n, p in model.named_parameters()
        if p.requires_grad and "lora_" not in n
    }
