"""Decoding with a static KV cache and a compiled decode step, in a bounded set of shapes.

transformers' `generate` compiles the model's forward for the decode steps (one token per row)
when the cache is static and a `CompileConfig` is given; the prefill, where the images enter, runs
eagerly. A compiled decode step is specialised to its shapes, and those are only the batch size and
the static cache's length (`max_cache_len`): the prompt's length does not appear in them (the
prompt is written into the cache, and the 4D mask spans the whole cache). So a request runs in a
*shape* (batch bucket, cache length): the batch rounded up to a bucket (1, 2, 4, 8, 16, then
multiples of 16) with filler rows, the cache to a multiple of `CACHE_MULTIPLE`, or any larger
compiled shape that holds it.

The shapes are bounded: at most `graph_limit()` per model and process (under dynamo's
`recompile_limit`, past which it would silently fall back to eager), recorded in `DecodeShapes`.
Without warm-up (eval, predict) a new shape compiles on first use while under the limit; `warmup`
(server start) compiles a fixed set and freezes it, and from then on a request that no warmed shape
holds takes the dynamic cache (same tokens) instead of compiling on the generation thread.

On CUDA the step is captured as a CUDA graph (`mode="reduce-overhead"`), which removes the per-step
launch overhead that bounds decoding at small batches. On the CPU, transformers compiles only when
the compile config's `_compile_all_devices` is set; we set it when asked to compile there.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

BATCH_BUCKETS = (1, 2, 4, 8, 16)
CACHE_MULTIPLE = 256
GRAPH_LIMIT = 6  # compiled shapes per model: dynamo's recompile_limit is 8 by default
WARMUP_PROMPT = "<|user|>\n<|image_1|>\nWhat is the product in this photo?<|end|>\n<|assistant|>\n"


def compiles_by_default(model) -> bool:
    """On for CUDA (where a decode step is launch-bound), off elsewhere unless asked."""
    return model.device.type == "cuda"


@functools.cache
def compile_config(device_type: str):
    """One `CompileConfig` per device type, so repeated calls never look like a new configuration.
    `dynamic=False`: a second shape is a graph of its own, not a dynamic-shape recompile of the first."""
    from transformers import CompileConfig

    cuda = device_type == "cuda"
    config = CompileConfig(fullgraph=True, dynamic=False, mode="reduce-overhead" if cuda else "default")
    if not cuda:
        config._compile_all_devices = True
    return config


def decode_kwargs(model, compiled: bool | None = None, max_cache_len: int | None = None) -> dict:
    """`generate` kwargs for a static cache and a compiled decode step; {} (the dynamic cache) when off."""
    if not (compiles_by_default(model) if compiled is None else compiled):
        return {}
    kwargs = {"cache_implementation": "static", "compile_config": compile_config(model.device.type)}
    if max_cache_len is not None:
        kwargs["max_cache_len"] = max_cache_len
    return kwargs


def graph_limit() -> int:
    """Compiled shapes allowed per model: `GRAPH_LIMIT`, kept under dynamo's recompile limit."""
    return max(1, min(GRAPH_LIMIT, torch._dynamo.config.recompile_limit - 1))


@dataclass
class DecodeShapes:
    """The (batch, cache length) shapes a model's decode step is compiled for, in this process."""

    compiled: set[tuple[int, int]] = field(default_factory=set)
    frozen: bool = False  # after warm-up: no new shape compiles

    def pick(self, rows: int, tokens: int, new: tuple[int, int]) -> tuple[int, int] | None:
        """The smallest compiled shape holding `rows` x `tokens`; else `new`, compiled now if not
        frozen and under the limit; else None (the dynamic cache)."""
        holds = [s for s in self.compiled if s[0] >= rows and s[1] >= tokens]
        if holds:
            return min(holds)
        if self.frozen or len(self.compiled) >= graph_limit():
            return None
        self.compiled.add(new)
        return new

    def describe(self) -> str:
        by_cache: dict[int, list[int]] = {}
        for batch, cache in sorted(self.compiled):
            by_cache.setdefault(cache, []).append(batch)
        return "; ".join(
            f"batch {', '.join(map(str, b))} x {c:,}-token cache" for c, b in sorted(by_cache.items())
        )


def generating_model(model):
    """The transformers model whose `generate` runs: under a peft wrapper, the wrapped one (it keeps
    the compiled step and the static cache's length)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def decode_shapes(model) -> DecodeShapes:
    return generating_model(model).__dict__.setdefault("_productvlm_decode_shapes", DecodeShapes())


def forget_compiled(model) -> None:
    """Drop the compiled step and its shapes (frees CUDA graph pools; the next compiled call compiles anew)."""
    model = generating_model(model)
    model.__dict__.pop("_compiled_call", None)
    model.__dict__.pop("_productvlm_decode_shapes", None)
    model.__dict__.pop("_previous_max_cache_length", None)
    torch._dynamo.reset()


def bucket_batch(rows: int, buckets: tuple[int, ...] = BATCH_BUCKETS) -> int:
    """The smallest bucket that holds `rows`; past the largest, the next multiple of it."""
    largest = buckets[-1]
    return next((b for b in buckets if b >= rows), -(-rows // largest) * largest)


def serving_buckets(max_batch: int) -> tuple[int, ...]:
    """The batch buckets a server of `max_batch` rows warms up at its short cache: all up to it, the
    largest kept when they are too many (one shape stays free for the long cache)."""
    top = bucket_batch(max_batch)
    return tuple(sorted({b for b in BATCH_BUCKETS if b < top} | {top}))[-(graph_limit() - 1) :]


def bucket_length(tokens: int, multiple: int = CACHE_MULTIPLE) -> int:
    return -(-tokens // multiple) * multiple


def pad_rows(inputs: dict[str, torch.Tensor], rows: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-padded `inputs` with text-only filler rows appended up to `rows`: padding, then one token.

    Filler rows have no image slots, so `pixel_values` and `image_sizes` (one entry per image)
    stay as they are; their one unmasked token keeps every attention row well defined.
    """
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extra = rows - ids.shape[0]
    if extra <= 0:
        return inputs
    filler_ids = ids.new_full((extra, ids.shape[1]), pad_token_id)
    filler_mask = mask.new_zeros((extra, mask.shape[1]))
    filler_mask[:, -1] = 1
    return {
        **inputs,
        "input_ids": torch.cat([ids, filler_ids]),
        "attention_mask": torch.cat([mask, filler_mask]),
    }


class FillerRowsDone(StoppingCriteria):
    """Rows from `first` on are filler: done from the first step, so they never prolong the loop."""

    def __init__(self, first: int):
        self.first = first

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.arange(input_ids.shape[0], device=input_ids.device) >= self.first


class RealRowsProcessor(LogitsProcessor):
    """A caller's logits processors, shown only the first `rows` (real) rows."""

    def __init__(self, processors: LogitsProcessorList, rows: int):
        self.processors, self.rows = processors, rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores[: self.rows] = self.processors(input_ids[: self.rows], scores[: self.rows])
        return scores


class RealRowsCriteria(StoppingCriteria):
    """A caller's stopping criteria, shown only the first `rows` (real) rows; filler rows are done."""

    def __init__(self, criteria: StoppingCriteriaList, rows: int):
        self.criteria, self.rows = criteria, rows

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        real_scores = None if scores is None else scores[: self.rows]
        done[: self.rows] = self.criteria(input_ids[: self.rows], real_scores, **kwargs)
        return done


def _hide_filler_rows(generate_kwargs: dict, rows: int) -> dict:
    """Callers' processors and criteria see their own rows only (a per-row criterion indexes them)."""
    processors = generate_kwargs.get("logits_processor")
    if processors:
        generate_kwargs["logits_processor"] = LogitsProcessorList(
            [RealRowsProcessor(LogitsProcessorList(processors), rows)]
        )
    criteria = generate_kwargs.get("stopping_criteria")
    generate_kwargs["stopping_criteria"] = StoppingCriteriaList(
        [RealRowsCriteria(StoppingCriteriaList(criteria), rows)] if criteria else [FillerRowsDone(rows)]
    )
    return generate_kwargs


@torch.inference_mode()  # the same grad mode for warm-up and every caller: no recompile between them
def generate_ids(
    model,
    inputs: dict[str, torch.Tensor],
    max_new_tokens: int,
    compiled: bool | None = None,
    *,
    max_cache_len: int | None = None,
    buckets: tuple[int, ...] = BATCH_BUCKETS,
    cache_multiple: int = CACHE_MULTIPLE,
    **generate_kwargs,
) -> torch.Tensor:
    """New token ids (rows, <= max_new_tokens) for left-padded `inputs`, in order; greedy unless told.

    Compiled (default on CUDA): static cache in a compiled shape (`DecodeShapes.pick`: batch rounded
    up to a bucket, cache length to a multiple of `cache_multiple`, at least `max_cache_len`, or a
    larger compiled shape). Tokens are those of the dynamic path, which is taken when no shape may
    be used and when the sequence could cross LongRoPE's switch (4096 tokens).
    """
    rows, prompt_len = inputs["input_ids"].shape
    inputs = {"attention_mask": torch.ones_like(inputs["input_ids"]), **inputs}
    extra = decode_kwargs(model, compiled)
    rope_switch = getattr(model.config, "original_max_position_embeddings", None)
    if rope_switch and prompt_len + max_new_tokens > rope_switch:
        # past it, Phi-3's LongRoPE recomputes the whole sequence with its images: not a decode step
        extra = {}
    generate_kwargs.setdefault("do_sample", False)
    if extra:
        tokens = max(prompt_len + max_new_tokens, max_cache_len or 0)
        new = (bucket_batch(rows, buckets), bucket_length(tokens, cache_multiple))
        shape = decode_shapes(model).pick(rows, tokens, new)
        extra = _in_shape(model, shape, extra) if shape else {}
        if shape:
            pad_id = model.generation_config.pad_token_id
            inputs = pad_rows(inputs, shape[0], pad_id if isinstance(pad_id, int) else 0)
            if shape[0] > rows:
                generate_kwargs = _hide_filler_rows(generate_kwargs, rows)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, **extra, **generate_kwargs)
    return out[:rows, prompt_len:]


def _in_shape(model, shape: tuple[int, int], extra: dict) -> dict:
    # transformers sizes the static cache max(asked, the largest it made before): pin it to the shape
    generating_model(model)._previous_max_cache_length = shape[1]
    return {**extra, "max_cache_len": shape[1]}


def warmup(
    model,
    processor,
    *,
    batch_sizes: tuple[int, ...] = BATCH_BUCKETS,
    max_cache_len: int = 4096,
    num_crops: int | None = None,
    compiled: bool | None = None,
) -> float:
    """Compile the decode step once per process for each batch bucket x a cache of `max_cache_len`
    (rounded up; at most LongRoPE's switch, past which decoding is never compiled), then freeze the
    set (`DecodeShapes`): later requests run in these shapes or on the dynamic cache, never
    compiling. Seconds spent (0.0 when not compiling or already warm).
    """
    if not decode_kwargs(model, compiled):
        return 0.0
    import numpy as np
    from PIL import Image

    from productvlm.inference.inputs import to_model

    shapes = decode_shapes(model)
    rope_switch = getattr(model.config, "original_max_position_embeddings", None)
    cache = bucket_length(min(max_cache_len, rope_switch or max_cache_len))
    wanted = {(bucket_batch(b), cache) for b in batch_sizes} - shapes.compiled
    if len(shapes.compiled | wanted) > graph_limit():
        raise ValueError(
            f"warm-up of {len(shapes.compiled | wanted)} decode shapes is over the limit of {graph_limit()}"
        )
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (336, 336, 3), dtype=np.uint8))
    kwargs = {} if num_crops is None else {"num_crops": num_crops}
    start = time.perf_counter()
    shapes.frozen = False
    try:
        for size, _ in sorted(wanted):
            shapes.compiled.add((size, cache))  # the request below runs in it, not in a larger warm one
            batch = processor(
                text=[WARMUP_PROMPT] * size, images=[[photo]] * size, padding_side="left", **kwargs
            )
            batch = to_model(batch, model)
            # a few decode steps: CUDA graph trees record on the step after the first compiled one
            generate_ids(model, batch, 4, True, max_cache_len=cache, min_new_tokens=4)
    finally:
        shapes.frozen = True
    return time.perf_counter() - start if wanted else 0.0
