"""The options every verb that runs a model shares (`eval`, `predict`, `serve`), written once.

Typer reads a parameter's option from its `Annotated` type, so a verb declares `device: Device = "auto"`.
"""

from __future__ import annotations

from typing import Annotated

import typer

Device = Annotated[
    str, typer.Option("--device", help="cpu, cuda, cuda:1 ... (auto: cuda when there is one).")
]
Dtype = Annotated[str, typer.Option("--dtype", help="float32, bfloat16, float16 (auto: bfloat16 on a GPU).")]
NumCrops = Annotated[int | None, typer.Option("--num-crops", min=1, max=16, help="Default: as trained.")]
Compiled = Annotated[
    bool | None,
    typer.Option(
        "--compile/--no-compile",
        help="Static KV cache + compiled decode step (default: on for CUDA, off on the CPU).",
        show_default=False,
    ),
]

__all__ = ["Device", "Dtype", "NumCrops", "Compiled"]
