"""The compiled decode path on the tiny model: same tokens as the dynamic cache, shapes that compile once."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch._dynamo.utils import counters
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from productvlm.inference.decode import (
    FillerRowsDone,
    bucket_batch,
    bucket_length,
    decode_kwargs,
    generate_ids,
    pad_rows,
    warmup,
)
from productvlm.models.phi3v import Phi3VForCausalLM, Phi3VProcessor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` lives at the repo root

from bench import bench_decode  # noqa: E402

CACHE = 256  # every request below fits one cache length, so the step compiles once for bucket 4


def photo(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


PROMPTS = [
    ("<|user|>\n<|image_1|>What is shown in this image?<|end|>\n<|assistant|>\n", [photo(300, 200, 0)]),
    (
        "<|user|>\n<|image_1|>\n<|image_2|>\nCompare them.<|end|>\n<|assistant|>\n",
        [photo(150, 400, 1), photo(90, 90, 2)],
    ),
    ("<|user|>\nName one product.<|end|>\n<|assistant|>\n", None),
    ("<|user|>\n<|image_1|>Price?<|end|>\n<|assistant|>\n", [photo(120, 260, 3)]),
]


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return Phi3VProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return Phi3VForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def compiled_graphs(model, processor):
    """The module's one compilation: warm-up of batch bucket 4 (asked for 3 and 4) at the CACHE ceiling."""
    before = graphs()
    seconds = warmup(model, processor, batch_sizes=(3, 4), max_cache_len=CACHE, compiled=True)
    assert seconds > 0
    return graphs() - before


def batch_of(processor, prompts):
    return processor([p for p, _ in prompts], [ims for _, ims in prompts], padding_side="left")


def test_buckets():
    assert [bucket_batch(n) for n in (1, 2, 3, 5, 8, 9, 16, 17, 40)] == [1, 2, 4, 8, 8, 16, 16, 32, 48]
    assert bucket_batch(3, (4, 12)) == 4 and bucket_batch(13, (4, 12)) == 24
    assert [bucket_length(n, 256) for n in (1, 256, 257)] == [256, 256, 512]


def test_pad_rows_adds_text_only_filler_rows(processor):
    inputs = batch_of(processor, PROMPTS[:3])
    padded = pad_rows(inputs, 4, pad_token_id=9)
    assert padded["input_ids"].shape == (4, inputs["input_ids"].shape[1])
    assert torch.equal(padded["input_ids"][:3], inputs["input_ids"])
    assert padded["input_ids"][3].eq(9).all()
    assert padded["attention_mask"][3].tolist() == [0] * (inputs["input_ids"].shape[1] - 1) + [1]
    assert padded["pixel_values"] is inputs["pixel_values"]  # one entry per image, none for fillers
    assert pad_rows(inputs, 3, 9) is inputs


def test_filler_rows_are_done_from_the_first_step():
    ids = torch.zeros(4, 3, dtype=torch.long)
    assert FillerRowsDone(3)(ids, None).tolist() == [False, False, False, True]


class SeenCriteria(StoppingCriteria):
    """A caller's per-row criterion: records how many rows it is shown, never stops a row."""

    def __init__(self):
        self.rows = set()

    def __call__(self, input_ids, scores, **kwargs):
        self.rows.add(input_ids.shape[0])
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class SeenProcessor(LogitsProcessor):
    """A caller's logits processor: records how many rows it is shown, leaves the scores."""

    def __init__(self):
        self.rows = set()

    def __call__(self, input_ids, scores):
        self.rows.add(input_ids.shape[0])
        return scores


def test_compiling_is_off_on_cpu_unless_asked(model):
    assert decode_kwargs(model) == {} and decode_kwargs(model, compiled=False) == {}
    kwargs = decode_kwargs(model, compiled=True, max_cache_len=512)
    assert kwargs["cache_implementation"] == "static" and kwargs["max_cache_len"] == 512
    config = kwargs["compile_config"]
    assert config.fullgraph and config._compile_all_devices and config.mode == "default"
    assert decode_kwargs(model, compiled=True)["compile_config"] is config  # never a "new" config


def test_warmup_compiles_the_decode_step_once(model, processor, compiled_graphs, monkeypatch):
    assert compiled_graphs == 1  # one fullgraph decode step: no graph break, no data-dependent guard
    assert model._productvlm_warm_batches == {4}
    calls = []
    monkeypatch.setattr(model, "generate", lambda **kw: calls.append(kw) or kw["input_ids"])
    warmup(model, processor, batch_sizes=(3, 4), max_cache_len=CACHE, compiled=True)
    warmup(model, processor)  # the CPU compiles only when asked
    assert calls == []  # once per process: warm buckets run nothing
    warmup(model, processor, batch_sizes=(5,), max_cache_len=CACHE, compiled=True)
    (call,) = calls
    assert call["input_ids"].shape[0] == 8 and call["max_cache_len"] == CACHE
    assert call["cache_implementation"] == "static" and call["compile_config"].fullgraph
    model._productvlm_warm_batches.discard(8)


def test_sequences_that_may_cross_the_longrope_switch_take_the_dynamic_path(model, processor, monkeypatch):
    calls = []
    monkeypatch.setattr(model, "generate", lambda **kw: calls.append(kw) or kw["input_ids"])
    inputs = processor(*PROMPTS[0])
    switch = model.config.original_max_position_embeddings
    monkeypatch.setattr(model.config, "original_max_position_embeddings", inputs["input_ids"].shape[1] + 4)
    generate_ids(model, inputs, 4, True)
    generate_ids(model, inputs, 5, True)
    assert "cache_implementation" in calls[0] and "cache_implementation" not in calls[1]
    assert switch == 4096


def test_compiled_batch_equals_each_prompt_alone_on_the_dynamic_cache(model, processor, compiled_graphs):
    batch = batch_of(processor, PROMPTS[:3])  # 3 rows: one filler row makes bucket 4
    criteria, logits = SeenCriteria(), SeenProcessor()
    together = generate_ids(
        model,
        batch,
        10,
        True,
        min_new_tokens=10,
        stopping_criteria=StoppingCriteriaList([criteria]),
        logits_processor=LogitsProcessorList([logits]),
    )
    assert together.shape == (3, 10)
    assert criteria.rows == logits.rows == {3}  # the filler row stays hidden from the caller
    for i, (prompt, images) in enumerate(PROMPTS[:3]):
        alone = processor(prompt, images)
        dynamic = generate_ids(model, alone, 10, False, min_new_tokens=10)
        assert together[i].tolist() == dynamic[0].tolist()
        reference = model.generate(**alone, max_new_tokens=10, min_new_tokens=10, do_sample=False)
        assert dynamic[0].tolist() == reference[0, alone["input_ids"].shape[1] :].tolist()
    assert model._previous_max_cache_length == CACHE


def test_other_prompts_in_the_same_bucket_do_not_recompile(model, processor, compiled_graphs):
    before = graphs()
    batch = batch_of(processor, PROMPTS[1:])  # other lengths and images, 3 rows -> bucket 4
    for new_tokens in (3, 7):
        generate_ids(model, batch, new_tokens, True)
    generate_ids(model, batch_of(processor, PROMPTS), 5, True)  # exactly 4 rows
    assert graphs() == before


def test_decode_bench_measures_both_paths(model, processor, compiled_graphs):
    inputs = batch_of(processor, PROMPTS)
    m = bench_decode.measure(model, inputs, new_tokens=6, rounds=1)
    # timings are differences of wall times (a loaded machine can make one round negative): only
    # their presence is asserted here; `make bench` reports the fastest of several rounds
    assert {"dynamic_ms", "compiled_ms"} <= m.keys()
    assert all(isinstance(m[k], float) for k in ("dynamic_ms", "compiled_ms"))
    assert m["same_tokens"]


def test_the_shared_generate_call_uses_the_compiled_path(model, processor, compiled_graphs):
    """inference.generate.generate (eval, predict and serving's one call site): compiled=True gives the
    dynamic path's per-row tokens and stops, and runs on the warm bucket without a new graph."""
    from productvlm.inference.generate import generate, stop_ids

    inputs = batch_of(processor, PROMPTS[:3])
    stops = stop_ids(model, processor)
    before = graphs()
    fast = generate(model, inputs, [12, 5, 9], stops, compiled=True, max_cache_len=CACHE)
    assert graphs() == before
    plain = generate(model, inputs, [12, 5, 9], stops, compiled=False)
    assert fast.tokens == plain.tokens and fast.finish == plain.finish
    assert [len(t) for t in fast.tokens] == [12, 5, 9] or "stop" in fast.finish
