"""Batched generation with per-row stops: the one place that calls `model.generate`.

A batch is left-padded (`inputs.batch`), so rows of different lengths share one call and each row's
greedy answer is the one it gets alone. `RowStops` ends every row at an end token or at its own token
limit, and collects its tokens; `generate(..., **generate_kwargs)` passes anything else (sampling,
a logits processor, cache or compile settings) straight to `model.generate`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from productvlm.inference.decode import decode_kwargs, generate_ids
from productvlm.inference.inputs import batch, prepare_rows, to_model
from productvlm.prompting.settings import PromptSettings
from productvlm.prompting.templates import END

OnStep = Callable[["RowStops", int], None]


class StepLogprobs(LogitsProcessor):
    """Keeps the log-probabilities of the model's next-token distribution, after the caller's other
    processors (so a constraint's mask is in them) and before temperature / top-p (transformers applies
    those after every custom processor); `RowStops` reads the chosen token's, and the `top_k` best, once
    the token is known. Scores pass through unchanged."""

    def __init__(self, top_k: int = 0):
        self.top_k, self.last = top_k, None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.last = torch.log_softmax(scores.float(), dim=-1)
        return scores


class RowStops(StoppingCriteria):
    """Per-row bookkeeping at every decoding step: each row's tokens up to a stop token (not kept) or
    its own `max_tokens[i]`; `finish[i]` is "stop" or "length". `on_step(self, i)` runs after row i moved.
    With `logprobs` (a `StepLogprobs` in the same generate call), `logprobs[i]` holds each kept token's
    log-probability and `top[i]` its `top_k` alternatives as (token id, log-probability)."""

    def __init__(
        self,
        max_tokens: Sequence[int],
        stop_ids: set[int],
        on_step: OnStep | None = None,
        logprobs: StepLogprobs | None = None,
    ):
        self.max_tokens, self.stop_ids, self.on_step = list(max_tokens), stop_ids, on_step
        self.tokens: list[list[int]] = [[] for _ in self.max_tokens]
        self.finish = ["length"] * len(self.max_tokens)
        self.done = [False] * len(self.max_tokens)
        self.step_logprobs = logprobs
        self.logprobs: list[list[float]] = [[] for _ in self.max_tokens]
        self.top: list[list[list[tuple[int, float]]]] = [[] for _ in self.max_tokens]

    def _token_logprobs(self, last: torch.LongTensor) -> tuple[list[float], list[list[tuple[int, float]]]]:
        dist = self.step_logprobs.last
        chosen = dist.gather(1, last[:, None].to(dist.device))[:, 0].tolist()
        if not self.step_logprobs.top_k:
            return chosen, [[] for _ in chosen]
        values, ids = dist.topk(self.step_logprobs.top_k, dim=-1)
        return chosen, [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        last = input_ids[:, -1]
        if self.step_logprobs is not None:
            chosen, top = self._token_logprobs(last)
        for i, token in enumerate(last.tolist()):
            if self.done[i]:
                continue
            if token in self.stop_ids:
                self.done[i], self.finish[i] = True, "stop"
            else:
                self.tokens[i].append(token)
                if self.step_logprobs is not None:
                    self.logprobs[i].append(chosen[i])
                    self.top[i].append(top[i])
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
    logprobs: int | None = None,
    **generate_kwargs: Any,
) -> RowStops:
    """Generate for a batch (`inputs.batch`); row i stops at `stops` or after max_tokens[i] tokens.
    Greedy unless `generate_kwargs` say otherwise. Returns the `RowStops` with each row's tokens.

    `compiled` (None: on for CUDA): static KV cache and a compiled decode step (`inference.decode`),
    same tokens as the dynamic cache. `logprobs` (None: off, the default path untouched): also record
    each token's log-probability and, when above 0, that many top alternatives (`RowStops.logprobs`,
    `RowStops.top`)."""
    kwargs = {"do_sample": False, **generate_kwargs}
    recorder = None
    if logprobs is not None:
        recorder = StepLogprobs(logprobs)
        kwargs["logits_processor"] = LogitsProcessorList([*kwargs.get("logits_processor", []), recorder])
    rows = RowStops(max_tokens, stops, on_step, recorder)
    criteria = StoppingCriteriaList([rows, *kwargs.pop("stopping_criteria", [])])
    if decode_kwargs(model, compiled):
        generate_ids(model, inputs, max(rows.max_tokens), True, stopping_criteria=criteria, **kwargs)
    else:
        model.generate(**inputs, max_new_tokens=max(rows.max_tokens), stopping_criteria=criteria, **kwargs)
    return rows


@dataclass
class Generated:
    """One row's answer; with log-probabilities, each token's and the character of `text` it ends at."""

    text: str
    tokens: list[int]
    logprobs: list[float] | None = None
    ends: list[int] | None = None


def token_ends(tokenizer, tokens: Sequence[int]) -> list[int]:
    """Where each token ends in the decoded text (decoding every prefix at once: byte-fallback pieces and
    leading spaces come out exactly as in the full decode)."""
    prefixes = tokenizer.batch_decode([tokens[: k + 1] for k in range(len(tokens))], skip_special_tokens=True)
    ends, most = [], 0
    for text in prefixes:
        most = max(most, len(text.rstrip("\ufffd")))  # half a multi-byte character ends nowhere yet
        ends.append(most)
    return ends


def generate_batch(
    model,
    processor,
    prepared: Sequence,
    max_new_tokens: int,
    constraint=None,
    compiled: bool | None = None,
    with_logprobs: bool = False,
    **generate_kwargs: Any,
) -> list[Generated]:
    """Answers for `inputs.Prepared` rows in one left-padded call; greedy unless told otherwise."""
    inputs = to_model(batch(processor, prepared), model)
    extra = {"logits_processor": LogitsProcessorList([constraint.logits_processor()])} if constraint else {}
    done = generate(
        model,
        inputs,
        [max_new_tokens] * len(prepared),
        stop_ids(model, processor),
        compiled=compiled,
        logprobs=0 if with_logprobs else None,
        **extra,
        **generate_kwargs,
    )
    out = []
    for i, tokens in enumerate(done.tokens):
        text = processor.decode(tokens, skip_special_tokens=True)
        if with_logprobs:
            out.append(Generated(text, tokens, done.logprobs[i], token_ends(processor.tokenizer, tokens)))
        else:
            out.append(Generated(text, tokens))
    return out


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
    with_logprobs: bool = False,
    **generate_kwargs: Any,
) -> list[str] | list[Generated]:
    """Greedy answers for catalog rows, in order, `batch_size` rows per call. `constraint` (a
    prompting.constrained.AnswerConstraint) restricts decoding to the answer template. The texts, or
    with `with_logprobs` each row's `Generated` with its tokens' log-probabilities."""
    was_training = model.training
    model.eval()
    answers: list[Generated] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prepared = prepare_rows(processor, settings, chunk, blank_images)
        answers += generate_batch(
            model, processor, prepared, max_new_tokens, constraint, compiled, with_logprobs, **generate_kwargs
        )
        if advance:
            advance(len(chunk))
    model.train(was_training)
    return answers if with_logprobs else [a.text for a in answers]


__all__ = [
    "RowStops",
    "StepLogprobs",
    "Generated",
    "generate",
    "generate_batch",
    "generate_answers",
    "stop_ids",
    "token_ends",
]
