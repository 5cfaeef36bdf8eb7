"""Batched generation with per-row stops: the one place that calls `model.generate`.

A batch is left-padded (`inputs.batch`), so rows of different lengths share one call and each row's
greedy answer is the one it gets alone. `RowStops` ends every row at an end token or at its own token
limit, and collects its tokens; `generate(..., **generate_kwargs)` passes anything else (sampling,
a logits processor, cache or compile settings) straight to `model.generate`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from productvlm.inference.decode import decode_kwargs, generate_ids
from productvlm.inference.inputs import batch, prepare_rows, to_model
from productvlm.prompting.settings import PromptSettings
from productvlm.prompting.templates import END

OnStep = Callable[["RowStops", int], None]


class RowStops(StoppingCriteria):
    """Per-row bookkeeping at every decoding step: each row's tokens up to a stop token (not kept) or
    its own `max_tokens[i]`; `finish[i]` is "stop" or "length". `on_step(self, i)` runs after row i moved."""

    def __init__(self, max_tokens: Sequence[int], stop_ids: set[int], on_step: OnStep | None = None):
        self.max_tokens, self.stop_ids, self.on_step = list(max_tokens), stop_ids, on_step
        self.tokens: list[list[int]] = [[] for _ in self.max_tokens]
        self.finish = ["length"] * len(self.max_tokens)
        self.done = [False] * len(self.max_tokens)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        for i, token in enumerate(input_ids[:, -1].tolist()):
            if self.done[i]:
                continue
            if token in self.stop_ids:
                self.done[i], self.finish[i] = True, "stop"
            else:
                self.tokens[i].append(token)
                self.done[i] = len(self.tokens[i]) >= self.max_tokens[i]
            if self.on_step is not None:
                self.on_step(self, i)
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


def stop_ids(model, processor) -> set[int]:
    """The model's end-of-sequence ids and `<|end|>` (the official generation config lacks the latter)."""
    eos = model.generation_config.eos_token_id
    ids = {eos} if isinstance(eos, int) else set(eos or [])
    return ids | {processor.tokenizer.convert_tokens_to_ids(END)}


@torch.no_grad()  # not inference_mode: tensors a model caches while generating may later need autograd
def generate(
    model,
    inputs: dict[str, torch.Tensor],
    max_tokens: Sequence[int],
    stops: set[int],
    on_step: OnStep | None = None,
    compiled: bool | None = None,
    **generate_kwargs: Any,
) -> RowStops:
    """Generate for a batch (`inputs.batch`); row i stops at `stops` or after max_tokens[i] tokens.
    Greedy unless `generate_kwargs` say otherwise. Returns the `RowStops` with each row's tokens.

    `compiled` (None: on for CUDA): static KV cache and a compiled decode step (`inference.decode`),
    same tokens as the dynamic cache."""
    rows = RowStops(max_tokens, stops, on_step)
    kwargs = {"do_sample": False, **generate_kwargs}
    criteria = StoppingCriteriaList([rows, *kwargs.pop("stopping_criteria", [])])
    if decode_kwargs(model, compiled):
        generate_ids(model, inputs, max(rows.max_tokens), True, stopping_criteria=criteria, **kwargs)
    else:
        model.generate(**inputs, max_new_tokens=max(rows.max_tokens), stopping_criteria=criteria, **kwargs)
    return rows


def generate_answers(
    model,
    processor,
    settings: PromptSettings,
    rows: Sequence[dict[str, Any]],
    max_new_tokens: int,
    batch_size: int = 8,
    blank_images: bool = False,
    advance: Callable[[int], None] | None = None,
    constraint=None,
    compiled: bool | None = None,
    **generate_kwargs: Any,
) -> list[str]:
    """Greedy answers for catalog rows, in order, `batch_size` rows per call. `constraint` (a
    prompting.constrained.AnswerConstraint) restricts decoding to the answer template."""
    was_training = model.training
    model.eval()
    stops = stop_ids(model, processor)
    answers: list[str] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        inputs = to_model(batch(processor, prepare_rows(processor, settings, chunk, blank_images)), model)
        extra = (
            {"logits_processor": LogitsProcessorList([constraint.logits_processor()])} if constraint else {}
        )
        done = generate(
            model, inputs, [max_new_tokens] * len(chunk), stops, compiled=compiled, **extra, **generate_kwargs
        )
        answers += [processor.decode(tokens, skip_special_tokens=True) for tokens in done.tokens]
        if advance:
            advance(len(chunk))
    model.train(was_training)
    return answers


__all__ = ["RowStops", "generate", "generate_answers", "stop_ids"]
