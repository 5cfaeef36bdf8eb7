"""`predict` over a folder of photos: one process vs two (torchrun, gloo, CPU), and what confidence costs.

1. The bench catalog's train split through the real command (`python -m productvlm predict --data ...
   --output`), once as one process and once as two torchrun processes, one thread each (on these
   shared 2-core machines torch's default of one thread per core thrashes under other users' load:
   3.6 photos/s against 59 for two one-thread processes in one run); photos/s is the command's own
   summary (generation loop, model load excluded), and the two outputs must be equal row for row.
2. The overhead of confidence: the same batches through `inference.generate.generate_batch` with and
   without token log-probabilities (+ the per-field scores), best of `rounds`, in turn.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import REPO, catalog, result, tiny_model

RATE = re.compile(r"at ([\d.]+)\s+photos/s")


def predict_rate(data: Path, out: Path, processes: int, max_new_tokens: int, batch_size: int) -> float:
    """photos/s from the command's summary line."""
    command = [
        sys.executable,
        "-m",
        "productvlm",
        "predict",
        "--model",
        str(tiny_model()),
        "--data",
        str(data),
    ]
    command += ["--split", "train", "--output", str(out), "--num-crops", "1", "--device", "cpu"]
    command += ["--max-new-tokens", str(max_new_tokens), "-b", str(batch_size), "--chunk-rows", "32"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    if processes > 1:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={processes}",
        ]
        command = [*launcher, *command[1:]]
        env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"predict failed: {done.stderr[-2000:]}")
    match = RATE.search(" ".join(done.stderr.split()))
    if not match:
        raise RuntimeError(f"no photos/s in the summary: {done.stderr[-500:]}")
    return float(match.group(1))


def confidence_overhead(
    data: Path, batch_size: int, max_new_tokens: int, rounds: int
) -> tuple[float, float, int]:
    """(seconds without, seconds with log-probabilities and field scores, photos): best of `rounds`."""
    import torch

    from productvlm.data.folder import read_split
    from productvlm.inference.generate import generate_batch
    from productvlm.inference.inputs import load_image, prepare
    from productvlm.inference.predictor import Predictor
    from productvlm.prompting.confidence import field_scores

    predictor = Predictor(
        tiny_model(), num_crops=1, device="cpu", dtype="float32", max_new_tokens=max_new_tokens
    )
    prompt = predictor.settings.photo_prompt()
    rows = read_split(data, "train")[: 4 * batch_size]
    prepared = [prepare(predictor.processor, prompt, [load_image(r["image_path"])], 1) for r in rows]
    batches = [prepared[i : i + batch_size] for i in range(0, len(prepared), batch_size)]

    def once(scored: bool) -> float:
        start = time.perf_counter()
        for chunk in batches:
            answers = generate_batch(
                predictor.model, predictor.processor, chunk, max_new_tokens, with_logprobs=scored
            )
            if scored:
                [field_scores(a.text, a.logprobs, a.ends) for a in answers]
        return time.perf_counter() - start

    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # as the processes above
    with torch.no_grad():
        once(False)  # warm-up
        best = {False: float("inf"), True: float("inf")}
        for _ in range(rounds):
            for scored in (False, True):
                best[scored] = min(best[scored], once(scored))
    torch.set_num_threads(previous)
    return best[False], best[True], len(rows)


def run(rows: int = 200, max_new_tokens: int = 16, batch_size: int = 16, rounds: int = 3) -> list[dict]:
    data = catalog(rows)
    with tempfile.TemporaryDirectory() as tmp:
        one = predict_rate(data, Path(tmp) / "one.jsonl", 1, max_new_tokens, batch_size)
        two = predict_rate(data, Path(tmp) / "two.jsonl", 2, max_new_tokens, batch_size)
        same = (Path(tmp) / "one.jsonl").read_text() == (Path(tmp) / "two.jsonl").read_text()
        n = len((Path(tmp) / "one.jsonl").read_text().splitlines())
    plain, scored, photos = confidence_overhead(data, batch_size, max_new_tokens, rounds)
    return [
        result(
            "predict a folder: 2 torchrun processes (gloo, 1 thread each)",
            two,
            "photos/s",
            "one process, 1 thread",
            one,
            "> 1x",
            f"{n} photos of the bench catalog's train split, tiny model, num_crops 1, {max_new_tokens} new "
            f"tokens, batch {batch_size}; outputs {'identical' if same else 'DIFFERENT'} row for row",
        ),
        result(
            "predict: time with per-field confidence",
            100 * (scored / plain - 1),
            "% overhead",
            None,
            None,
            "< 5%",
            f"{photos} photos in batches of {batch_size}, {max_new_tokens} new tokens, best of {rounds}: "
            f"{scored:.2f}s with log-probabilities + field scores vs {plain:.2f}s without",
        ),
    ]
