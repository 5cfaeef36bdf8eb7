"""Generation throughput: batches of 16 vs one prompt at a time, same photos, greedy, same code path.

Both go through `productvlm.inference.generate.generate_answers` (left-padded batches, the dynamic KV
cache, positions that skip the padding), with the tiny model and the answer length evaluation uses
(`eval.max_new_tokens` of configs/tiny-cpu.yaml), every answer forced to that length; only
`batch_size` differs. The answers must not depend on the batch they were generated in: the match
rate says how many are identical (fp32; the padding changes the shapes of the matrix products, so a
near-tie between two tokens could in principle flip).

Measured at torch's default thread count (what `eval` and `serve` use: one per core) and at one
thread. A batch's matrix products are large enough to use every core, a single prompt's are not,
so the ratio is higher with the default threads.
"""

from __future__ import annotations

import time

import torch

from bench.common import catalog, result, tiny_config, tiny_model


def run(
    prompts: int = 48,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    rows: int = 200,
    rounds: int = 2,
    threads: tuple[int | None, ...] = (None, 1),
) -> list[dict]:
    """A throughput row per thread count (None: torch's default), then the answer-match row."""
    cfg = tiny_config(catalog(rows), "unused")
    max_new_tokens = max_new_tokens or cfg.eval.max_new_tokens
    out, match = [], None
    for count in threads:
        n, times, answers, used = measure(cfg, prompts, batch_size, max_new_tokens, rounds, count)
        out.append(
            result(
                f"generate: greedy, batch {batch_size}, {used} thread{'s' if used > 1 else ''}",
                n / times[batch_size],
                "samples/s",
                "one prompt at a time",
                n / times[1],
                ">= 5x",
                f"{n} prompts, {max_new_tokens} new tokens each, num_crops {cfg.data.num_crops}, tiny model, "
                f"fp32, {used} thread(s){' (default)' if count is None else ''}; best of {rounds}: "
                f"{times[batch_size]:.2f}s vs {times[1]:.2f}s",
            )
        )
        single, batched = answers[1], answers[batch_size]
        match = match or (sum(a == b for a, b in zip(batched, single)), n, len(set(single)))
    same, n, distinct = match
    out.append(
        result(
            f"generate: answers identical, batch {batch_size} vs one at a time",
            100 * same / n,
            "% of prompts",
            None,
            None,
            "100%",
            f"{same}/{n} identical strings (greedy; {distinct} distinct answers from the random model)",
        )
    )
    return out


def measure(cfg, prompts: int, batch_size: int, max_new_tokens: int, rounds: int, threads: int | None):
    """(prompts, best seconds per batch size, answers per batch size, threads used): best of `rounds`,
    the two modes in turn (fair under the other users' load)."""
    from productvlm.inference.generate import generate_answers
    from productvlm.models.phi3v import Phi3VForCausalLM, Phi3VProcessor
    from productvlm.prompting.settings import PromptSettings
    from productvlm.training.data import rows_of

    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        model = Phi3VForCausalLM.from_pretrained(tiny_model(), dtype=torch.float32)
        processor = Phi3VProcessor.from_pretrained(tiny_model())
        encoder = PromptSettings.from_config(cfg)
        # every prompt generates exactly max_new_tokens, so both modes do the same decoding work
        model.generation_config.eos_token_id = None
        samples = (rows_of(cfg, "validation") + rows_of(cfg, "test") + rows_of(cfg, "train"))[:prompts]
        generate_answers(model, processor, encoder, samples[:2], 2, 2)  # warm-up
        answers, best = {}, {1: float("inf"), batch_size: float("inf")}
        for _ in range(rounds):
            for size in best:
                t0 = time.perf_counter()
                answers[size] = generate_answers(model, processor, encoder, samples, max_new_tokens, size)
                best[size] = min(best[size], time.perf_counter() - t0)
        return len(samples), best, answers, torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


if __name__ == "__main__":
    import json

    for r in run():
        print(json.dumps(r))
