"""`productvlm model ...` (make and inspect Phi-3-V model folders) and `productvlm export`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from productvlm.errors import UserError

app = typer.Typer(no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)  # export: stdout stays free


@app.command("init")
def init(
    out: Path = typer.Option(..., "--out", help="Folder to write the model, tokenizer and processor to."),
    preset: str = typer.Option("tiny", help="Architecture preset: tiny (CPU demo and tests)."),
    seed: int = typer.Option(0, help="Seed of the random weights."),
) -> None:
    """Write a randomly initialised Phi-3-V model of a preset size, in the official folder layout."""
    from productvlm.models.phi3v.presets import PRESETS, init_model

    if preset not in PRESETS:
        raise UserError(f"--preset {preset!r} is unknown; choose from: {', '.join(PRESETS)}")
    init_model(preset, out, seed=seed)
    info(out)


@app.command("info")
def info(model_dir: Path = typer.Argument(..., help="A model folder (official layout).")) -> None:
    """Show a model folder's architecture, parameter counts and image-token cost."""
    from transformers import AutoConfig

    from productvlm.models.phi3v import Phi3VConfig
    from productvlm.models.phi3v.image_tokens import num_image_tokens

    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir}: no config.json here; give a model folder")
    config = AutoConfig.from_pretrained(model_dir)
    if not isinstance(config, Phi3VConfig):
        raise UserError(f"{model_dir}/config.json: model_type is {config.model_type!r}, expected 'phi3_v'")
    v = config.vision_config
    table = Table(title=str(model_dir), show_header=False)
    table.add_row(
        "decoder",
        f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"{config.num_attention_heads} heads, vocab {config.vocab_size}",
    )
    table.add_row(
        "vision tower",
        f"CLIP {v.num_hidden_layers} layers, hidden {v.hidden_size}, "
        f"{v.image_size} px crops, {config.tokens_per_side**2} tokens/crop",
    )
    for crops in (1, 4, 16):
        tokens = num_image_tokens(1000, 1000, crops, config.crop_size, config.tokens_per_side)
        table.add_row(f"tokens, 1000x1000 @ {crops} crops", str(tokens))
    console.print(table)


def export_command(
    model: Path = typer.Option(..., "--model", help="Model, LoRA adapter or run folder."),
    out: Path = typer.Option(..., "--out", help="Folder to write (official Phi-3-V layout)."),
    merge_lora: bool = typer.Option(False, "--merge-lora", help="Merge a LoRA adapter into its base."),
    dtype: str = typer.Option("bf16", help="bf16, fp16 or fp32."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
) -> None:
    """Write a standalone model folder in the official layout (config.json phi3_v, safetensors, processor)."""
    from productvlm.models.export import export_model

    with err_console.status(f"exporting {model} -> {out}"):
        written = export_model(model, out, merge_lora=merge_lora, dtype=dtype, overwrite=overwrite)
    files = sorted(p.name for p in written.iterdir())
    err_console.print(f"wrote {written}: {', '.join(files)}")
