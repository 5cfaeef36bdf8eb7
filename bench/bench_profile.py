"""Where a training step's time goes (torch.profiler), and how much of it is spent waiting for data.

Breakdown: the tiny-cpu config's step (batch 16, full fine-tuning, fp32) on the project's own dataset
and collator, under torch.profiler with one `record_function` range per part. The step is split at
the image features so that each part's backward is timed with its forward: the vision tower's
output is detached into a leaf, the decoder's forward and backward run from it, then the tower's
backward runs from the leaf's gradient (the chain rule by hand: same loss and gradients as
`model(**batch).loss.backward()`, tested).

Data wait: the real `productvlm train` with the images decoded and preprocessed in the main
process (`train.num_workers=0`, the baseline) and in DataLoader worker processes.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from bench.common import catalog, result, tiny_config, tiny_model, train_metered

PARTS = ("data loading", "vision tower", "decoder + LM head", "optimizer")


def split_step(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Forward and backward of one batch in two parts (vision tower, then decoder); returns the loss."""
    embedding = model.model.vision_embed_tokens
    with record_function("vision tower"):
        features = embedding(batch["pixel_values"], batch["image_sizes"])
    with record_function("decoder + LM head"):
        leaf = features.detach().requires_grad_()
        ids = batch["input_ids"]
        embeds = model.model.embed_tokens(ids)
        slots = (ids == model.config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(slots, leaf.to(embeds.dtype))
        loss = model(
            inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss
        loss.backward()
    with record_function("vision tower"):
        features.backward(leaf.grad)
    return loss.detach()


def breakdown(cfg, steps: int) -> tuple[dict[str, float], float]:
    """Milliseconds per step in each part (after one warm-up step), and the total per step."""
    from productvlm.models.phi3v import Phi3VForCausalLM, Phi3VProcessor
    from productvlm.training.data import CatalogDataset, Collator, make_encoder, rows_of

    torch.manual_seed(cfg.train.seed)
    model = Phi3VForCausalLM.from_pretrained(tiny_model(cfg.train.seed), dtype=torch.float32).train()
    processor = Phi3VProcessor.from_pretrained(tiny_model(cfg.train.seed))
    # with the config's augmentation (data.augment), which runs where the photos are decoded
    dataset = CatalogDataset(
        rows_of(cfg, "train"), make_encoder(cfg, processor), augment=cfg.data.augment, seed=cfg.train.seed
    )
    collate = Collator(processor, cfg.data.num_crops)
    loader = torch.utils.data.DataLoader(dataset, cfg.train.batch_size, shuffle=True, collate_fn=collate)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)

    def step(batches) -> None:
        with record_function("data loading"):
            batch = next(batches)
        split_step(model, batch)
        with record_function("optimizer"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()

    batches = iter(loader)
    step(batches)  # warm-up: first-call allocations and lazy initialisation
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step(batches)
        total = (time.perf_counter() - t0) / steps * 1000
    times = {e.key: e.cpu_time_total / 1000 / steps for e in prof.key_averages() if e.key in PARTS}
    return {part: times.get(part, 0.0) for part in PARTS}, total


def run(
    steps: int = 5, batch_size: int = 16, rows: int = 200, workers: int = 2, threads: int = 1
) -> list[dict]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(steps, batch_size, rows, workers)
    finally:
        torch.set_num_threads(previous)


def _run(steps: int, batch_size: int, rows: int, workers: int) -> list[dict]:
    data = catalog(rows)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = tiny_config(data, Path(tmp) / "profile", f"train.batch_size={batch_size}")
        parts, total = breakdown(cfg, steps)
        for part, ms in parts.items():
            row = result(
                f"profile: training step, {part}",
                100 * ms / total,
                "% of step",
                "whole step (ms)",
                total,
                "-",
                f"{ms:.0f} ms of {total:.0f} ms per step; batch {batch_size}, num_crops "
                f"{cfg.data.num_crops}, fp32, torch.profiler over {steps} steps",
            )
            out.append({**row, "ratio": None})  # a share of the step, not a speed-up
        waits = {}
        for n in (0, workers):
            run_cfg = tiny_config(
                data, Path(tmp) / f"workers-{n}", f"train.max_steps={steps + 1}",
                f"train.batch_size={batch_size}", f"train.num_workers={n}",
            )  # fmt: skip
            waits[n] = train_metered(run_cfg)
    base, ours = waits[0], waits[workers]
    out.append(
        result(
            f"profile: share of step time waiting for data, {workers} DataLoader workers",
            100 * ours.wait_share,
            "% of step time",
            "num_workers 0 (decoding in the training process)",
            100 * base.wait_share,
            "< 5%",
            f"real `train`, {steps} steps after the first: {ours.rate():.1f} vs {base.rate():.1f} samples/s; "
            f"first batch {ours.steps[0].wait:.2f}s with workers, {base.steps[0].wait:.2f}s without; "
            "ratio = wait removed",
            higher_is_better=False,
        )
    )
    return out


if __name__ == "__main__":
    import json

    for r in run():
        print(json.dumps(r))
