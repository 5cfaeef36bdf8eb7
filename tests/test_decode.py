"""The compiled decode path on the tiny model: same tokens as an independent greedy loop and as the
dynamic cache, a bounded set of shapes that compile once, and nothing compiles after warm-up."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch._dynamo.utils import counters
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from productvlm.inference import decode
from productvlm.inference.decode import (
    DecodeShapes,
    FillerRowsDone,
    bucket_batch,
    bucket_length,
    decode_kwargs,
    decode_shapes,
    generate_ids,
    graph_limit,
    pad_rows,
    serving_buckets,
    warmup,
)
from productvlm.models.phi3v import Phi3VForCausalLM, Phi3VProcessor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` lives at the repo root

from bench import bench_decode  # noqa: E402

CACHE = 256  # the one warmed shape: batch bucket 4 x a 256-token cache (the module's one compilation)


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


def greedy_reference(model, processor, prompt, images, new_tokens: int, suppress=frozenset()) -> list[int]:
    """An independent greedy decoder: the whole sequence through the decoder at every step (no KV
    cache, no `generate`; the photos embedded once), argmax at the last position; ids in `suppress`
    never chosen (as min_new_tokens does)."""
    inputs = processor(prompt, images)
    out = []
    with torch.no_grad():
        embeds = model.model.embed(inputs["input_ids"], inputs.get("pixel_values"), inputs.get("image_sizes"))
        for _ in range(new_tokens):
            mask = torch.ones(embeds.shape[:2], dtype=torch.long)
            logits = model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits[0, -1]
            logits[list(suppress)] = -float("inf")
            out.append(int(logits.argmax()))
            token = model.get_input_embeddings()(torch.tensor([[out[-1]]]))
            embeds = torch.cat([embeds, token], dim=1)
    return out


def eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return {eos} if isinstance(eos, int) else set(eos or [])


class GenerateSpy:
    """Wraps `model.generate`: records each call's rows and static cache length (None: dynamic cache)."""

    def __init__(self, model, monkeypatch):
        self.calls, self.generate = [], model.generate
        monkeypatch.setattr(model, "generate", self)

    def __call__(self, **kw):
        cache = kw.get("max_cache_len") if kw.get("cache_implementation") == "static" else None
        self.calls.append((kw["input_ids"].shape[0], cache))
        return self.generate(**kw)


def test_buckets(monkeypatch):
    assert [bucket_batch(n) for n in (1, 2, 3, 5, 8, 9, 16, 17, 40)] == [1, 2, 4, 8, 8, 16, 16, 32, 48]
    assert bucket_batch(3, (4, 12)) == 4 and bucket_batch(13, (4, 12)) == 24
    assert [bucket_length(n, 256) for n in (1, 256, 257)] == [256, 256, 512]
    assert serving_buckets(8) == (1, 2, 4, 8) and serving_buckets(3) == (1, 2, 4)
    assert serving_buckets(100) == (2, 4, 8, 16, 112)  # + the long cache: 6 shapes
    monkeypatch.setattr(decode, "GRAPH_LIMIT", 3)
    assert graph_limit() == 3 and serving_buckets(100) == (16, 112)  # bounded: the largest kept
    assert graph_limit() < torch._dynamo.config.recompile_limit


def test_shapes_are_bounded_reused_and_frozen_after_warmup():
    shapes = DecodeShapes()
    assert shapes.pick(3, 300, (4, 512)) == (4, 512) and shapes.compiled == {(4, 512)}  # compiles
    assert shapes.pick(2, 100, (2, 256)) == (4, 512)  # a compiled shape that holds it: no new graph
    assert shapes.pick(5, 100, (8, 256)) == (8, 256)  # none holds 5 rows: a new one
    for rows in range(9, 9 + graph_limit() - 2):
        shapes.pick(rows * 16, 100, (rows * 16, 256))
    assert len(shapes.compiled) == graph_limit()
    assert shapes.pick(999, 100, (1008, 256)) is None  # at the limit: the dynamic cache
    shapes.frozen = True
    assert shapes.pick(4, 600, (4, 768)) is None  # frozen: nothing new, though under the limit or not
    assert shapes.pick(1, 512, (1, 512)) == (4, 512)
    assert "batch 4 x 512-token cache" in shapes.describe()
    served = DecodeShapes({(1, 1280), (2, 1280), (4, 1280), (8, 4096)}, frozen=True)  # as `serve` warms
    assert served.pick(1, 900, (1, 1024)) == (1, 1280)  # the short cache for a typical request
    assert served.pick(2, 2000, (2, 2048)) == (8, 4096)  # a long one: the long cache, filler rows
    assert served.pick(9, 900, (16, 1024)) is None


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
    assert config.dynamic is False  # a new shape is a graph of its own, counted against the limit
    assert decode_kwargs(model, compiled=True)["compile_config"] is config  # never a "new" config


def test_warmup_compiles_the_decode_step_once(model, processor, compiled_graphs, monkeypatch):
    assert compiled_graphs == 1  # one fullgraph decode step: no graph break, no data-dependent guard
    shapes = decode_shapes(model)
    assert shapes.compiled == {(4, CACHE)} and shapes.frozen
    calls = []
    monkeypatch.setattr(model, "generate", lambda **kw: calls.append(kw) or kw["input_ids"])
    assert warmup(model, processor, batch_sizes=(3, 4), max_cache_len=CACHE, compiled=True) == 0.0
    warmup(model, processor)  # the CPU compiles only when asked
    assert calls == []  # once per process: warm shapes run nothing
    with pytest.raises(ValueError, match="over the limit"):
        warmup(model, processor, batch_sizes=(1, 2, 8, 16, 32, 64), max_cache_len=CACHE, compiled=True)
    assert calls == [] and shapes.compiled == {(4, CACHE)}
    try:
        warmup(model, processor, batch_sizes=(5,), max_cache_len=10**5, compiled=True)
        (call,) = calls
        assert call["input_ids"].shape[0] == 8 and call["max_cache_len"] == 4096  # LongRoPE's switch
        assert call["cache_implementation"] == "static" and call["compile_config"].fullgraph
        assert shapes.compiled == {(4, CACHE), (8, 4096)} and shapes.frozen
    finally:
        shapes.compiled.discard((8, 4096))


def test_sequences_that_may_cross_the_longrope_switch_take_the_dynamic_path(
    model, processor, compiled_graphs, monkeypatch
):
    calls = []
    monkeypatch.setattr(model, "generate", lambda **kw: calls.append(kw) or kw["input_ids"])
    inputs = processor(*PROMPTS[0])
    switch = model.config.original_max_position_embeddings
    monkeypatch.setattr(model.config, "original_max_position_embeddings", inputs["input_ids"].shape[1] + 4)
    generate_ids(model, inputs, 4, True)
    generate_ids(model, inputs, 5, True)
    assert "cache_implementation" in calls[0] and "cache_implementation" not in calls[1]
    assert switch == 4096


def test_compiled_batch_equals_an_independent_greedy_loop(model, processor, compiled_graphs):
    """Batched, padded to bucket 4, compiled: each row is what a plain greedy loop over the full
    sequence's logits (no cache, no `generate`) gives its prompt alone; so is the dynamic path."""
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
    dynamic = generate_ids(model, batch, 10, False, min_new_tokens=10)
    for i, (prompt, images) in enumerate(PROMPTS[:3]):
        reference = greedy_reference(model, processor, prompt, images, 10, suppress=eos_ids(model))
        assert together[i].tolist() == reference
        assert dynamic[i].tolist() == reference
    assert model._previous_max_cache_length == CACHE


def test_other_prompts_in_the_same_bucket_do_not_recompile(model, processor, compiled_graphs):
    before = graphs()
    batch = batch_of(processor, PROMPTS[1:])  # other lengths and images, 3 rows -> bucket 4
    with torch.compiler.set_stance("fail_on_recompile"):
        for new_tokens in (3, 7):
            generate_ids(model, batch, new_tokens, True)
        generate_ids(model, batch_of(processor, PROMPTS), 5, True)  # exactly 4 rows
        generate_ids(model, processor(*PROMPTS[0]), 5, True)  # 1 row: runs in the warm bucket 4
    assert graphs() == before


def test_requests_outside_the_warm_shapes_take_the_dynamic_cache_without_compiling(
    model, processor, compiled_graphs, monkeypatch
):
    """After warm-up (bucket 4 x 256 tokens): more new tokens, a longer prompt or more rows than that
    give the dynamic path's tokens, and nothing compiles (a recompile would raise here)."""
    long_prompt = (
        "<|user|>\n"
        + "Describe the leather, the stitching and the lining. " * 25
        + "<|end|>\n<|assistant|>\n",
        None,
    )
    cases = {
        "more new tokens": (PROMPTS[1:2], 90),  # 177-token prompt + 90 > 256
        "a longer prompt": ([long_prompt], 8),
        "more rows": (PROMPTS + PROMPTS[:1], 6),
        "inside: 2 rows": (PROMPTS[2:], 6),
    }
    before = graphs()
    spy = GenerateSpy(model, monkeypatch)
    for name, (prompts, new_tokens) in cases.items():
        inputs = batch_of(processor, prompts)
        with torch.compiler.set_stance("fail_on_recompile"):
            fast = generate_ids(model, inputs, new_tokens, True, min_new_tokens=new_tokens)
        plain = generate_ids(model, inputs, new_tokens, False, min_new_tokens=new_tokens)
        assert fast.tolist() == plain.tolist(), name
    assert graphs() == before
    assert batch_of(processor, [long_prompt])["input_ids"].shape[1] > CACHE
    rows = [len(prompts) for prompts, _ in cases.values()]
    assert spy.calls[0::2] == [(rows[0], None), (rows[1], None), (rows[2], None), (4, CACHE)]
    assert decode_shapes(model).compiled == {(4, CACHE)}


def test_decode_bench_measures_both_paths(model, processor, compiled_graphs):
    inputs = batch_of(processor, PROMPTS[:1] + PROMPTS[2:])  # 3 rows: the warm bucket
    new_tokens = 16
    m = bench_decode.measure(model, inputs, new_tokens=new_tokens, rounds=2)
    assert m["same_tokens"] and m["compile_s"] > 0
    for path, ms in ((False, m["dynamic_ms"]), (True, m["compiled_ms"])):
        total, prefill = m["total_s"][path], m["prefill_s"][path]
        assert 0 < prefill < total  # 1 + 16 tokens take longer than 1 (the fastest of 2 each)
        assert ms == pytest.approx(1000 * (total - prefill) / new_tokens) and ms > 0


def test_the_shared_generate_call_uses_the_compiled_path(model, processor, compiled_graphs):
    """inference.generate.generate (eval, predict and serving's one call site): compiled=True gives each
    row exactly its greedy tokens up to its stop token or its own limit, and runs on the warm bucket
    without a new graph."""
    from productvlm.inference.generate import generate, stop_ids

    limits = [12, 5, 9]
    references = [greedy_reference(model, processor, p, ims, n) for (p, ims), n in zip(PROMPTS, limits)]
    # a stop token row 0 reaches at its 4th step (a random model rarely emits its real end tokens)
    stops = stop_ids(model, processor) | {references[0][3]}
    inputs = batch_of(processor, PROMPTS[:3])
    before = graphs()
    with torch.compiler.set_stance("fail_on_recompile"):
        fast = generate(model, inputs, limits, stops, compiled=True, max_cache_len=CACHE)
    assert graphs() == before
    plain = generate(model, inputs, limits, stops, compiled=False)
    assert fast.tokens == plain.tokens and fast.finish == plain.finish
    for i, (reference, limit) in enumerate(zip(references, limits)):
        stop_at = next((k for k, t in enumerate(reference) if t in stops), None)
        if stop_at is not None:
            assert fast.finish[i] == "stop" and fast.tokens[i] == reference[:stop_at], i
        else:
            assert fast.finish[i] == "length" and fast.tokens[i] == reference[:limit], i
    assert fast.finish[0] == "stop" and len(fast.tokens[0]) <= 3


def test_the_server_warms_up_to_its_own_limits(model, processor, monkeypatch):
    """`serve` warms every batch bucket up to --max-batch-size at a short cache (one photo + the
    default max_tokens) and the largest bucket at its longest prompt + max_tokens, and says what it
    warmed; with compiling off it says so and compiles nothing."""
    from productvlm.serving.batching import Engine

    asked = []
    monkeypatch.setattr(decode, "warmup", lambda *a, **kw: asked.append(kw) or 1.0)
    assert Engine(model, processor, 1, compiled=False).warmup(8, 17_408) == (
        "compiled decode: off (dynamic KV cache)"
    )
    assert asked == []
    said = Engine(model, processor, 1, compiled=True).warmup(8, 17_408, typical_tokens=256)
    short, long = asked
    assert short["batch_sizes"] == (1, 2, 4, 8) and long["batch_sizes"] == (8,)
    assert short["max_cache_len"] == processor.num_image_tokens(1344, 1344, 1) + 64 + 256
    assert long["max_cache_len"] == 17_408 and short["compiled"] and long["compiled"]
    assert said.startswith("compiled decode warmed up in 2s for ") and "dynamic KV cache" in said


def test_a_peft_wrapped_model_keeps_its_shapes_and_cache_length_on_the_wrapped_model(
    tiny_model_dir, processor, monkeypatch
):
    """transformers' generate runs on the model inside peft's wrapper: the static cache's length is
    pinned there (else a longer earlier cache would be reused: a shape never warmed)."""
    from peft import LoraConfig, get_peft_model

    base = Phi3VForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    wrapped = get_peft_model(base, LoraConfig(r=2, target_modules=["qkv_proj"])).eval()
    calls = []
    monkeypatch.setattr(base, "generate", lambda **kw: calls.append(kw) or kw["input_ids"])
    base._previous_max_cache_length = 4096  # a longer cache made before
    generate_ids(wrapped, processor(*PROMPTS[0]), 4, True)
    (call,) = calls
    assert call["max_cache_len"] == CACHE and base._previous_max_cache_length == CACHE
    assert decode_shapes(wrapped) is decode_shapes(base) and decode_shapes(base).compiled == {(1, CACHE)}
