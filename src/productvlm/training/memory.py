"""Peak GPU memory of a training run, per device, from its config alone (no weights load).

    weights + gradients + optimizer state + max(activations, optimizer-step temporaries) + other

Weights, gradients and optimizer state are parameter counts (from the model's widths: config.json, a
preset, or the official Phi-3-V widths) times their bytes for `train.method`, `model.dtype`,
`train.optim` and the sharding. Activations are what autograd keeps for the backward pass, per
token per layer, at the model's real widths: `decoder_layer_bytes` and `vision_layer_bytes` count
the tensors one Phi-3 decoder layer and one CLIP encoder layer save (their sum matches
`measure_layer_bytes`, which runs a layer under `saved_tensors_hooks`; tests/test_memory_plan.py
holds them together), times the tokens of the worst batch: the longest sample of the dataset's
train split (image tokens by the processor's rule from each photo's size) or, without a dataset,
the largest image any photo can make at `data.num_crops`. GB here means 2**30 bytes, as GPU memory
is quoted (a "24 GB" card has 24 GiB).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING

from productvlm.config import Config, LoraConfig
from productvlm.errors import UserError
from productvlm.training.model import VISION_TARGETS

if TYPE_CHECKING:
    from productvlm.models.phi3v import Phi3VConfig

GB = 2**30
FILL = 0.9  # a plan fits when it needs at most this share of the GPU; the rest: allocator fragmentation
CUDA_CONTEXT = GB // 2  # CUDA context + cuBLAS workspace: outside torch's allocator, inside the GPU's memory
GPU_MEMORY_ENV = "PRODUCTVLM_GPU_MEMORY_GB"
SHARDINGS = ("ddp", "fsdp", "zero1", "zero2", "zero3")
LORA_METHODS = ("lora", "lora+projector", "qlora")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# bitsandbytes NF4 with double quantization: 4 bits a weight, an 8-bit absmax per 64 weights, an fp32
# absmax per 256 of those
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
ADAM8_BYTES = 2 + 2 * 4 / 256  # bitsandbytes 8-bit AdamW: two uint8 moments + an fp32 absmax per 256
ANSWER_TOKENS = 48  # a catalog answer's tokens when there are no rows to measure them on
CHARS_PER_TOKEN = 3  # catalog text in Phi-3's tokenizer, rounded down (so tokens round up)
OFFICIAL = {  # the official configs' widths, so a hub id plans before (or without) its download
    "microsoft/Phi-3-vision-128k-instruct": dict(sliding_window=131072),
    "microsoft/Phi-3.5-vision-instruct": dict(sliding_window=262144, pad_token_id=32000),
}
OFFICIAL_WIDTHS = dict(
    hidden_size=3072,
    intermediate_size=8192,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32064,
)


# ---------------------------------------------------------------- the model's widths


def model_config_of(path: str) -> Phi3VConfig:
    """config.json of `model.path` without its weights: a preset, a folder, an official hub id, or any
    hub id AutoConfig can read (offline: when it is cached)."""
    from pathlib import Path

    from productvlm.models.phi3v import Phi3VConfig

    if path.startswith("preset:"):
        return preset_widths(path.removeprefix("preset:"))
    if Path(path).is_dir():
        if not (Path(path) / "config.json").is_file():
            raise UserError(f"model.path {path}: no config.json in that folder")
        return Phi3VConfig.from_pretrained(path)
    if path in OFFICIAL:
        return Phi3VConfig(**OFFICIAL_WIDTHS, **OFFICIAL[path])
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(
            f"model.path {path}: cannot read its config.json ({str(e).splitlines()[0]}); "
            "plan with a local folder, or download the model first"
        ) from e


@cache
def preset_widths(name: str) -> Phi3VConfig:
    """A preset's config without training its tokenizer (11 s): only the vocabulary's size is needed."""
    from productvlm.models.phi3v.presets import PRESETS, preset_config
    from productvlm.models.phi3v.tokenizer import SPECIAL_TOKENS, VOCAB_SIZE

    if name not in PRESETS:
        raise UserError(f"model.path: unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    size = VOCAB_SIZE + len(SPECIAL_TOKENS)

    class Vocabulary:  # what preset_config reads of a tokenizer
        def __len__(self):
            return size

        def convert_tokens_to_ids(self, token):
            return SPECIAL_TOKENS.index(token)

    return preset_config(name, Vocabulary())


@dataclass(frozen=True)
class Widths:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_dim: int
    vocab: int
    v_hidden: int
    v_intermediate: int
    v_layers: int
    v_heads: int
    v_tokens: int  # tokens per crop in the CLIP tower: patches + CLS
    patch: int
    crop: int
    tokens_per_side: int

    @classmethod
    def of(cls, mc: Phi3VConfig) -> Widths:
        v = mc.vision_config
        return cls(
            mc.hidden_size,
            mc.intermediate_size,
            mc.num_hidden_layers,
            mc.num_attention_heads,
            mc.num_key_value_heads * (mc.hidden_size // mc.num_attention_heads),
            mc.vocab_size,
            v.hidden_size,
            v.intermediate_size,
            v.num_hidden_layers,
            v.num_attention_heads,
            (v.image_size // v.patch_size) ** 2 + 1,
            v.patch_size,
            v.image_size,
            mc.tokens_per_side,
        )

    def decoder_linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each decoder layer's projection (no biases)."""
        h, i = self.hidden, self.intermediate
        return {
            "qkv_proj": (h, h + 2 * self.kv_dim),
            "o_proj": (h, h),
            "gate_up_proj": (h, 2 * i),
            "down_proj": (i, h),
        }

    def vision_linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each CLIP layer's projection (each with a bias)."""
        d, i = self.v_hidden, self.v_intermediate
        return {**{n: (d, d) for n in VISION_TARGETS[:4]}, "fc1": (d, i), "fc2": (i, d)}


@dataclass(frozen=True)
class Params:
    """Parameter counts by part. `*_layer_linear`: the nn.Linear weights of one layer (what qlora quantizes)."""

    decoder_layer_linear: int
    decoder_layer_rest: int  # two RMSNorms
    vision_layer_linear: int
    vision_layer_rest: int  # biases, two LayerNorms
    embeddings: int  # token embeddings
    head: int  # final norm + lm_head
    vision_rest: int  # patch and position embeddings, CLS, pre/post LayerNorm
    projector: int  # img_projection, glb_GN, sub_GN

    @classmethod
    def of(cls, w: Widths) -> Params:
        h, d = w.hidden, w.v_hidden
        return cls(
            sum(i * o for i, o in w.decoder_linears().values()),
            2 * h,
            sum(i * o for i, o in w.vision_linears().values()),
            sum(o for _, o in w.vision_linears().values()) + 4 * d,
            w.vocab * h,
            h + w.vocab * h,
            3 * w.patch**2 * d + d + w.v_tokens * d + 4 * d,
            4 * d * h + h + h * h + h + 8 * d,
        )

    def decoder(self, layers: int) -> int:
        return layers * (self.decoder_layer_linear + self.decoder_layer_rest) + self.embeddings + self.head

    def vision(self, layers: int) -> int:
        return layers * (self.vision_layer_linear + self.vision_layer_rest) + self.vision_rest


def lora_params(linears: dict[str, tuple[int, int]], targets: list[str], lora: LoraConfig) -> int:
    """Adapter parameters on one layer: r x (in + out) per targeted projection, + out for DoRA's magnitude."""
    return sum(
        lora.r * (i + o) + (o if lora.dora else 0) for name, (i, o) in linears.items() if name in targets
    )


# ---------------------------------------------------------------- activations per token per layer


def decoder_layer_bytes(
    w: Widths,
    *,
    act: int = 2,
    norms_train: bool = True,
    lora: LoraConfig | None = None,
    attention: str = "sdpa",
    seq: int = 0,
) -> int:
    """Bytes one Phi-3 decoder layer keeps for backward, per token. Each term is a tensor autograd saves
    (measured: `measure_layer_bytes`): the RMSNorms' fp32 input and 1/rms (+ their bf16 output when
    the norm weights train), the projections' inputs, the fused qkv output (v is a view of it), the
    rotated q and k, the attention output and the projection's contiguous copy of it, softmax
    statistics (SDPA: log-sum-exp; eager: the (seq x seq) probabilities, fp32 and act copies), the
    fused gate_up output, SiLU's output and the gated product; per LoRA adapter its rank-r middle
    (+ one input-wide tensor with dropout, as measured here; + DoRA's base and adapter outputs: an
    estimate, not measured)."""
    h, i = w.hidden, w.intermediate
    norms = 2 * (4 * h + 4 + (act * h if norms_train else 0))
    attn = act * (h + (h + 2 * w.kv_dim) + (h + w.kv_dim) + 2 * h)
    attn += (4 + act) * w.heads * seq - act * h if attention == "eager" else 4 * w.heads
    mlp = act * (h + 4 * i)
    return norms + attn + mlp + adapters_bytes(w.decoder_linears(), lora, act)


def vision_layer_bytes(
    w: Widths, *, act: int = 2, lora: LoraConfig | None = None, attention: str = "sdpa", trains: bool = True
) -> int:
    """Bytes one CLIP encoder layer keeps for backward, per token: the LayerNorms' inputs, statistics
    and outputs, q, k, v, the attention output (SDPA writes it in the layout out_proj reads: no copy),
    softmax statistics, and quick_gelu's input, sigmoid and product; LoRA adapters as in the decoder."""
    if not trains:
        return 0
    d = w.v_hidden
    saved = act * (2 * d + 2 * d + 3 * d + d) + 2 * 2 * 4 + act * 3 * w.v_intermediate
    saved += (4 + act) * w.v_heads * w.v_tokens - act * d if attention == "eager" else 4 * w.v_heads
    return saved + adapters_bytes(w.vision_linears(), lora, act)


def adapters_bytes(linears: dict[str, tuple[int, int]], lora: LoraConfig | None, act: int) -> int:
    if lora is None:
        return 0
    targets = lora.targets if "qkv_proj" in linears else VISION_TARGETS
    total = 0
    for name, (i, o) in linears.items():
        if name in targets:
            total += act * lora.r + (act * i if lora.dropout else 0) + (2 * act * o if lora.dora else 0)
    return total


def measure_layer_bytes(
    mc: Phi3VConfig,
    part: str = "decoder",
    lora: LoraConfig | None = None,
    attention: str = "sdpa",
    seq: int = 32,
) -> float:
    """Bytes per token that one real-width layer (`part`: decoder or vision) keeps for backward in bf16 on
    this machine: its forward runs under `saved_tensors_hooks`, and every distinct storage autograd
    saves that is not a parameter (nor the rotary tables all layers share) is counted once."""
    import torch
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer
    from transformers.models.phi3.modeling_phi3 import Phi3DecoderLayer, Phi3RotaryEmbedding

    torch.manual_seed(0)
    if part == "decoder":
        mc = mc.__class__.from_dict({**mc.to_dict(), "_attn_implementation": attention})
        with torch.device("meta"):  # weights left uninitialised (their values do not change what is saved)
            layer, tokens = Phi3DecoderLayer(mc, 0), seq
        x = torch.randn(1, seq, mc.hidden_size, dtype=torch.bfloat16)
        positions = torch.arange(seq)[None]
        shared = Phi3RotaryEmbedding(mc)(x, positions)
        run = lambda: layer(x, position_ids=positions, position_embeddings=shared)  # noqa: E731
        targets = lora.targets if lora else []
    else:
        vc = mc.vision_config
        vc._attn_implementation = attention
        with torch.device("meta"):
            layer, tokens = CLIPEncoderLayer(vc), (vc.image_size // vc.patch_size) ** 2 + 1
        x, shared = torch.randn(1, tokens, vc.hidden_size, dtype=torch.bfloat16), ()
        run = lambda: layer(x, None)  # noqa: E731
        targets = VISION_TARGETS
    layer = layer.to_empty(device="cpu").to(torch.bfloat16).train()
    if lora is not None:
        from peft import LoraConfig as PeftLora
        from peft import inject_adapter_in_model

        layer.requires_grad_(False)
        config = PeftLora(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            use_dora=lora.dora,
            target_modules=targets,
        )
        layer = inject_adapter_in_model(config, layer).to(torch.bfloat16)
        for name, p in layer.named_parameters():
            p.requires_grad_("lora_" in name)
    x.requires_grad_(True)
    skip = {t.untyped_storage().data_ptr() for t in [*layer.parameters(), *shared]}
    saved: dict[int, int] = {}

    def keep(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        run()
    return sum(saved.values()) / tokens


# ---------------------------------------------------------------- what one device processes per step


@dataclass(frozen=True)
class Workload:
    """The worst batch of a run: `batch` rows of `tokens` tokens (padded to the longest), `crops` CLIP
    crops and `image_tokens` image tokens per row, `labels` answer tokens per row."""

    batch: int
    tokens: int
    crops: int
    image_tokens: int
    labels: int
    source: str


def image_cost(w: Widths, width: int, height: int, num_crops: int) -> tuple[int, int]:
    """(image tokens, CLIP crops) of a photo: the processor's rule, and the crops the tower encodes
    (the grid plus the global view; a one-crop image is encoded once)."""
    from productvlm.models.phi3v.image_tokens import hd_grid, num_image_tokens

    rows, cols = hd_grid(width, height, num_crops, w.crop)
    tokens = num_image_tokens(width, height, num_crops, w.crop, w.tokens_per_side)
    return tokens, 1 if rows * cols == 1 else rows * cols + 1


def worst_image(w: Widths, num_crops: int, limit: int) -> tuple[int, int]:
    """(image tokens, crops) of the costliest photo at `num_crops` within `limit` image tokens (a
    sample over data.max_tokens_per_sample is refused), over every crop grid it allows, tall ones (more
    newline tokens) included."""
    grids = [(r, c) for r in range(1, num_crops + 1) for c in range(1, num_crops // r + 1)]
    costs = sorted(image_cost(w, c * w.crop, r * w.crop, num_crops) for r, c in grids)
    return max((cost for cost in costs if cost[0] <= limit), default=costs[0])


def prompt_tokens(cfg: Config) -> int:
    """The prompt's text tokens (its image slots aside), estimated from its characters."""
    import re

    special = r"<\|[^|]*\|>"
    text = re.sub(special, "", cfg.data.prompt)
    return math.ceil(len(text) / CHARS_PER_TOKEN) + len(re.findall(special, cfg.data.prompt)) + 1  # + BOS


def answer_tokens(cfg: Config, rows: list[dict]) -> int:
    """The longest answer's tokens (with its closing <|end|>), estimated from its characters."""
    from productvlm.prompting.templates import render

    if not rows:
        return ANSWER_TOKENS
    return math.ceil(max(len(render(cfg.data.answer, row, "answer")) for row in rows) / CHARS_PER_TOKEN) + 1


def workload(cfg: Config, w: Widths, photo: tuple[int, int] | None = None) -> Workload:
    """The worst batch: its photo the costliest of `photo`, of the train split in data.dir (sizes from
    the headers), or of any photo at data.num_crops that data.max_tokens_per_sample lets through."""
    d, t = cfg.data, cfg.train
    rows = train_rows(cfg) if photo is None else []
    answer = answer_tokens(cfg, rows)
    text = prompt_tokens(cfg) + answer
    if photo is not None:
        (image, crops), source = image_cost(w, *photo, d.num_crops), f"a {photo[0]}x{photo[1]} photo"
    elif rows:
        sizes = photo_sizes(tuple(r["image_path"] for r in rows))
        image, crops = max(image_cost(w, *s, d.num_crops) for s in sizes)
        source = f"the costliest of {len(rows)} photos in {d.dir}/train"
    else:
        (image, crops), source = (
            worst_image(w, d.num_crops, d.max_tokens_per_sample - text),
            f"the costliest photo shape at num_crops {d.num_crops} within {d.max_tokens_per_sample} tokens",
        )
    tokens = image + text
    if not t.packing:
        return Workload(t.batch_size, tokens, crops, image, answer, source)
    per_row = t.pack_length / tokens  # a packed row holds pack_length tokens of samples like this one
    return Workload(
        t.batch_size,
        t.pack_length,
        math.ceil(crops * per_row),
        math.ceil(image * per_row),
        math.ceil(answer * per_row),
        f"{source}, packed into {t.pack_length}-token rows",
    )


@cache
def photo_sizes(paths: tuple[str, ...]) -> set[tuple[int, int]]:
    """(width, height) of the photos, from their headers (read once per process: a run plans twice)."""
    from productvlm.inference.inputs import image_size

    return {image_size(p) for p in paths}


def train_rows(cfg: Config) -> list[dict]:
    from pathlib import Path

    from productvlm.data.folder import read_split

    if not (Path(cfg.data.dir) / "train").is_dir():
        return []
    return read_split(cfg.data.dir, "train")[: cfg.data.max_train_rows]


# ---------------------------------------------------------------- the plan


@dataclass
class MemoryPlan:
    """Bytes per device. `total` = weights + gradients + optimizer + max(activations, optimizer_step) + other:
    the optimizer's step temporaries exist only once the activations are freed. `other`: the CUDA
    context (outside torch's allocator), logits and loss, the batch's pixels, qlora's dequantized
    weight; `parts` itemises activations and other."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    other: int
    checkpointing: bool
    tokens_per_sample: int
    optimizer_step: int = 0
    batch: int = 1
    method: str = "lora"
    devices: int = 1
    sharding: str = "ddp"
    source: str = ""
    # activations by part (not additive with checkpointing: see `activation_parts`), other by part
    parts: dict[str, int] = field(default_factory=dict)
    other_parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return (
            self.weights
            + self.gradients
            + self.optimizer
            + max(self.activations, self.optimizer_step)
            + self.other
        )

    @property
    def allocated(self) -> int:
        """What torch.cuda.max_memory_allocated would report: the total less the CUDA context."""
        return self.total - self.other_parts.get("CUDA context", 0)

    def fits(self, memory: int) -> bool:
        return self.total <= FILL * memory

    def heading(self) -> str:
        """What was planned: method, batch, tokens and where they come from, devices."""
        return (
            f"{self.method}, batch {self.batch} x {self.tokens_per_sample} tokens ({self.source}), "
            f"{self.devices} device(s) {self.sharding}"
        )

    def describe(self) -> str:
        ckpt = "on" if self.checkpointing else "off"
        return f"{self.heading()}, gradient checkpointing {ckpt}: ~{gb(self.total)} GB per device"

    def rows(self) -> list[tuple[str, int]]:
        return [
            ("weights", self.weights),
            ("gradients", self.gradients),
            ("optimizer state", self.optimizer),
            ("optimizer step temporaries", self.optimizer_step),
            ("activations", self.activations),
            *((f"  {k}", v) for k, v in self.parts.items()),
            ("other", self.other),
            *((f"  {k}", v) for k, v in self.other_parts.items()),
            ("total", self.total),
        ]


def gb(n: float) -> str:
    """Bytes as GB (2**30), one decimal (two below 1 GB)."""
    return f"{n / GB:.1f}" if n >= GB else f"{n / GB:.2f}"


def plan_memory(
    cfg: Config,
    *,
    model_config: Phi3VConfig | None = None,
    devices: int = 1,
    sharding: str = "ddp",
    checkpointing: bool | None = None,
    photo: tuple[int, int] | None = None,
    memory: int | None = None,
) -> MemoryPlan:
    """Peak GPU memory per device for `cfg` on `devices` GPUs with `sharding` (ddp, fsdp = full shard,
    zero1/2/3 = DeepSpeed). `checkpointing` None: train.gradient_checkpointing, `auto` resolved against
    `memory` (default: `gpu_memory()`). `photo` (width, height): plan for that photo instead of data.dir's."""
    if sharding not in SHARDINGS:
        raise UserError(f"--sharding {sharding}: choose from {', '.join(SHARDINGS)}")
    mc = model_config if model_config is not None else model_config_of(cfg.model.path)
    if checkpointing is None:
        checkpointing = resolve_checkpointing(cfg, memory, devices, sharding, mc, photo)
    w = Widths.of(mc)
    load = workload(cfg, w, photo)
    weights, gradients, optimizer, step = states(cfg, w, devices, sharding)
    parts = activation_parts(cfg, w, load, checkpointing)
    activations = parts.pop("peak")
    other = other_parts(cfg, w, load)
    return MemoryPlan(
        int(weights),
        int(gradients),
        int(optimizer),
        int(activations),
        int(sum(other.values())),
        checkpointing,
        load.tokens,
        int(step),
        load.batch,
        cfg.train.method,
        devices,
        sharding,
        load.source,
        parts,
        other,
    )


def states(cfg: Config, w: Widths, devices: int, sharding: str) -> tuple[float, float, float, float]:
    """(weights, gradients, optimizer state, optimizer-step temporaries) in bytes per device."""
    t, method = cfg.train, cfg.train.method
    p = Params.of(w)
    dtype = DTYPE_BYTES[cfg.model.dtype]
    adapter = 4 if t.lora.adapter_dtype == "float32" or t.precision == "fp16" else dtype
    used = w.v_layers - 1  # the tower's last layer is never run: no gradients, no optimizer state
    if method in LORA_METHODS:
        linear = NF4_BYTES if method == "qlora" else dtype
        quantizable = w.layers * p.decoder_layer_linear + w.v_layers * p.vision_layer_linear
        weights = linear * quantizable + kept_bytes(cfg) * (
            p.decoder(w.layers) + p.vision(w.v_layers) + p.projector - quantizable
        )
        per_layer = lora_params(w.decoder_linears(), t.lora.targets, t.lora)
        vision = lora_params(w.vision_linears(), VISION_TARGETS, t.lora) if t.lora.vision else 0
        weights += adapter * (w.layers * per_layer + used * vision)  # none on the unused last layer
        trainable = [(adapter, w.layers * per_layer + used * vision)]
        if method == "lora+projector" or t.lora.projector:
            trainable.append((kept_bytes(cfg), p.projector))
    else:
        weights = dtype * (p.decoder(w.layers) + p.vision(w.v_layers) + p.projector)
        vision = p.vision(used) if method == "full" else 0
        trainable = [(dtype, p.decoder(w.layers) + p.projector + vision)]
    gradients = sum(b * n for b, n in trainable)
    optimizer, step = optimizer_bytes(t.optim, trainable, sharding)
    layer = dtype * (p.decoder_layer_linear + p.decoder_layer_rest)
    if sharding in ("fsdp", "zero3"):  # shards, plus the parts gathered at once: the unwrapped root, 2 layers
        root = dtype * (p.embeddings + p.head + p.projector + p.vision_rest)
        weights = weights / devices + root + 2 * layer
    if sharding in ("fsdp", "zero2", "zero3"):
        gradients = gradients / devices + (layer if method not in LORA_METHODS else 0)
    elif devices > 1:
        gradients *= 2  # DDP's buckets hold a copy of the gradients (accelerate: gradient_as_bucket_view off)
    if sharding != "ddp":
        optimizer, step = optimizer / devices, step / devices
    return weights, gradients, optimizer, step


def kept_bytes(cfg: Config) -> int:
    """Bytes a weight takes that the method leaves unquantized: qlora's prepare_model_for_kbit_training
    (peft) casts every bf16 / fp16 one to fp32 (embeddings, lm_head, norms, the tower's embeddings, the
    projector): on Phi-3-vision ~0.8 GB more than bf16."""
    return 4 if cfg.train.method == "qlora" else DTYPE_BYTES[cfg.model.dtype]


def optimizer_bytes(optim: str, trainable: list[tuple[float, int]], sharding: str) -> tuple[float, float]:
    """(state, step temporaries): torch AdamW keeps two moments in the parameter's dtype; its foreach
    step (adamw_torch) allocates sqrt(v) for every parameter at once, the fused one nothing; 8-bit
    AdamW keeps ~2 bytes. DeepSpeed (zero1-3) steps an fp32 master copy with fp32 moments."""
    n = sum(count for _, count in trainable)
    zero = sharding.startswith("zero")
    moment = 4 * n if zero else sum(b * count for b, count in trainable)
    state = ADAM8_BYTES * n if optim in ("adamw_8bit", "paged_adamw_8bit") else 2 * moment
    if zero:
        state += sum(4 * count for b, count in trainable if b < 4)
    return state, moment if optim == "adamw_torch" else 0


def activation_parts(cfg: Config, w: Widths, load: Workload, checkpointing: bool) -> dict[str, int]:
    """Activations of the worst batch by part, and their `peak` (the parts are not additive with
    checkpointing). Without it every layer keeps what it saves until backward. With it every layer
    keeps only its input hidden state, and one layer at a time recomputes its activations during
    backward: the decoder's ("decoder layers": hidden states + one layer) while the tower's hidden
    states are held, the tower's after the decoder's are freed. The backward of a layer also holds a
    few gradients as wide as its widest tensors."""
    t, method, attention = cfg.train, cfg.train.method, cfg.model.attention
    act = 2 if t.precision in ("bf16", "fp16") else DTYPE_BYTES[cfg.model.dtype]
    lora = t.lora if method in LORA_METHODS else None
    tokens, crops = load.batch * load.tokens, load.batch * load.crops * w.v_tokens
    per_layer = decoder_layer_bytes(
        w, act=act, norms_train=lora is None, lora=lora, attention=attention, seq=load.tokens
    )
    vision_trains = method == "full" or (lora is not None and t.lora.vision)
    v_layer = vision_layer_bytes(w, act=act, lora=lora, attention=attention, trains=vision_trains)
    workspace = act * (3 * w.intermediate + 2 * w.hidden)
    v_workspace = act * (2 * w.v_intermediate + 2 * w.v_hidden) if vision_trains else 0
    projector_trains = method in ("full", "frozen_vision", "lora+projector")
    projector = (
        act
        * load.batch
        * load.image_tokens
        * (4 * w.v_hidden + 2 * w.hidden if projector_trains else w.hidden if vision_trains else 0)
    )
    # sdpa converts a boolean padding mask to an additive one per layer and keeps it
    mask = (
        act * load.batch * load.tokens * -(-load.tokens // 16) * 16
        if attention == "sdpa" and (load.batch > 1 or t.packing)
        else 0
    )
    used = w.v_layers - 1
    head = tokens * (4 * w.hidden + 4 + act * w.hidden)
    if checkpointing:
        decoder = w.layers * tokens * act * w.hidden + tokens * (per_layer + workspace) + mask
        vision_kept = used * crops * act * w.v_hidden if vision_trains else 0
        vision_recompute = crops * (v_layer + v_workspace)
        peak = vision_kept + projector + head + max(decoder, vision_recompute)
    else:
        decoder = w.layers * (tokens * per_layer + mask) + tokens * workspace
        vision_kept, vision_recompute = used * crops * v_layer, 0
        peak = decoder + vision_kept + projector + head
    return {
        "decoder layers": decoder,
        "vision tower": vision_kept,
        "vision tower: a layer recomputed (after the decoder's)": vision_recompute,
        "projector and final norm": projector + head,
        "peak": peak,
    }


def other_parts(cfg: Config, w: Widths, load: Workload) -> dict[str, int]:
    """Memory beside weights, states and activations: labelled-position logits (in the model dtype, their
    fp32 upcast and log-softmax, and the gradient of each), the batch's pixels (fp32, every crop slot),
    qlora's dequantized weight of the widest projection, and the CUDA context."""
    labels = load.batch * load.labels
    pixels = 4 * load.batch * (cfg.data.num_crops + 1) * 3 * w.crop**2
    parts = {"logits and loss": labels * w.vocab * (2 + 4 + 4 + 4), "batch pixels": pixels}
    if cfg.train.method == "qlora":
        parts["dequantized weight"] = DTYPE_BYTES[cfg.model.dtype] * max(
            i * o for i, o in w.decoder_linears().values()
        )
    parts["CUDA context"] = CUDA_CONTEXT
    return parts


# ---------------------------------------------------------------- the device and the decisions


def device_memory() -> int | None:
    """Total memory of CUDA device 0 in bytes; None without CUDA."""
    import torch

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def gpu_memory() -> int | None:
    """The GPU memory a run plans for: PRODUCTVLM_GPU_MEMORY_GB when set (to plan for another card, or
    to test the checks on a CPU), else CUDA device 0's; None on a CPU."""
    value = os.environ.get(GPU_MEMORY_ENV)
    if value is None:
        return device_memory()
    try:
        gigabytes = float(value)
    except ValueError:
        raise UserError(f"{GPU_MEMORY_ENV}={value!r}: expected the GPU's memory in GB, e.g. 24") from None
    if not gigabytes > 0:
        raise UserError(f"{GPU_MEMORY_ENV}={value!r}: must be > 0")
    return int(gigabytes * GB)


def launch_layout() -> tuple[int, str]:
    """(devices, sharding) of the launch this process is part of, from what torchrun and accelerate
    launch put in the environment: (1, ddp) for a plain run."""
    devices = int(os.environ.get("WORLD_SIZE", "1"))
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return devices, "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return devices, f"zero{os.environ.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '2')}"
    return devices, "ddp"


def resolve_checkpointing(
    cfg: Config,
    memory: int | None = None,
    devices: int | None = None,
    sharding: str | None = None,
    model_config: Phi3VConfig | None = None,
    photo: tuple[int, int] | None = None,
) -> bool:
    """train.gradient_checkpointing; `auto`: on when the plan without it does not fit `memory`
    (default: `gpu_memory()`; off on a CPU). Recomputing costs ~30% of a step, which a run that
    fits should not pay."""
    setting = cfg.train.gradient_checkpointing
    if setting != "auto":
        return setting
    memory = memory if memory is not None else gpu_memory()
    if memory is None:
        return False
    if devices is None or sharding is None:
        devices, sharding = launch_layout()
    plan = plan_memory(
        cfg, model_config=model_config, devices=devices, sharding=sharding, checkpointing=False, photo=photo
    )
    return not plan.fits(memory)


def check_fits(
    cfg: Config, memory: int | None = None, devices: int | None = None, sharding: str | None = None
) -> MemoryPlan | None:
    """Before any weight loads: a UserError naming what would fit when the run's plan does not fit the
    GPU (`memory`, default `gpu_memory()`). Nothing on a CPU, or when the model's config cannot be read
    yet (its loading then says why)."""
    memory = memory if memory is not None else gpu_memory()
    if memory is None:
        return None
    if devices is None or sharding is None:
        devices, sharding = launch_layout()
    try:
        mc = model_config_of(cfg.model.path)
    except UserError:
        return None
    plan = plan_memory(cfg, model_config=mc, devices=devices, sharding=sharding, memory=memory)
    if plan.fits(memory):
        return plan
    options = alternatives(cfg, mc, memory, devices, sharding, plan)
    ckpt = "on" if plan.checkpointing else "off"
    raise UserError(
        f"train.batch_size {plan.batch} needs ~{gb(plan.total)} GB on this {gb(memory)} GB GPU "
        f"({plan.method}, {plan.tokens_per_sample} tokens a sample, gradient checkpointing {ckpt}): "
        + (
            ", or ".join(options)
            if options
            else "no single change fits; shard over more GPUs (--sharding fsdp)"
        )
        + " (productvlm train --config FILE --plan shows the parts)"
    )


def alternatives(
    cfg: Config, mc: Phi3VConfig, memory: int, devices: int, sharding: str, plan: MemoryPlan
) -> list[str]:
    """One-change variants of `cfg` that fit: a smaller batch, checkpointing, qlora (or lora)."""

    def planned(**train) -> MemoryPlan:
        variant = cfg.model_copy(update={"train": cfg.train.model_copy(update=train)})
        return plan_memory(variant, model_config=mc, devices=devices, sharding=sharding, memory=memory)

    options = []
    batch = next(
        (b for b in range(cfg.train.batch_size - 1, 0, -1) if planned(batch_size=b).fits(memory)), None
    )
    if batch:
        accum = math.ceil(cfg.train.batch_size * cfg.train.grad_accum / batch)
        options.append(f"train.batch_size {batch} with grad_accum {accum}")
    if not plan.checkpointing:
        on = planned(gradient_checkpointing=True)
        if on.fits(memory):
            options.append(f"train.gradient_checkpointing: true (~{gb(on.total)} GB)")
    for method in ("lora", "qlora"):
        if cfg.train.method in ("full", "frozen_vision") or (
            method == "qlora" and cfg.train.method != "qlora"
        ):
            variant = planned(method=method)
            if variant.fits(memory):
                options.append(f"train.method: {method} (~{gb(variant.total)} GB)")
                break
    return options


# ---------------------------------------------------------------- the README's table


TABLE_GPUS = (16, 24, 40, 80)


def table(model: str) -> str:
    """Markdown: GB per GPU for method x num_crops (rows) x batch x checkpointing (columns), each cell
    with the smallest of 16/24/40/80 GB GPUs it fits (at 90%), for the costliest photo at that num_crops."""
    mc = model_config_of(model)
    batches, header = (1, 4, 8), ["method", "num_crops"]
    header += [f"batch {b} {'ckpt' if c else 'no ckpt'}" for b in batches for c in (False, True)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in ("full", "frozen_vision", "lora", "qlora"):
        for crops in (1, 4, 16):
            cells = [method, str(crops)]
            for batch in batches:
                for ckpt in (False, True):
                    cfg = Config.model_validate(
                        {
                            "model": {"path": model},
                            "data": {"num_crops": crops, "dir": "/nonexistent"},
                            "train": {"method": method, "batch_size": batch},
                        }
                    )
                    total = plan_memory(cfg, model_config=mc, checkpointing=ckpt).total
                    fit = next((f"{g}" for g in TABLE_GPUS if total <= FILL * g * GB), "-")
                    cells.append(f"{gb(total)} ({fit})")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--table"]:
        sys.exit("usage: python -m productvlm.training.memory --table")
    for name in OFFICIAL:
        print(f"\n{name}\n\n{table(name)}")
