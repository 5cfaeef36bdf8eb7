"""`productvlm serve`: a plain typer command function the main CLI registers."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from productvlm.inference.cli_options import Compiled, Device, Dtype

console = Console(stderr=True)


def serve_command(
    model: Path = typer.Option(..., "--model", help="Model, LoRA adapter or run folder."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 exposes it to the network)."),
    port: int = typer.Option(8000, help="TCP port."),
    max_batch_size: int = typer.Option(8, min=1, help="Requests per model.generate call."),
    batch_wait_ms: float = typer.Option(10.0, min=0, help="How long the first request waits for others."),
    no_batching: bool = typer.Option(False, "--no-batching", help="One request per generate call."),
    max_queue: int = typer.Option(256, min=1, help="Requests waiting beyond this get 503."),
    max_tokens: int = typer.Option(1024, min=1, help="Largest max_tokens a request may ask for."),
    max_images: int = typer.Option(4, min=1, help="Images per request."),
    max_pixels: int = typer.Option(20_000_000, min=1, help="Pixels per image (checked before decoding)."),
    max_body_mb: float = typer.Option(20.0, min=0.001, help="Request body size limit, MiB."),
    allow_remote_images: bool = typer.Option(
        False, "--allow-remote-images", help="Fetch http(s) image URLs (public addresses only)."
    ),
    dtype: Dtype = "auto",
    device: Device = "auto",
    api_key: str | None = typer.Option(
        None,
        "--api-key",
        envvar="PRODUCTVLM_API_KEY",
        show_default=False,
        help="Require 'Authorization: Bearer KEY' on /v1/* (the page asks for it). Prefer the env var.",
    ),
    metrics_need_key: bool = typer.Option(
        False, "--metrics-need-key", help="With --api-key, /metrics needs the key too (else it stays open)."
    ),
    compiled: Compiled = None,
) -> None:
    """Serve the model over HTTP: OpenAI-compatible chat completions, a catalog endpoint and a page."""
    from productvlm.serving.allocator import Trim, bound_malloc

    bound_malloc()  # before the server's threads start: memory stays flat over days of varying photos
    import uvicorn

    from productvlm.inference.device import pick_device, pick_dtype
    from productvlm.models.loading import DTYPES
    from productvlm.serving.app import ServeSettings, app_from_folder
    from productvlm.serving.images import ImageLimits

    device = pick_device(device)
    dtype = pick_dtype(dtype, device)
    if dtype not in DTYPES:
        from productvlm.errors import UserError

        raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if metrics_need_key and not api_key:
        from productvlm.errors import UserError

        raise UserError(
            "--metrics-need-key protects /metrics with the API key: set --api-key (or PRODUCTVLM_API_KEY)"
        )
    settings = ServeSettings(
        model_name=model.resolve().parent.name if model.name == "final" else model.resolve().name,
        max_batch_size=1 if no_batching else max_batch_size,
        batch_wait_ms=0.0 if no_batching else batch_wait_ms,
        max_queue=max_queue,
        max_tokens_limit=max_tokens,
        max_images=max_images,
        max_body_bytes=int(max_body_mb * 1024 * 1024),
        allow_remote_images=allow_remote_images,
        images=ImageLimits(max_pixels=max_pixels),
        api_key=api_key or None,
        metrics_need_key=metrics_need_key,
        compile=compiled,
    )
    app = app_from_folder(model, settings, dtype=dtype, device=device)
    app.state.batcher.after_batch = Trim()
    batching = "off" if settings.max_batch_size == 1 else f"up to {settings.max_batch_size}"
    key = "API key required" if settings.api_key else "no API key: anyone who can reach it may use it"
    console.print(f"serving {model} on http://{host}:{port}  (device {device}, batching {batching}; {key})")
    uvicorn.run(app, host=host, port=port, log_level="info")
