"""Decoding with a static KV cache and a compiled decode step, in shapes that compile once per process.

transformers' `generate` compiles the model's forward for the decode steps (one token per row)
when the cache is static and a `CompileConfig` is given; the prefill, where the images enter, runs
eagerly. A compiled decode step is specialised to its shapes, and those are only the batch size and
the static cache's length (`max_cache_len`): the prompt's length does not appear in them (the
prompt is written into the cache, and the 4D mask spans the whole cache). So we round the batch up
to a bucket (1, 2, 4, 8, 16, then multiples of 16) with filler rows, and the cache length up to a
multiple of `CACHE_MULTIPLE`; transformers also keeps the largest cache a model has used and reuses
it, so after `warmup` at the serving ceiling every request fits the cache that was compiled for.

On CUDA the step is captured as a CUDA graph (`mode="reduce-overhead"`), which removes the per-step
launch overhead that bounds decoding at small batches. On the CPU, transformers compiles only when
the compile config's `_compile_all_devices` is set; we set it when asked to compile there.
"""

from __future__ import annotations

import functools
import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

BATCH_BUCKETS = (1, 2, 4, 8, 16)
CACHE_MULTIPLE = 256
WARMUP_PROMPT = "<|user|>\n<|image_1|>\nWhat is the product in this photo?<|end|>\n<|assistant|>\n"


def compiles_by_default(model) -> bool:
    """On for CUDA (where a decode step is launch-bound), off elsewhere unless asked."""
    return model.device.type == "cuda"


@functools.cache
def compile_config(device_type: str):
    """One `CompileConfig` per device type, so repeated calls never look like a new configuration."""
    from transformers import CompileConfig

    cuda = device_type == "cuda"
    config = CompileConfig(fullgraph=True, mode="reduce-overhead" if cuda else "default")
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


def bucket_batch(rows: int, buckets: tuple[int, ...] = BATCH_BUCKETS) -> int:
    """The smallest bucket that holds `rows`; past the largest, the next multiple of it."""
    largest = buckets[-1]
    return next((b for b in buckets if b >= rows), -(-rows // largest) * largest)


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

    Compiled (default on CUDA): static cache, batch rounded up to a bucket, cache length to a
    multiple of `cache_multiple` (at least `max_cache_len`). Tokens are those of the dynamic path,
    which is also taken when the sequence could cross LongRoPE's switch (4096 tokens).
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
        pad_id = model.generation_config.pad_token_id
        pad_id = pad_id if isinstance(pad_id, int) else 0
        inputs = pad_rows(inputs, bucket_batch(rows, buckets), pad_id)
        needed = bucket_length(prompt_len + max_new_tokens, cache_multiple)
        extra["max_cache_len"] = max(needed, max_cache_len or 0)
        if inputs["input_ids"].shape[0] > rows:
            generate_kwargs = _hide_filler_rows(generate_kwargs, rows)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, **extra, **generate_kwargs)
    return out[:rows, prompt_len:]


def warmup(
    model,
    processor,
    *,
    batch_sizes: tuple[int, ...] = BATCH_BUCKETS,
    max_cache_len: int = 4096,
    num_crops: int | None = None,
    compiled: bool | None = None,
) -> float:
    """Compile the decode step for each batch bucket once per process (server start); seconds spent.

    `max_cache_len` is the ceiling (longest prompt + answer) the server will see: transformers keeps
    the largest static cache a model has used, so every later request reuses this one.
    """
    if not decode_kwargs(model, compiled):
        return 0.0
    import numpy as np
    from PIL import Image

    from productvlm.inference.inputs import to_model

    done = model.__dict__.setdefault("_productvlm_warm_batches", set())
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (336, 336, 3), dtype=np.uint8))
    start = time.perf_counter()
    for size in sorted({bucket_batch(b) for b in batch_sizes} - done):
        kwargs = {} if num_crops is None else {"num_crops": num_crops}
        batch = processor(text=[WARMUP_PROMPT] * size, images=[[photo]] * size, padding_side="left", **kwargs)
        batch = to_model(batch, model)
        # a few decode steps: CUDA graph trees record on the step after the first compiled one
        generate_ids(model, batch, 4, True, max_cache_len=max_cache_len, min_new_tokens=4)
        done.add(size)
    return time.perf_counter() - start
