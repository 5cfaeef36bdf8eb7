"""Full-size Phi-3-vision training throughput on one GPU: LoRA and full fine-tuning, SDPA and flash-attn.

The architecture comes from the official config.json (../shared/reference/phi3-vision-128k-instruct,
or $PRODUCTVLM_REFERENCE); the weights are random (nothing is downloaded: speed does not depend on
the values). bf16 weights, gradient checkpointing, batches of square 1344 px photos (every crop used:
757 image tokens at num_crops 4, 2,509 at 16, close to the ~2,443 tokens/sample of Microsoft's DocVQA
figures), labels on a short answer. Figures per configuration: samples/s, tokens/s, model FLOPs
utilisation (6 * parameters * tokens / time / peak bf16 FLOP/s: the usual convention, which ignores
the recomputation of checkpointing and overstates LoRA's work, so it compares configurations more
than it measures the hardware) and peak memory. In-run baseline: full fine-tuning with SDPA at the
same num_crops. Microsoft's published 8xA100 figures are listed as reference rows.

    python -m bench.bench_gpu            # writes bench/results/gpu-<device>-<date>.json

Without CUDA it returns one row saying it was skipped.
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


def make_batch(processor, num_crops: int, batch_size: int, device) -> dict[str, torch.Tensor]:
    """`batch_size` copies of one synthetic photo + prompt + answer; labels on the answer only."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))
    batch = processor(text=[PROMPT + ANSWER] * batch_size, images=[[photo]] * batch_size, num_crops=num_crops)
    answer_len = len(processor.tokenizer(ANSWER, add_special_tokens=False).input_ids)
    labels = batch["input_ids"].clone()
    labels[:, :-answer_len] = -100
    return {**{k: v.to(device) for k, v in batch.items()}, "labels": labels.to(device)}


def build(config, method: str, attention: str, dtype: torch.dtype, device):
    """A randomly initialised model with gradient checkpointing, wrapped for `method` as `train` does."""
    from productvlm.config import load_config
    from productvlm.models.phi3v import Phi3VForCausalLM
    from productvlm.training.trainer import apply_method

    torch.manual_seed(0)
    with torch.device(device):
        model = Phi3VForCausalLM._from_config(config, dtype=dtype, attn_implementation=attention)
    model.config.use_cache = False
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return apply_method(model, load_config(None, [f"train.method={method}"])).train()


def measure(model, batch: dict[str, torch.Tensor], steps: int, warmup: int = 2) -> dict[str, float]:
    """Seconds per optimizer step (after `warmup` steps) and peak memory, one batch per step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    cuda = batch["input_ids"].is_cuda

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for i in range(warmup + steps):
        if i == warmup:
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync()
    seconds = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return {"step_s": seconds, "peak_gib": peak}


def run(
    batch_size: int = 4,
    steps: int = 5,
    crops: tuple[int, ...] = (4, 16),
    methods: tuple[str, ...] = ("full", "lora", "frozen_vision"),
    write: bool = True,
) -> list[dict]:
    if not torch.cuda.is_available():
        return [
            result("gpu: skipped (no GPU)", None, "", None, None, "-", "torch.cuda.is_available() is False")
        ]
    if not (REFERENCE / "config.json").is_file():
        return [
            result("gpu: skipped (no reference config)", None, "", None, None, "-", f"{REFERENCE} not found")
        ]
    from productvlm.models.phi3v import Phi3VConfig, Phi3VProcessor

    config = Phi3VConfig.from_pretrained(REFERENCE)
    processor = Phi3VProcessor.from_pretrained(REFERENCE)
    device_name = torch.cuda.get_device_name()
    peak = peak_flops(device_name)
    attentions = ["sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])
    measured: dict[tuple[str, str, int], dict[str, float]] = {}
    for attention in attentions:
        for method in methods:
            model = build(config, method, attention, torch.bfloat16, "cuda")
            n_params = sum(p.numel() for p in model.parameters())
            for num_crops in crops:
                batch = make_batch(processor, num_crops, batch_size, "cuda")
                try:
                    m = measure(model, batch, steps)
                except torch.cuda.OutOfMemoryError:
                    m = {"step_s": float("nan"), "peak_gib": float("nan"), "oom": 1.0}
                    model.zero_grad(set_to_none=True)
                    torch.cuda.empty_cache()
                tokens = int(batch["attention_mask"].sum())
                m.update(tokens=tokens, params=n_params)
                measured[(attention, method, num_crops)] = m
                print(f"{attention} {method} crops {num_crops}: {m}", flush=True)
            del model
            gc.collect()
            torch.cuda.empty_cache()
    rows = [_row(key, m, measured, batch_size, peak, device_name) for key, m in measured.items()]
    rows += reference_rows()
    if write:
        write_results(rows, device_name)
    return rows


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


if __name__ == "__main__":
    from bench.run import to_markdown

    table = run()
    print(to_markdown(table, f"GPU benchmark, {datetime.now(timezone.utc):%Y-%m-%d}"))
