"""`make bench-gpu`: the full-size Phi-3-vision on one GPU, built once: decoding, then training.

The architecture comes from the official config.json (../shared/reference/phi3-vision-128k-instruct,
or $PRODUCTVLM_REFERENCE); the weights are random (nothing is downloaded: speed does not depend on
the values), bf16, built once on the GPU and reused by every measurement.

Decoding (first, on the plain model): ms per decoded token after a prompt with one square 1344 px
photo at num_crops 4 (~780 tokens), greedy, at batch 1 and 8, through the dynamic cache (the
default path) and through `productvlm.inference.decode` (static cache, fullgraph-compiled decode
step captured as a CUDA graph); the first compiled call's time (compilation) is reported apart.

Training: full fine-tuning, frozen vision tower, then LoRA (wrapped last: peft changes the model
in place), gradient checkpointing, batches of the same photo (every crop used: 757 image tokens at
num_crops 4, 2,509 at 16), labels on a short answer. Figures: samples/s, tokens/s, model FLOPs
utilisation (6 * parameters * tokens / time / peak bf16 FLOP/s: the usual convention, which
ignores the recomputation of checkpointing and overstates LoRA's work, so it compares
configurations more than it measures the hardware) and peak memory. In-run baseline: full
fine-tuning with SDPA at the same num_crops. Microsoft's published 8xA100 figures are listed as
reference rows.

Sized for a short lease: under 5 minutes on one H100 including construction and compilation;
past `budget_s` the remaining measurements are skipped (each says so) rather than run. Results
are written after each part, so a cut-off run still leaves its figures.

    python -m bench.bench_gpu            # writes bench/results/gpu-<device>-<date>.json

Without CUDA it prints why it skipped and exits 0, writing nothing.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench.common import REPO, result

REFERENCE = Path(
    os.environ.get("PRODUCTVLM_REFERENCE", REPO.parent / "shared" / "reference" / "phi3-vision-128k-instruct")
)
RESULTS = REPO / "bench" / "results"
PROMPT = "<|user|>\n<|image_1|>\nWhat is the product in this photo?<|end|>\n<|assistant|>\n"
ANSWER = "Product: Beige Check Cashmere Scarf, Category: SCARVES, Full Price: 590.0<|end|>"
IMAGE_SIZE = 1344  # 4x4 crops of 336 px: num_crops 4 and 16 both use every crop
# dense bf16 tensor-core peaks (NVIDIA datasheets), matched against torch.cuda.get_device_name()
PEAK_TFLOPS = [("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0)]

# Microsoft's Phi-3-vision fine-tuning figures (DocVQA, ~2,443 tokens/sample, num_crops 16,
# 8xA100-80GB, flash-attn), from the Phi-3 cookbook's fine-tuning guide.
MICROSOFT = [("full fine-tuning", 8.66), ("LoRA", 12.1), ("frozen vision tower", 31.7)]


def peak_flops(device_name: str) -> float | None:
    override = os.environ.get("PEAK_TFLOPS")
    if override:
        return float(override) * 1e12
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS if key in device_name), None)


def make_batch(
    processor, num_crops: int, batch_size: int, device, answer: bool = True
) -> dict[str, torch.Tensor]:
    """`batch_size` copies of one synthetic photo + prompt + answer, labels on the answer only;
    `answer=False`: the prompt alone (to decode from)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))
    text = PROMPT + ANSWER if answer else PROMPT
    batch = processor(text=[text] * batch_size, images=[[photo]] * batch_size, num_crops=num_crops)
    if not answer:
        return {k: v.to(device) for k, v in batch.items()}
    answer_len = len(processor.tokenizer(ANSWER, add_special_tokens=False).input_ids)
    labels = batch["input_ids"].clone()
    labels[:, :-answer_len] = -100
    return {**{k: v.to(device) for k, v in batch.items()}, "labels": labels.to(device)}


def base_model(config, attention: str, dtype: torch.dtype, device):
    """A randomly initialised model (seeded), in eval mode with the KV cache on: ready to decode."""
    from productvlm.models.phi3v import Phi3VForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = Phi3VForCausalLM._from_config(config, dtype=dtype, attn_implementation=attention)
    return model.eval()


def for_training(model, method: str):
    """Gradient checkpointing, no KV cache, wrapped for `method` as `train` does (LoRA: in place)."""
    from productvlm.config import load_config
    from productvlm.training.model import apply_method

    model.config.use_cache = False
    if not model.is_activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if method == "full":
        model.requires_grad_(True)
    return apply_method(model, load_config(None, [f"train.method={method}"])).train()


def build(config, method: str, attention: str, dtype: torch.dtype, device):
    """A randomly initialised model with gradient checkpointing, wrapped for `method` as `train` does."""
    return for_training(base_model(config, attention, dtype, device), method)


def decode_ms(model, inputs, new_tokens: int, compiled: bool) -> dict[str, float]:
    """ms per decoded token: (time for 1 + n tokens - time for 1 token) / n; the first call apart."""
    from productvlm.inference.decode import generate_ids

    def seconds(n: int) -> float:
        sync(inputs["input_ids"])
        t0 = time.perf_counter()
        generate_ids(model, inputs, n, compiled, min_new_tokens=n)
        sync(inputs["input_ids"])
        return time.perf_counter() - t0

    first = seconds(2)  # compiles (and records the CUDA graph) on the compiled path
    seconds(2)
    total = min(seconds(1 + new_tokens) for _ in range(2))
    prefill = min(seconds(1) for _ in range(2))
    per_token = 1000 * (total - prefill) / new_tokens
    return {"ms_per_token": per_token, "first_call_s": first}


def sync(tensor: torch.Tensor) -> None:
    if tensor.is_cuda:
        torch.cuda.synchronize()


def measure(model, batch: dict[str, torch.Tensor], steps: int, warmup: int = 2) -> dict[str, float]:
    """Seconds per optimizer step (after `warmup` steps) and peak memory, one batch per step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    cuda = batch["input_ids"].is_cuda
    for i in range(warmup + steps):
        if i == warmup:
            sync(batch["input_ids"])
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(batch["input_ids"])
    seconds = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return {"step_s": seconds, "peak_gib": peak}


def skip_reason(reference: Path = REFERENCE) -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    if not (reference / "config.json").is_file():
        return f"no reference config: {reference / 'config.json'} not found (set PRODUCTVLM_REFERENCE)"
    return None


def run(
    batch_size: int = 4,
    steps: int = 3,
    crops: tuple[int, ...] = (4, 16),
    methods: tuple[str, ...] = ("full", "frozen_vision", "lora"),
    decode_batches: tuple[int, ...] = (1, 8),
    new_tokens: int = 32,
    budget_s: float = 240.0,
    write: bool = True,
    device: str = "cuda",
    reference: Path = REFERENCE,
) -> list[dict]:
    """Every figure of the GPU benchmark; `device="cpu"` with a tiny model folder checks the flow."""
    reason = skip_reason(reference) if device == "cuda" else None
    if reason:
        return [result("gpu: skipped", None, "", None, None, "-", reason)]
    from productvlm.models.phi3v import Phi3VConfig, Phi3VProcessor

    start = time.perf_counter()
    config = Phi3VConfig.from_pretrained(reference)
    processor = Phi3VProcessor.from_pretrained(reference)
    cuda = device == "cuda"
    device_name = torch.cuda.get_device_name() if cuda else device
    model = base_model(config, "sdpa", torch.bfloat16 if cuda else torch.float32, device)
    built_s = time.perf_counter() - start
    print(f"built in {built_s:.0f}s", flush=True)

    def out_of_time() -> bool:
        return time.perf_counter() - start > budget_s

    rows = decode_rows(model, processor, decode_batches, new_tokens, device_name, out_of_time, device)
    if write:
        write_results(rows, device_name)
    from productvlm.inference.decode import forget_compiled

    forget_compiled(model)  # free the CUDA graphs' memory pool before training
    gc.collect()
    torch.cuda.empty_cache()
    rows += train_rows(model, processor, batch_size, steps, crops, methods, device_name, out_of_time, device)
    rows += reference_rows()
    total_s = time.perf_counter() - start
    rows.append(
        result(
            "gpu: whole run", total_s, "s", None, None, "< 300 s on an H100", f"model built in {built_s:.0f}s"
        )
    )
    if write:
        print(f"wrote {write_results(rows, device_name)}", flush=True)
    return rows


def decode_rows(
    model, processor, batches, new_tokens: int, device_name: str, out_of_time, device
) -> list[dict]:
    """Dynamic then compiled decoding at each batch size, one photo per prompt at num_crops 4."""
    from productvlm.inference.decode import compile_config

    rows, dynamic = [], {}
    model.generation_config.eos_token_id = None  # every answer decodes exactly the tokens asked
    for compiled in (False, True):
        for size in batches:
            path = "static cache + compiled step (CUDA graph)" if compiled else "dynamic cache (default path)"
            name = f"gpu decode: {path}, batch {size}"
            if out_of_time():
                rows.append(result(name, None, "ms/token", None, None, "-", "skipped: time budget spent"))
                continue
            inputs = make_batch(processor, 4, size, device, answer=False)
            m = decode_ms(model, inputs, new_tokens, compiled)
            print(f"{name}: {m}", flush=True)
            if not compiled:
                dynamic[size] = m["ms_per_token"]
            aim = "<= 8 ms/token" if size == 1 else f"batch {size} throughput >= 6x batch 1"
            notes = (
                f"{device_name}; {str(model.dtype).removeprefix('torch.')}; SDPA; {inputs['input_ids'].shape[1]}-token prompt, {new_tokens} tokens; "
                f"{1000 * size / m['ms_per_token']:,.0f} tokens/s; first call {m['first_call_s']:.1f}s"
                + (f" (compilation, mode={compile_config(model.device.type).mode})" if compiled else "")
            )
            base = dynamic.get(size) if compiled else None
            rows.append(
                result(
                    name,
                    m["ms_per_token"],
                    "ms/token",
                    "dynamic cache" if base else None,
                    base,
                    aim,
                    notes,
                    higher_is_better=False,
                )
                | {"tokens_per_s": 1000 * size / m["ms_per_token"], "first_call_s": m["first_call_s"]}
            )
    return rows


def train_rows(
    model, processor, batch_size, steps, crops, methods, device_name, out_of_time, device
) -> list[dict]:
    """Each method (LoRA last) x attention x num_crops on the one model; OOM and the budget are rows too."""
    peak = peak_flops(device_name)
    flash = device == "cuda" and importlib.util.find_spec("flash_attn") is not None
    attentions = ["sdpa"] + (["flash_attention_2"] if flash else [])
    measured: dict[tuple[str, str, int], dict[str, float]] = {}
    skipped = []
    for method in methods:
        model = for_training(model, method)
        n_params = sum(p.numel() for p in model.parameters())
        for attention in attentions:
            try:
                model.set_attn_implementation(attention)
            except (ImportError, ValueError) as e:  # a flash-attn build that does not fit this torch/GPU
                skipped += [
                    (f"gpu: {method} FT, {attention}, num_crops {c}", f"skipped: {e}"[:200]) for c in crops
                ]
                continue
            for num_crops in crops:
                if out_of_time():
                    skipped.append(
                        (
                            f"gpu: {method} FT, {attention}, num_crops {num_crops}",
                            "skipped: time budget spent",
                        )
                    )
                    continue
                batch = make_batch(processor, num_crops, batch_size, device)
                try:
                    m = measure(model, batch, steps)
                except torch.cuda.OutOfMemoryError:
                    m = {"step_s": float("nan"), "peak_gib": float("nan"), "oom": 1.0}
                    model.zero_grad(set_to_none=True)
                    torch.cuda.empty_cache()
                m.update(tokens=int(batch["attention_mask"].sum()), params=n_params)
                measured[(attention, method, num_crops)] = m
                print(f"{attention} {method} crops {num_crops}: {m}", flush=True)
    rows = [_row(key, m, measured, batch_size, peak, device_name) for key, m in measured.items()]
    return rows + [result(name, None, "samples/s", None, None, "-", why) for name, why in skipped]


def _row(key, m, measured, batch_size: int, peak: float | None, device_name: str) -> dict:
    attention, method, num_crops = key
    seconds = m["step_s"]
    base = measured.get(("sdpa", "full", num_crops), {}).get("step_s")
    tokens_s = m["tokens"] / seconds
    mfu = 6 * m["params"] * tokens_s / peak if peak else None
    mfu_text = f"MFU {100 * mfu:.1f}%" if mfu is not None else "MFU: unknown peak (set PEAK_TFLOPS)"
    return result(
        f"gpu: {method} FT, {attention}, num_crops {num_crops}, grad checkpointing",
        batch_size / seconds,
        "samples/s",
        "full FT + SDPA, same num_crops",
        batch_size / base if base else None,
        "-",
        f"{device_name}; bf16; batch {batch_size} x {m['tokens'] // batch_size} tokens; {tokens_s:,.0f} tokens/s; "
        f"{mfu_text}; peak memory {m['peak_gib']:.1f} GiB" + ("; OUT OF MEMORY" if m.get("oom") else ""),
    ) | {"tokens_per_s": tokens_s, "mfu": mfu, "peak_gib": m["peak_gib"]}


def reference_rows() -> list[dict]:
    return [
        result(
            f"reference (Microsoft): {what}, flash-attn, DocVQA, num_crops 16",
            img_s,
            "images/s on 8xA100-80GB",
            None,
            None,
            "-",
            f"published figure, not measured here: {img_s / 8:.2f} images/s and ~{img_s / 8 * 2443:,.0f} "
            "tokens/s per GPU at ~2,443 tokens/sample",
        )
        for what, img_s in MICROSOFT
    ]


def write_results(rows: list[dict], device_name: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-").lower()
    now = datetime.now(timezone.utc)
    path = RESULTS / f"gpu-{slug}-{now:%Y-%m-%d}.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {
        "date": f"{now:%Y-%m-%d %H:%M} UTC",
        "device": device_name,
        "torch": torch.__version__,
        "rows": rows,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, path)
    return path


def main() -> int:
    """`make bench-gpu`: the table on stdout; without a GPU one line saying why, exit code 0."""
    from bench.run import to_markdown

    reason = skip_reason()
    if reason:
        print(f"bench-gpu: skipped: {reason}")
        return 0
    table = run()
    print(to_markdown(table, f"GPU benchmark, {datetime.now(timezone.utc):%Y-%m-%d}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
