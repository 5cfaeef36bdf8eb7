"""The options of the verbs that run a model (`eval`, `predict`, `serve`), each declared once.

Typer reads a parameter's option from its `Annotated` type, so a verb declares `device: Device = "auto"`.
"""

from __future__ import annotations

from typing import Annotated

import typer

from productvlm.errors import UserError

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


def _fraction(flag: str, help: str):
    """An optional number from 0 to 1."""
    return Annotated[float | None, typer.Option(flag, min=0.0, max=1.0, help=help)]


# Two ways to set the per-field confidence under which a row needs review (prompting.confidence.review_thresholds).
ReviewBelow = _fraction("--review-below", "needs_review when a field's confidence is below P (0.5).")
TargetAccuracy = _fraction(
    "--target-accuracy",
    "needs_review below the threshold at which each field's accepted validation rows reach A.",
)


def check_review_options(review_below: float | None, target_accuracy: float | None) -> None:
    """At most one of --review-below and --target-accuracy: checked before the model loads."""
    if review_below is not None and target_accuracy is not None:
        raise UserError("give --review-below or --target-accuracy, not both")


__all__ = [
    "Device",
    "Dtype",
    "NumCrops",
    "Compiled",
    "ReviewBelow",
    "TargetAccuracy",
    "check_review_options",
]
