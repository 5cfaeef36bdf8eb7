"""Training throughput: `productvlm train` (configs/tiny-cpu.yaml) vs the loop the common Phi-3-V script runs.

Ours is the real `productvlm.training.run.train` for a fixed number of steps (batch 16, labels on the
answer only, each batch padded to its longest sample), timed step by step by a callback. The
baseline trains the same tiny model (the run's own base-model/ weights) the way the widely copied
Phi-3-V fine-tuning script does: batch 1, every sample padded to 512 tokens, fp32, labels = input_ids
(loss on the prompt, the image slots and the padding too), a plain torch loop with AdamW. Same photos,
same num_crops, same tokens, same number of samples; both load and preprocess their images in the loop.
Answer tokens/s counts the same answer tokens for both, so it is the figure a user cares about. Both
are timed after their first step (one-off allocations), best of 2 rounds run in turn.

Padding shares (no model run) come from the encoded lengths and `training.data.padding_share`.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.common import Meter, catalog, result, tiny_config, train_metered

NAIVE_LENGTH = 512


def naive_batch(
    processor, encoder, row: dict[str, Any], length: int = NAIVE_LENGTH
) -> dict[str, torch.Tensor]:
    """One sample as the common script builds it: padded to `length`, labels on every position."""
    from productvlm.inference.inputs import load_image

    ids = encoder.prompt_ids(row) + encoder.answer_ids(row)
    pad = processor.tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (length - len(ids))])
    images = processor.image_processor(
        [load_image(row["image_path"])], num_crops=encoder.num_crops, return_tensors="pt"
    )
    return {
        "input_ids": input_ids,
        "attention_mask": (torch.arange(length) < len(ids)).long().unsqueeze(0),
        "labels": input_ids.clone(),
        "pixel_values": images["pixel_values"],
        "image_sizes": images["image_sizes"],
    }


@dataclass
class Naive:
    """Seconds and answer tokens of each sample of the naive loop."""

    seconds: list[float]
    answer_tokens: list[int]

    def rate(self, what: str = "samples") -> float:
        """Per second after the first sample (as `Meter.rate` leaves out the first step)."""
        done = len(self.seconds) - 1 if what == "samples" else sum(self.answer_tokens[1:])
        return done / sum(self.seconds[1:])


def naive_train(model_dir: Path, cfg, rows: list[dict[str, Any]]) -> Naive:
    """Trains on `rows` one at a time, as the common script does."""
    from productvlm.models.phi3v import Phi3VForCausalLM, Phi3VProcessor
    from productvlm.training.data import make_encoder

    torch.manual_seed(cfg.train.seed)
    model = Phi3VForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    processor = Phi3VProcessor.from_pretrained(model_dir)
    encoder = make_encoder(cfg, processor)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    seconds = []
    for row in rows:
        t0 = time.perf_counter()
        loss = model(**naive_batch(processor, encoder, row)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seconds.append(time.perf_counter() - t0)
    return Naive(seconds, [len(encoder.answer_ids(r)) for r in rows])


def encoded_lengths(cfg, num_crops: int) -> list[int]:
    """Tokens per train sample at `num_crops`, from the image headers alone."""
    from productvlm.models.phi3v import Phi3VProcessor
    from productvlm.training.data import Encoder, rows_of

    processor = Phi3VProcessor.from_pretrained(Path(cfg.output_dir) / "base-model")
    encoder = Encoder(processor, cfg.data.prompt, cfg.data.answer, num_crops, max_tokens=1 << 20)
    return [len(encoder(r)) for r in rows_of(cfg, "train")]


def padding_rows(cfg, batch_size: int) -> list[dict]:
    """Share of the token slots that are padding: random batches vs length grouping vs packing.

    Computed on the train split's lengths repeated to >= 1,000 samples: the same length
    distribution as a larger catalog, so that one part-filled last batch or pack does not
    dominate the figure as it would with a 161-sample split.
    """
    from productvlm.training.data import padding_share

    rows = []
    for num_crops in sorted({cfg.data.num_crops, 16}):
        sample = encoded_lengths(cfg, num_crops)
        lengths = sample * -(-1000 // len(sample))
        pack, seed = cfg.train.pack_length, cfg.train.seed
        random = padding_share(lengths, batch_size, seed=seed)
        shares = {
            "length grouping": padding_share(lengths, batch_size, group_by_length=True, seed=seed),
            f"packing ({pack} tokens/row)": padding_share(
                lengths, batch_size, packing=True, pack_length=pack, seed=seed
            ),
        }
        for how, share in shares.items():
            rows.append(
                result(
                    f"train: padding share, num_crops {num_crops}, {how}",
                    100 * share,
                    "% of token slots",
                    "random batches",
                    100 * random,
                    "less padding",
                    f"batch {batch_size}; {len(sample)} train samples of {min(sample)}-{max(sample)} tokens, "
                    f"repeated to {len(lengths)}; ratio = padding removed",
                    higher_is_better=False,
                )
            )
        if num_crops == cfg.data.num_crops:
            mean = sum(sample) / len(sample)
            rows.append(
                result(
                    f"train: padding share, num_crops {num_crops}, our batches vs pad-to-{NAIVE_LENGTH}",
                    100 * random,
                    "% of token slots",
                    f"naive: every sample padded to {NAIVE_LENGTH}",
                    100 * (1 - mean / NAIVE_LENGTH),
                    "-",
                    f"mean sample {mean:.0f} tokens",
                    higher_is_better=False,
                )
            )
    return rows


def run(
    steps: int = 5,
    batch_size: int = 16,
    rows: int = 200,
    rounds: int = 2,
    packing: bool = True,
    threads: int = 1,
) -> list[dict]:
    """`steps` optimizer steps of `batch_size` for ours, the same number of samples for the baseline.

    Both are timed after their first step and the best of `rounds` rounds, run in turn, is kept
    (fair under the other users' load). One torch thread for both: on a shared 2-core machine two
    threads per process make every figure swing by up to 10x (a thread waits for its descheduled
    partner at every op).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return _run(Path(tmp), steps, batch_size, rows, rounds, packing)
    finally:
        torch.set_num_threads(previous)


def _run(tmp: Path, steps: int, batch_size: int, rows: int, rounds: int, packing: bool) -> list[dict]:
    from productvlm.training.data import rows_of

    data = catalog(rows)
    overrides = (f"train.max_steps={steps}", f"train.batch_size={batch_size}")
    cfg = tiny_config(data, tmp / "run-0", *overrides)
    train_rows = list(itertools.islice(itertools.cycle(rows_of(cfg, "train")), steps * batch_size))
    ours, naive = [], []
    for k in range(rounds):
        ours.append(train_metered(tiny_config(data, tmp / f"run-{k}", *overrides)))
        naive.append(naive_train(tmp / f"run-{k}" / "base-model", cfg, train_rows))
    best, base = max(ours, key=Meter.rate), max(naive, key=Naive.rate)
    label = f"naive loop (batch 1, pad {NAIVE_LENGTH}, loss on all tokens)"
    timing = (
        f"best of {rounds} rounds in turn; {steps - 1} steps of {batch_size} vs {len(train_rows) - 1} samples"
    )
    out = [
        result(
            "train: tiny-cpu config, full FT, samples/s",
            best.rate(),
            "samples/s",
            label,
            base.rate(),
            "-",
            timing,
        ),
        result(
            "train: tiny-cpu config, full FT, answer tokens/s",
            best.rate("answer_tokens"),
            "answer tokens/s",
            label,
            base.rate("answer_tokens"),
            ">= 5x",
            f"token slots per sample: {best.rate('slots') / best.rate():.0f} vs {NAIVE_LENGTH}; {timing}",
        ),
    ]
    if packing:
        out.append(packed_row(cfg, tmp, steps, batch_size, base, label))
    return out + padding_rows(cfg, batch_size)


def packed_row(cfg, tmp: Path, steps: int, batch_size: int, base: Naive, label: str) -> dict:
    """The same run with `train.packing`: rows of `train.pack_length` holding about `batch_size` samples."""
    lengths = encoded_lengths(cfg, cfg.data.num_crops)
    pack = cfg.train.pack_length
    packs = max(1, round(batch_size * sum(lengths) / len(lengths) / pack))
    packed = train_metered(
        tiny_config(
            cfg.data.dir,
            tmp / "packed",
            f"train.max_steps={steps}",
            f"train.batch_size={packs}",
            "train.packing=true",
            "train.balance=0",  # packs join rows; the recipe's loss weights are per row
            f"train.pack_length={pack}",
        )
    )
    per_step = sum(s.samples for s in packed.warm) / len(packed.warm)
    return result(
        "train: tiny-cpu config + packing, answer tokens/s",
        packed.rate("answer_tokens"),
        "answer tokens/s",
        label,
        base.rate("answer_tokens"),
        ">= 5x",
        f"{packs} row(s) of {pack} tokens per step, {per_step:.0f} samples; {steps - 1} steps after the first; "
        "one round",
    )


if __name__ == "__main__":
    import json

    for r in run():
        print(json.dumps(r))
