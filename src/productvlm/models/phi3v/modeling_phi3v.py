"""Phi-3-Vision / Phi-3.5-Vision on current transformers, loading the official weights unchanged.

The decoder is transformers' own `Phi3Model` (fused qkv / gate_up, LongRoPE); the vision tower is
built from transformers' CLIP modules. Our code is the HD image embedding (crops -> 2x2-merged
features -> tile grid with learned newline/separator vectors -> MLP projection) and the glue that
scatters image features into the token embeddings at the `<|image|>` slots, as in Llava.

Module names equal the official checkpoint's 592 weight names; the official `wte` alias of
`embed_tokens` is not a module here, so nothing is stored twice.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import GenerationMixin, Phi3ForCausalLM, Phi3Model, Phi3PreTrainedModel
from transformers import initialization as init
from transformers.loss.loss_utils import fixed_cross_entropy
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.clip.modeling_clip import CLIPEncoder, CLIPVisionEmbeddings

from productvlm.errors import UserError
from productvlm.models.phi3v.configuration_phi3v import Phi3VConfig


class Phi3VCLIPVisionTransformer(nn.Module):
    """CLIP ViT with the official `vision_model.*` weight names; returns the penultimate layer.

    The official model takes `hidden_states[-2]`, so the last encoder layer and `post_layernorm`
    never affect the output. We skip the last layer instead of computing and discarding it;
    its weights stay (and are saved) so checkpoints keep all 592 official tensors.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.pre_layrnorm(self.embeddings(pixel_values))
        for layer in self.encoder.layers[:-1]:
            hidden = layer(hidden, None)
        return hidden


class Phi3VCLIPTower(nn.Module):
    """Holds the ViT under `img_processor.vision_model`, as the official checkpoint names it."""

    def __init__(self, config):
        super().__init__()
        self.vision_model = Phi3VCLIPVisionTransformer(config)


class Phi3VImageEmbedding(nn.Module):
    """Pixel crops -> projected image tokens, in the official "sub_glb" HD layout."""

    def __init__(self, config: Phi3VConfig):
        super().__init__()
        self.config = config
        self.vision_config = config.vision_config
        self.vision_config._attn_implementation = config._attn_implementation or "sdpa"
        self.img_processor = Phi3VCLIPTower(self.vision_config)
        dim = self.vision_config.hidden_size
        self.image_dim_out = dim
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, dim * 4))
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, dim * 4))
        self.img_projection = nn.Sequential(
            nn.Linear(dim * 4, config.hidden_size),
            nn.GELU(),
            nn.Linear(config.hidden_size, config.hidden_size),
        )
        self.crop_size = self.vision_config.image_size
        self.grid = self.vision_config.image_size // self.vision_config.patch_size  # 24 for the real model

    def crop_features(self, crops: torch.Tensor) -> torch.Tensor:
        """(n, 3, c, c) crops -> (n, grid/2, grid/2, 4*dim) 2x2-merged patch features (CLS dropped)."""
        n, g, dim = crops.shape[0], self.grid, self.image_dim_out
        feats = self.img_processor.vision_model(crops)[:, 1:]
        feats = feats.reshape(n, g // 2, 2, g // 2, 2, dim).permute(0, 1, 3, 2, 4, 5)
        return feats.reshape(n, g // 2, g // 2, 4 * dim)

    def with_newlines(self, grid: torch.Tensor) -> torch.Tensor:
        """(rows, cols, C) -> (rows * (cols + 1), C): a learned `sub_GN` after every row."""
        newline = self.sub_GN.reshape(1, 1, -1).expand(grid.shape[0], 1, -1)
        return torch.cat([grid, newline], dim=1).reshape(-1, grid.shape[-1])

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """pixel_values (n_images, max_crops + 1, 3, c, c), image_sizes (n_images, 2) -> (tokens, hidden).

        Only the crops an image really has are encoded (not the all-zero padding crops), all
        images' crops in one batch through the vision tower. An image of one crop is encoded once:
        its global view is that crop (the HD image is one crop, resized to one crop: an identity), so
        the tower's output serves as both, which halves its work at `num_crops` 1.
        """
        # The tower uses the decoder's attention implementation (set_attn_implementation changes it).
        self.vision_config._attn_implementation = self.config._attn_implementation or "sdpa"
        c = self.crop_size
        grids = [(int(h) // c, int(w) // c) for h, w in image_sizes.tolist()]
        counts = [1 if h * w == 1 else 1 + h * w for h, w in grids]
        crops = torch.cat([pixel_values[i, :n] for i, n in enumerate(counts)])
        crops = crops.to(next(self.img_projection.parameters()).dtype)  # also under peft's modules_to_save
        features = self.crop_features(crops).split(counts)

        tokens = []
        m = self.grid // 2
        for (h, w), feats in zip(grids, features):
            glb = self.with_newlines(feats[0])
            tiles = feats[-h * w :].reshape(h, w, m, m, -1).permute(0, 2, 1, 3, 4).reshape(h * m, w * m, -1)
            tokens.append(torch.cat([self.with_newlines(tiles), self.glb_GN.reshape(1, -1), glb]))
        return self.img_projection(torch.cat(tokens))


class Phi3VPreTrainedModel(Phi3PreTrainedModel):
    config: Phi3VConfig
    config_class = Phi3VConfig
    _no_split_modules = ["Phi3DecoderLayer", "CLIPEncoderLayer"]
    _supports_flex_attn = False
    _can_compile_fullgraph = True  # the decode step: images enter only at prefill

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, CLIPVisionEmbeddings):
            std = module.config.initializer_range
            init.normal_(module.class_embedding, mean=0.0, std=module.embed_dim**-0.5)
            init.normal_(module.patch_embedding.weight, mean=0.0, std=std)
            init.normal_(module.position_embedding.weight, mean=0.0, std=std)
            init.copy_(module.position_ids, torch.arange(module.num_positions).expand((1, -1)))
        elif isinstance(module, Phi3VImageEmbedding):
            init.zeros_(module.glb_GN)
            init.zeros_(module.sub_GN)


class Phi3VModel(Phi3VPreTrainedModel, Phi3Model):
    """Phi-3 decoder plus `vision_embed_tokens`; image features replace the `<|image|>` embeddings."""

    def __init__(self, config: Phi3VConfig):
        super().__init__(config)
        self.vision_embed_tokens = Phi3VImageEmbedding(config)
        self.post_init()

    def embed(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with the image slots filled by the images' features, in order.

        A decode step (one token per row, never an image) returns the plain embeddings without
        looking at the ids' values: no host-device sync, so the step compiles as one graph.
        """
        embeds = self.embed_tokens(input_ids)
        if pixel_values is None:
            if input_ids.shape[1] > 1:  # a prompt: image slots without images are a caller's mistake
                n_slots = int((input_ids == self.config.image_token_id).sum())
                if n_slots:
                    raise ValueError(f"input_ids hold {n_slots} image slots but no pixel_values were given")
            return embeds
        slots = input_ids == self.config.image_token_id
        n_slots = int(slots.sum())
        if image_sizes is None:
            raise ValueError("pixel_values need image_sizes (the processor returns both)")
        features = self.vision_embed_tokens(pixel_values, image_sizes).to(embeds.dtype)
        if features.shape[0] != n_slots:
            raise ValueError(
                f"{features.shape[0]} image tokens from {len(image_sizes)} image(s) but {n_slots} image slots "
                "in input_ids: prompt and images do not match (use the processor to build inputs)"
            )
        return embeds.masked_scatter(slots.unsqueeze(-1), features)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ):
        if inputs_embeds is None and input_ids is not None:
            inputs_embeds = self.embed(input_ids, pixel_values, image_sizes)
        if position_ids is None and attention_mask is not None and attention_mask.ndim == 2:
            position_ids = positions_from_mask(attention_mask, inputs_embeds.shape[1])
        return Phi3Model.forward(
            self,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )


def positions_from_mask(attention_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Positions that skip padding, so a left-padded row sees the same positions as when alone."""
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return positions[:, -seq_len:]


class Phi3VForCausalLM(Phi3VPreTrainedModel, Phi3ForCausalLM, GenerationMixin):
    _tied_weights_keys = {}

    def __init__(self, config: Phi3VConfig):
        Phi3VPreTrainedModel.__init__(self, config)
        self.model = Phi3VModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, allow_pickle: bool = False, **kwargs):
        """Load a folder or hub id in the official layout (safetensors, official weight names).

        Attention is SDPA unless `attn_implementation=` says "eager" or "flash_attention_2";
        config.json's `_attn_implementation` is ignored. Pickle weights (.bin/.pt) are refused
        unless `allow_pickle=True`, since unpickling can run code. No code from the folder runs.
        """
        kwargs.setdefault("attn_implementation", "sdpa")
        kwargs.pop("trust_remote_code", None)
        if not allow_pickle:
            if kwargs.get("use_safetensors") is False:
                raise UserError(
                    "use_safetensors=False loads pickle weights: pass allow_pickle=True to allow it"
                )
            kwargs["use_safetensors"] = True
            _refuse_pickle_only_folder(pretrained_model_name_or_path)
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        _stop_at_end_tokens(model)
        return model

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ):
        if inputs_embeds is None and input_ids is not None:
            inputs_embeds = self.model.embed(input_ids, pixel_values, image_sizes)
        if labels is not None and self.training:
            return self._labelled_loss(inputs_embeds, attention_mask, position_ids, labels, **kwargs)
        return Phi3ForCausalLM.forward(
            self,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    def _labelled_loss(self, inputs_embeds, attention_mask, position_ids, labels, **kwargs):
        """Training's loss with the LM head applied only where a label is (the answer: ~30 of a
        sample's 800-2,500 tokens with the real model), so that no fp32 (tokens x 32k) logits tensor
        is built for the prompt and image (0.5 GB per 4k-token sample). Same loss as transformers'
        ForCausalLMLoss; `logits` holds the labelled positions only, (n_labels, vocab)."""
        outputs = self.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            **kwargs,
        )
        targets = labels[:, 1:].to(inputs_embeds.device)
        keep = targets != -100
        logits = self.lm_head(outputs.last_hidden_state[:, :-1][keep])
        loss = fixed_cross_entropy(logits.float(), targets[keep], kwargs.get("num_items_in_batch"))
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(
        self, input_ids, cache=None, pixel_values=None, image_sizes=None, is_first_iteration=False, **kwargs
    ):
        inputs = super().prepare_inputs_for_generation(
            input_ids, cache=cache, is_first_iteration=is_first_iteration, **kwargs
        )
        # Images are needed whenever the whole prompt is (re)processed: the first step, and when
        # Phi-3's LongRoPE switch at 4096 tokens drops the cache and recomputes everything.
        if inputs.get("input_ids") is not None and inputs["input_ids"].shape[1] == input_ids.shape[1]:
            inputs["pixel_values"] = pixel_values
            inputs["image_sizes"] = image_sizes
        return inputs


OFFICIAL_VOCAB_SIZE, OFFICIAL_END_ID, OFFICIAL_ENDOFTEXT_ID = 32064, 32007, 32000


def _stop_at_end_tokens(model: Phi3VForCausalLM) -> None:
    """The official generation_config stops at id 2 only; chat answers end with <|end|> (32007)."""
    if model.config.vocab_size != OFFICIAL_VOCAB_SIZE:
        return  # our presets save their own stop tokens
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    model.generation_config.eos_token_id = eos + [
        t for t in (OFFICIAL_END_ID, OFFICIAL_ENDOFTEXT_ID) if t not in eos
    ]
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = OFFICIAL_ENDOFTEXT_ID


def _refuse_pickle_only_folder(path) -> None:
    folder = Path(str(path))
    if not folder.is_dir():
        return  # a hub id: use_safetensors=True makes transformers refuse pickle files there
    has_safetensors = any(folder.glob("*.safetensors"))
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
    if pickles and not has_safetensors:
        raise UserError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}); unpickling can run code. "
            "Convert them to safetensors, or pass allow_pickle=True if you trust the files."
        )


__all__ = ["Phi3VForCausalLM", "Phi3VModel", "Phi3VPreTrainedModel"]
