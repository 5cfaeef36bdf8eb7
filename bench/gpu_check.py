"""`make gpu-check`: every GPU path of the flow once, on the full-size Phi-3-vision, in one command.

The model is built from the official config.json (../shared/reference/phi3-vision-128k-instruct or
$PRODUCTVLM_REFERENCE, as `make bench-gpu` finds it) with random weights (bf16), written once to a
work folder, and every step loads it the way a user's run would, through the normal config:

1. memory: for full / lora / qlora at num_crops 4 and 16, the memory plan
   (`productvlm.training.memory.plan_memory`) against the peak measured over two optimizer steps
   (`torch.cuda.max_memory_allocated`);
2. stage 1 (`train.vision_pretrain`) on the GPU: the tiny preset (stage 1 is for a preset's random
   tower; there is no full-size preset);
3. `train` (LoRA) for 20 steps with an evaluation;
4. `eval` and `predict` with the compiled decode path;
5. `serve` (in process, FastAPI's TestClient), warmed up, answering 3 requests, one longer than the
   warm-up's cache (it must take the dynamic cache: no compilation while serving);
6. `export` of the run with the LoRA merged.

Each step is timed and guarded: an error makes its row "failed" with the error's text and the next
step runs; past `budget_s` the remaining steps are "skipped: time budget spent". Sized for under 8
minutes on one H100. Writes bench/results/gpu-check-<date>.json and prints a table; exits 1 when a
row failed. Without CUDA it prints `gpu-check: skipped: no CUDA device` and exits 0.

    python -m bench.gpu_check
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
GPU_CONFIG = REPO / "configs" / "phi3-vision-lora.yaml"
TINY_CONFIG = REPO / "configs" / "tiny-cpu.yaml"
METHODS = ("full", "lora", "qlora")
LONG_TEXT = "Describe the leather, the stitching, the hardware and the lining of this bag in detail. "


class Check:
    """The rows of one run: `step` runs a function under the time budget and records how it went."""

    def __init__(self, budget_s: float):
        self.start, self.budget_s, self.rows = time.perf_counter(), budget_s, []

    def step(self, name: str, fn: Callable[[], dict], needs: str | None = None) -> dict | None:
        """Run `fn` (returns the row's figures and `notes`) unless out of time or `needs` failed."""
        if time.perf_counter() - self.start > self.budget_s:
            return self._row(name, "skipped", None, "skipped: time budget spent")
        if needs and not self.ok(needs):
            return self._row(name, "skipped", None, f"skipped: {needs} did not pass")
        t0 = time.perf_counter()
        try:
            figures = fn()
        except Exception as e:  # noqa: BLE001  (a failed step is a row; the next step still runs)
            traceback.print_exc()
            text = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            return self._row(name, "failed", time.perf_counter() - t0, text)
        finally:
            free_memory()
        status = "failed" if figures.pop("failed", False) else "ok"
        return self._row(name, status, time.perf_counter() - t0, figures.pop("notes", ""), **figures)

    def ok(self, name: str) -> bool:
        return any(r["name"] == name and r["status"] == "ok" for r in self.rows)

    def _row(self, name: str, status: str, seconds: float | None, notes: str, **figures) -> dict:
        row = {"name": name, "status": status, "seconds": seconds, "notes": notes, **figures}
        self.rows.append(row)
        print(f"{name}: {status} ({notes})", flush=True)
        return row


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_base(reference: Path, out: Path, device: str) -> dict:
    """The full-size model with random weights (bf16 on CUDA), saved with the reference's processor."""
    from bench.bench_gpu import base_model
    from productvlm.models.phi3v import Phi3VConfig, Phi3VProcessor

    config = Phi3VConfig.from_pretrained(reference)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = base_model(config, "sdpa", dtype, device)
    model.save_pretrained(out)
    Phi3VProcessor.from_pretrained(reference).save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "notes": f"{params / 1e9:.2f}B parameters, {str(dtype).removeprefix('torch.')}"}


def gpu_config(base: Path, data: Path, out: Path, device: str, *overrides: str):
    """configs/phi3-vision-lora.yaml on the random full-size model and the synthetic catalog."""
    from productvlm.config import load_config

    cpu = [] if device == "cuda" else ["model.dtype=float32", "train.precision=fp32"]
    return load_config(
        GPU_CONFIG,
        [
            f"model.path={base}",
            f"data.dir={data}",
            f"output_dir={out}",
            "tracking.backend=none",
            "train.num_workers=0",
            "train.grad_accum=1",
            "train.merge_final=false",
            *cpu,
            *overrides,
        ],
    )


def plan_bytes(cfg, model_config, checkpointing: bool) -> tuple[int | None, str]:
    """What the memory plan says `torch.cuda.max_memory_allocated` will read for bench_gpu's photo, or
    None and why (the planner may be missing from this build)."""
    try:
        from productvlm.training.memory import plan_memory
    except ImportError as e:
        return None, f"plan: not available ({e})"
    from bench.bench_gpu import IMAGE_SIZE

    plan = plan_memory(
        cfg, model_config=model_config, checkpointing=checkpointing, photo=(IMAGE_SIZE, IMAGE_SIZE)
    )
    return plan.allocated, ""


def memory_row(cfg, base: Path, num_crops: int, steps: int, device: str) -> dict:
    """Plan vs the peak of `steps` AdamW steps (after one more) of the model as `train` builds it."""
    from bench.bench_gpu import make_batch, measure
    from productvlm.models.phi3v import Phi3VConfig
    from productvlm.training.model import apply_method, load_model
    from productvlm.training.run import gradient_checkpointing

    model, processor = load_model(cfg, str(base))
    if getattr(model, "hf_quantizer", None) is None:  # a quantized model is placed as it loads
        model.to(device)
    checkpointing = gradient_checkpointing(cfg)
    if checkpointing:
        model.config.use_cache = False
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = apply_method(model, cfg).train()
    quantized = any("4bit" in type(m).__name__ for m in model.modules())
    if cfg.train.method == "qlora" and not quantized:
        raise RuntimeError("train.method qlora built a model without 4-bit layers (not wired in this build)")
    batch = make_batch(processor, num_crops, cfg.train.batch_size, device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    m = measure(model, batch, steps, warmup=1)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    plan, why = plan_bytes(cfg, Phi3VConfig.from_pretrained(base), checkpointing)
    del model
    gib = (lambda b: None if b is None else b / 2**30)(peak)
    notes = f"batch {cfg.train.batch_size}, checkpointing {'on' if checkpointing else 'off'}, {m['step_s']:.2f} s/step"
    failed = False
    if plan is None:
        notes += f"; {why}"
    elif peak is not None:
        failed = peak > plan
        notes += f"; plan {plan / 2**30:.1f} GiB vs peak {gib:.1f} GiB" + (
            " (UNDER the peak)" if failed else ""
        )
    return {
        "plan_gib": None if plan is None else plan / 2**30,
        "peak_gib": gib,
        "failed": failed,
        "notes": notes,
    }


def stage_one(data: Path, out: Path, device: str) -> dict:
    """Stage 1 of the tiny preset's tower, then 2 steps of the VLM, as `train` runs them."""
    from productvlm.config import load_config
    from productvlm.training.run import train

    cfg = load_config(
        TINY_CONFIG,
        [
            f"data.dir={data}",
            f"output_dir={out}",
            "train.vision_pretrain.epochs=1",
            "train.max_steps=2",
            "eval.subset=0",
            "tracking.backend=none",
            "train.num_workers=0",
            *(["train.precision=bf16"] if device == "cuda" else []),
        ],
    )
    result = train(cfg, progress=False)
    figures = json.loads((out / "vision-pretrained" / "vision_pretrain.json").read_text())
    accuracy = figures.get("validation_accuracy")
    return {
        "notes": f"stage 1: {figures.get('steps')} steps, validation accuracy {accuracy}; then {result.steps} VLM steps"
    }


def train_run(cfg) -> dict:
    from productvlm.training.run import train

    result = train(cfg, progress=False)
    evaluated = "eval_n" in result.metrics
    return {
        "steps": result.steps,
        "failed": result.steps != cfg.train.max_steps or not evaluated,
        "notes": f"{result.steps} steps, eval {'logged' if evaluated else 'MISSING'}, final model in RUN/{result.final_dir.name}",
    }


def eval_and_predict(run: Path, data: Path, out: Path, rows: int, tokens: int, compiled: bool | None) -> dict:
    """`eval` on `rows` test rows, then `predict` on their photos, both with the compiled decode path."""
    from torch._dynamo.utils import counters

    from productvlm.evaluation.predict import predict
    from productvlm.evaluation.run import load_rows, run_eval
    from productvlm.inference.decode import decode_shapes
    from productvlm.inference.predictor import Predictor

    before = counters["stats"]["unique_graphs"]
    result = run_eval(
        run,
        data,
        "test",
        out=out,
        batch_size=4,
        max_new_tokens=24,
        limit=rows,
        progress=False,
        compiled=compiled,
    )
    test_rows, _ = load_rows(data, "test")
    predictor = Predictor(run, max_new_tokens=tokens, compiled=compiled)
    records = predict(predictor, [r["image_path"] for r in test_rows[:rows]], 4, progress=False)
    shapes = decode_shapes(predictor.model).describe() or "none (dynamic cache)"
    graphs = counters["stats"]["unique_graphs"] - before
    return {
        "failed": len(records) != min(rows, len(test_rows)) or len(result.predictions) != len(records),
        "notes": f"eval {len(result.predictions)} rows in {result.seconds:.0f}s (parse rate {result.metrics['parse_rate']:.2f}); "
        f"predict {len(records)} photos; compiled shapes: {shapes}; {graphs} graphs compiled",
    }


def serve_requests(run: Path, photo: Path, device: str, compiled: bool | None, max_tokens: int) -> dict:
    """Warm up `serve` in process, then 2 catalog uploads and 1 chat request longer than the warm-up."""
    import base64

    from fastapi.testclient import TestClient
    from torch._dynamo.utils import counters

    from productvlm.inference.decode import decode_shapes
    from productvlm.inference.device import pick_dtype
    from productvlm.serving.app import ServeSettings, app_from_folder

    settings = ServeSettings(
        max_batch_size=1, max_tokens_limit=max_tokens, compile=compiled
    )  # 2 shapes to warm
    app = app_from_folder(run, settings, dtype=pick_dtype("auto", device), device=device)
    t0 = time.perf_counter()
    with TestClient(app) as client:
        warm_s = time.perf_counter() - t0
        model = app.state.batcher.engine.model
        tokenizer = app.state.batcher.engine.processor.tokenizer
        warm_cache = max((c for _, c in decode_shapes(model).compiled), default=256)
        before = counters["stats"]["unique_graphs"]
        answers = []
        for _ in range(2):
            r = client.post("/v1/catalog", files={"file": ("p.jpg", photo.read_bytes(), "image/jpeg")})
            answers.append(r.status_code)
        # one request no warm shape holds: a prompt that with max_tokens passes the warmed cache
        text = LONG_TEXT * (1 + (warm_cache - max_tokens) // len(tokenizer(LONG_TEXT).input_ids))
        url = "data:image/jpeg;base64," + base64.b64encode(photo.read_bytes()).decode()
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
        r = client.post(
            "/v1/chat/completions",
            json={"model": "x", "max_tokens": max_tokens, "messages": [{"role": "user", "content": content}]},
        )
        answers.append(r.status_code)
        usage = r.json().get("usage", {}) if r.status_code == 200 else {}
        graphs = counters["stats"]["unique_graphs"] - before
    longer = usage.get("prompt_tokens", 0) + max_tokens > warm_cache
    return {
        "warmup_s": warm_s,
        "failed": answers != [200, 200, 200] or graphs > 0 or not longer,
        "notes": f"{app.state.decode}; statuses {answers}; long request: {usage.get('prompt_tokens')} prompt "
        f"+ {max_tokens} tokens vs a {warm_cache}-token warm cache; {graphs} graphs compiled while serving",
    }


def export_merged(run: Path, out: Path) -> dict:
    from productvlm.models.export import export_model

    folder = export_model(run, out, merge_lora=True, dtype="bf16")
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    return {
        "failed": weights == 0
        or config.get("model_type") != "phi3_v"
        or (folder / "adapter_config.json").exists(),
        "notes": f"{weights / 2**30:.2f} GiB of merged weights, model_type {config.get('model_type')}",
    }


def run(
    crops: tuple[int, ...] = (4, 16),
    methods: tuple[str, ...] = METHODS,
    memory_steps: int = 2,
    train_steps: int = 20,
    catalog_rows: int = 60,
    eval_rows: int = 8,
    decode_tokens: int = 24,
    memory_batch_size: int | None = None,
    serve_max_tokens: int = 256,
    budget_s: float = 420.0,
    device: str = "cuda",
    reference: Path | None = None,
    compiled: bool | None = None,
    work: Path | None = None,
    write: bool = True,
) -> list[dict]:
    """Every row of the check; `device="cpu"` with a tiny model folder as `reference` checks the flow."""
    from bench.bench_gpu import REFERENCE
    from bench.common import catalog

    reference = reference or REFERENCE
    check = Check(budget_s)
    work = Path(work or tempfile.mkdtemp(prefix="productvlm-gpu-check-"))
    base, data = work / "base", catalog(catalog_rows)
    check.step("build the model from the reference config", lambda: build_base(reference, base, device))
    built = "build the model from the reference config"
    for method in methods:
        for num_crops in crops:
            batch = [f"train.batch_size={memory_batch_size}"] if memory_batch_size else []
            cfg = gpu_config(
                base,
                data,
                work / "mem",
                device,
                f"train.method={method}",
                f"data.num_crops={num_crops}",
                *batch,
            )
            check.step(
                f"memory: {method}, num_crops {num_crops}",
                lambda cfg=cfg, n=num_crops: memory_row(cfg, base, n, memory_steps, device),
                needs=built,
            )
    check.step(
        "stage 1 (train.vision_pretrain), tiny preset", lambda: stage_one(data, work / "stage1", device)
    )
    run_dir = work / "run"
    cfg = gpu_config(
        base,
        data,
        run_dir,
        device,
        "train.method=lora",
        f"train.max_steps={train_steps}",
        "train.batch_size=4",
        f"eval.steps={train_steps}",
        f"eval.subset={eval_rows}",
        "eval.batch_size=4",
        f"eval.max_new_tokens={decode_tokens}",
        "train.save_steps=1000000",
    )
    trained = f"train: lora, {train_steps} steps with an eval"
    check.step(trained, lambda: train_run(cfg), needs=built)
    check.step(
        "eval + predict, compiled decode",
        lambda: eval_and_predict(run_dir, data, work / "eval", eval_rows, decode_tokens, compiled),
        needs=trained,
    )
    photo = next((data / "test").rglob("*.jpg"), None) or next(data.rglob("*.jpg"))
    check.step(
        "serve: warm-up + 3 requests",
        lambda: serve_requests(run_dir, photo, device, compiled, serve_max_tokens),
        needs=trained,
    )
    check.step("export --merge-lora", lambda: export_merged(run_dir, work / "export"), needs=trained)
    check.rows.append(
        {
            "name": "whole check",
            "status": "ok",
            "seconds": time.perf_counter() - check.start,
            "notes": str(work),
        }
    )
    if write:
        print(f"wrote {write_results(check.rows, device)}", flush=True)
    return check.rows


def write_results(rows: list[dict], device: str) -> Path:
    now = datetime.now(timezone.utc)
    path = RESULTS / f"gpu-check-{now:%Y-%m-%d}.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if device == "cuda" else device
    report = {"date": f"{now:%Y-%m-%d %H:%M} UTC", "device": name, "torch": torch.__version__, "rows": rows}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, path)
    return path


def table(rows: list[dict]):
    from rich.table import Table

    colour = {"ok": "green", "failed": "bold red", "skipped": "yellow"}
    out = Table(title="gpu-check")
    for column in ("step", "status", "seconds", "notes"):
        out.add_column(column, overflow="fold")
    for r in rows:
        seconds = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
        out.add_row(r["name"], f"[{colour[r['status']]}]{r['status']}[/]", seconds, r["notes"])
    return out


def main() -> int:
    """`make gpu-check`: the table, the JSON file, exit 1 on a failed row; without CUDA, skip (exit 0)."""
    from rich.console import Console

    if not torch.cuda.is_available():
        print("gpu-check: skipped: no CUDA device")
        return 0
    from bench.bench_gpu import REFERENCE

    if not (REFERENCE / "config.json").is_file():
        print(f"gpu-check: failed: {REFERENCE / 'config.json'} not found (set PRODUCTVLM_REFERENCE)")
        return 1
    rows = run()
    Console().print(table(rows))
    return 1 if any(r["status"] == "failed" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
