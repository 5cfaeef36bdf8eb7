"""Phi3VConfig: Phi-3 decoder config plus the official `embd_layer` / `img_processor` blocks.

It reads the official config.json unchanged (`model_type: phi3_v`, `rope_scaling.type: su`).
Our one extension is `img_processor.vision_config`: CLIPVisionConfig fields that override the
CLIP ViT-L/14-336 defaults, so tiny towers (fewer layers, smaller crops) share the code path.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import CLIPVisionConfig, Phi3Config

# openai/clip-vit-large-patch14-336, which the official code hard-codes.
CLIP_VIT_L_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    attention_dropout=0.0,
    initializer_range=0.02,
    initializer_factor=1.0,
)

DEFAULT_EMBD_LAYER = {
    "embedding_cls": "image",
    "hd_transform_order": "sub_glb",
    "projection_cls": "mlp",
    "use_hd_transform": True,
    "with_learnable_separator": True,
}
DEFAULT_IMG_PROCESSOR = {
    "image_dim_out": 1024,
    "model_name": "openai/clip-vit-large-patch14-336",
    "name": "clip_vision_model",
    "num_img_tokens": 144,
}


@strict
class Phi3VConfig(Phi3Config):
    model_type = "phi3_v"

    embd_layer: dict | None = None
    img_processor: dict | None = None
    image_token_id: int = 32044
    # Phi-3-vision's config.json has no pad_token_id; transformers' Phi-3 default (32000) is right.

    def __post_init__(self, **kwargs):
        # config.json's attention choice (flash_attention_2 in the official files) is not binding:
        # the loader picks SDPA unless the caller asks for another implementation.
        kwargs.pop("_attn_implementation", None)
        rope_scaling = kwargs.get("rope_scaling")
        if rope_scaling and rope_scaling.get("type", rope_scaling.get("rope_type")) == "su":
            # "su" is the old name of LongRoPE; rename before transformers validates it.
            kwargs["rope_scaling"] = {**rope_scaling, "type": "longrope", "rope_type": "longrope"}
        if kwargs.get("rope_scaling") and "factor" not in kwargs["rope_scaling"]:
            # LongRoPE scales cos/sin by sqrt(1 + ln(factor) / ln(original_max)), factor = max / original_max.
            factor = self.max_position_embeddings / self.original_max_position_embeddings
            kwargs["rope_scaling"] = {**kwargs["rope_scaling"], "factor": factor}
        self.embd_layer = {**DEFAULT_EMBD_LAYER, **(self.embd_layer or {})}
        self.img_processor = {**DEFAULT_IMG_PROCESSOR, **(self.img_processor or {})}
        super().__post_init__(**kwargs)
        self._check_embedding_layer()

    def _check_embedding_layer(self) -> None:
        e = self.embd_layer
        unsupported = {
            "embedding_cls": (e.get("embedding_cls"), "image"),
            "hd_transform_order": (e.get("hd_transform_order"), "sub_glb"),
            "projection_cls": (e.get("projection_cls"), "mlp"),
            "use_hd_transform": (e.get("use_hd_transform"), True),
            "with_learnable_separator": (e.get("with_learnable_separator"), True),
        }
        for key, (got, want) in unsupported.items():
            if got != want:
                raise ValueError(f"embd_layer.{key}={got!r} is not supported (only {want!r}, as in Phi-3-V)")
        if self.img_processor.get("name", "clip_vision_model") != "clip_vision_model":
            raise ValueError(
                f"img_processor.name={self.img_processor['name']!r}: only clip_vision_model is supported"
            )

    def to_dict(self) -> dict:
        """Also write `rope_scaling` in the official form (type "su"), which the official code requires."""
        out = super().to_dict()
        rope = out.get("rope_parameters") or {}
        if rope.get("rope_type") == "longrope":
            out["rope_scaling"] = {
                "type": "su",
                "long_factor": rope["long_factor"],
                "short_factor": rope["short_factor"],
            }
        return out

    @property
    def vision_config(self) -> CLIPVisionConfig:
        """The CLIP tower's config: ViT-L/14-336 unless `img_processor.vision_config` overrides fields."""
        overrides = self.img_processor.get("vision_config") or {}
        return CLIPVisionConfig(**{**CLIP_VIT_L_336, **overrides})

    @property
    def crop_size(self) -> int:
        return self.vision_config.image_size

    @property
    def tokens_per_side(self) -> int:
        """Merged (2x2) feature grid side per crop: 12 for 336 px crops with 14 px patches."""
        v = self.vision_config
        return v.image_size // v.patch_size // 2


__all__ = ["Phi3VConfig"]
