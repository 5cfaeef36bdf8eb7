"""The `productvlm` command line: one verb per step of the flow (see the README)."""

from __future__ import annotations

import os
import sys
from typing import Any

import typer
from rich.console import Console

from productvlm.errors import UserError

app = typer.Typer(
    help="Fine-tune Phi-3-Vision to write catalog entries (title, category, price) from product photos.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
err_console = Console(stderr=True)


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    if debug:
        os.environ["PRODUCTVLM_DEBUG"] = "1"


def verbs() -> list[tuple[str, Any, str]]:
    """The one table of verbs: (name, the command function or sub-app that runs it, help)."""
    from productvlm.data.cli import app as data_app
    from productvlm.evaluation.cli import eval_command, predict_command
    from productvlm.models.cli import app as model_app
    from productvlm.models.cli import export_command
    from productvlm.serving.cli import serve_command
    from productvlm.training.cli import train

    return [
        ("data", data_app, "Make, import and inspect catalog datasets."),
        ("model", model_app, "Create and inspect Phi-3-V models."),
        ("train", train, "Fine-tune Phi-3-V on a dataset folder (writes a run folder)."),
        (
            "eval",
            eval_command,
            "Score a model on a dataset split: metrics.json, predictions.jsonl, report.html.",
        ),
        ("predict", predict_command, "Catalog entries for product photos, one JSON line per image."),
        ("serve", serve_command, "Serve a model over HTTP (OpenAI-compatible API, catalog endpoint, page)."),
        ("export", export_command, "Write a standalone model folder in the official Phi-3-V layout."),
    ]


def _register() -> None:
    for name, run, help_ in verbs():
        if isinstance(run, typer.Typer):
            app.add_typer(run, name=name, help=help_)
        else:
            app.command(name, help=help_)(run)


_register()


def quiet_library_progress() -> None:
    """Our rich bars say what runs; transformers' per-file tqdm bars (loading, writing shards) are noise."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def main() -> None:
    """Console entry point: user errors are one red line and exit code 2, no traceback."""
    quiet_library_progress()
    try:
        app()
    except UserError as e:
        if os.environ.get("PRODUCTVLM_DEBUG"):
            raise
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
