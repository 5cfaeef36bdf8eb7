"""`make demo`: what runs end to end today, on a CPU, from nothing.

1. Synthesize a small sample catalog (dataset folder with train/validation/test).
2. Create a randomly initialised tiny Phi-3-V (our own tokenizer, 112 px crops).
3. Run batched generation on a few test-split photos and print prompt, truth and answer.

The model is untrained, so its answers are noise: this shows the pipeline (data -> processor ->
batched generation) works; learning arrives with `productvlm train`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from productvlm.data.folder import read_split
from productvlm.data.synth import synthesize
from productvlm.models.phi3v import Phi3VForCausalLM, Phi3VProcessor
from productvlm.models.phi3v.presets import init_model

QUESTION = "<|user|>\n<|image_1|>What is shown in this image?<|end|><|assistant|>\n"
ANSWER = "Product: {title}, Category: {category3_code}, Full Price: {full_price}"


def main(out: Path = Path("demo")) -> int:
    console = Console()
    t0 = time.perf_counter()
    console.rule("[bold]1. sample catalog")
    info = synthesize(out / "data", rows=200, seed=0, overwrite=True)
    console.print(f"{info['rows']} rows -> {out / 'data'}  (splits: {info['counts']})")

    console.rule("[bold]2. tiny Phi-3-V (random weights)")
    model_dir = init_model("tiny", out / "tiny-model", seed=0)
    model = Phi3VForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    processor = Phi3VProcessor.from_pretrained(model_dir)
    n_params = sum(p.numel() for p in model.parameters())
    console.print(f"{n_params / 1e6:.1f}M parameters -> {model_dir}")

    console.rule("[bold]3. batched generation on test photos (untrained: expect noise)")
    rows = read_split(out / "data", "test")[:4]
    images = [[Image.open(r["image_path"])] for r in rows]
    inputs = processor([QUESTION] * len(rows), images, padding_side="left")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=24)
    answers = processor.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    table = Table("image", "truth", "model answer (untrained)", show_lines=True)
    for row, answer in zip(rows, answers):
        table.add_row(Path(row["image_path"]).name, ANSWER.format(**row), repr(answer))
    console.print(table)
    console.print(
        f"batch of {len(rows)}: input_ids {tuple(inputs['input_ids'].shape)}, "
        f"pixel_values {tuple(inputs['pixel_values'].shape)}; done in {time.perf_counter() - t0:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
