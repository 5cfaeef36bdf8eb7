"""The HTTP API: OpenAI-compatible chat completions, the catalog upload endpoint, health, metrics, a page.

`create_app(model, processor, trained, settings)` builds the FastAPI app around a loaded model and
its prompt settings; `app_from_folder(model_dir, settings)` loads any folder `load_pretrained` reads first.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, File, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from productvlm.prompting.settings import PromptSettings
from productvlm.serving.auth import APIKeyMiddleware
from productvlm.serving.batching import Batcher, Engine, Sampling
from productvlm.serving.chat import (
    ChatRequest,
    catalog_body,
    choice_logprobs,
    chunk_event,
    completion_body,
    completion_id,
    to_phi3_prompt,
    usage,
)
from productvlm.serving.errors import APIError, error_body, install_error_handlers
from productvlm.serving.images import ImageLimits, RemoteFetcher, decode_data_url, decode_image, is_public
from productvlm.serving.metrics import Metrics, MetricsMiddleware
from productvlm.serving.page import PAGE


@dataclass
class ServeSettings:
    """Batching and the limits every request is held to (each breach is a 4xx, or 503 for the queue)."""

    model_name: str = "productvlm"
    max_batch_size: int = 8
    batch_wait_ms: float = 10.0
    max_queue: int = 256
    max_body_bytes: int = 20 * 1024 * 1024
    max_images: int = 4
    max_tokens_limit: int = 1024
    default_max_tokens: int = 256
    max_prompt_tokens: int = 16_384
    catalog_max_tokens: int = 64
    allow_remote_images: bool = False
    images: ImageLimits = field(default_factory=ImageLimits)
    api_key: str | None = field(default=None, repr=False)  # None: no authentication
    metrics_need_key: bool = False
    compile: bool | None = None  # static cache + compiled decode step; None: on for CUDA


class BodyLimitMiddleware:
    """413 for bodies over `max_bytes`: by Content-Length up front, else while the body streams in."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = APIError(
            413, f"request body over the limit of {self.max_bytes:,} bytes", "body_too_large"
        )
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = JSONResponse(error_body(413, too_large.message, too_large.code), status_code=413)
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise too_large
            return message

        await self.app(scope, limited_receive, send)


def create_app(
    model,
    processor,
    trained: PromptSettings,
    settings: ServeSettings | None = None,
    address_allowed: Callable[[str], bool] = is_public,
    model_info: dict | None = None,
    calibration=None,
) -> FastAPI:
    """The app around a loaded model. `trained` = load_prompt_settings(model_dir) (prompt, num_crops).
    `model_info` = models.eval_records.model_summary(model_dir) (last evaluation, currency) for the page."""
    settings = settings or ServeSettings()
    engine = Engine(model, processor, trained.num_crops, settings.compile)
    prompt = trained.photo_prompt()
    metrics = Metrics()
    fetcher = RemoteFetcher(settings.images, address_allowed)
    batcher = Batcher(
        engine,
        settings.max_batch_size,
        settings.batch_wait_ms,
        settings.max_queue,
        on_batch=metrics.batch_size.observe,
    )
    metrics.queue_depth.set_function(batcher.queue.qsize)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        longest = settings.max_prompt_tokens + settings.max_tokens_limit
        app.state.decode = await batcher.warmup(longest, settings.default_max_tokens)
        logging.getLogger("uvicorn.error").info(app.state.decode)
        batcher.start()
        yield
        await batcher.stop()
        await fetcher.close()

    app = FastAPI(title="productvlm", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings, app.state.batcher = settings, batcher
    install_error_handlers(app)

    async def load_image(url: str, where: str):
        if url.startswith("data:"):
            return await run_in_threadpool(decode_data_url, url, settings.images, where)
        if url.startswith(("http://", "https://")):
            if not settings.allow_remote_images:
                raise APIError(
                    400,
                    f"{where}: remote image URLs are disabled on this server; send a base64 data: URL",
                    "remote_images_disabled",
                )
            return await fetcher.fetch(url, where)
        raise APIError(400, f"{where}: expected a data: URL or an http(s) URL", "invalid_image_url")

    async def prepare(prompt_text: str, images: list):
        prepared = await run_in_threadpool(engine.prepare, prompt_text, images)
        if len(prepared.ids) > settings.max_prompt_tokens:
            raise APIError(
                400,
                f"prompt is {len(prepared.ids):,} tokens, over the limit of {settings.max_prompt_tokens:,}",
                "prompt_too_long",
            )
        return prepared

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": settings.model_name, "queue_depth": batcher.queue.qsize()}

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": settings.model_name,
                    "object": "model",
                    "owned_by": "productvlm",
                    "productvlm": model_info or {"evaluation": None, "currency": None},
                }
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        default = min(settings.default_max_tokens, settings.max_tokens_limit)
        max_tokens = req.max_completion_tokens or req.max_tokens or default
        if max_tokens > settings.max_tokens_limit:
            raise APIError(
                400,
                f"max_tokens={max_tokens} is over this server's limit of {settings.max_tokens_limit}",
                "max_tokens_too_large",
                "max_tokens",
            )
        if req.n != 1:
            raise APIError(400, "only n=1 is supported", "unsupported_value", "n")
        prompt_text, urls = to_phi3_prompt(req.messages)
        if len(urls) > settings.max_images:
            raise APIError(
                400,
                f"{len(urls)} images in the request; this server takes at most {settings.max_images}",
                "too_many_images",
            )
        images = [await load_image(url, f"image {k + 1}") for k, url in enumerate(urls)]
        prepared = await prepare(prompt_text, images)
        sampling = Sampling(req.temperature, req.top_p if req.temperature > 0 else 1.0)
        cid, name, logprobs = completion_id(), settings.model_name, req.logprobs_wanted()
        if not req.stream:
            done = await batcher.submit(prepared, max_tokens, sampling, logprobs=logprobs)
            tokens = done.prompt_tokens, done.completion_tokens
            lp = (
                None
                if logprobs is None
                else choice_logprobs(processor.tokenizer, done.tokens, done.logprobs, done.top)
            )
            return completion_body(cid, name, done.text, done.finish_reason, usage(*tokens), lp)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[str | None] = asyncio.Queue()
        # Submitted before the response starts, so a full queue is still a plain 503.
        future = batcher.submit(
            prepared, max_tokens, sampling, lambda text: loop.call_soon_threadsafe(deltas.put_nowait, text)
        )
        future.add_done_callback(lambda _: deltas.put_nowait(None))  # runs after every queued delta
        return StreamingResponse(
            _stream(future, deltas, cid, name, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    @app.post("/v1/catalog")
    async def catalog(file: UploadFile = File(..., description="A product photo")) -> dict:
        data = await file.read()
        image = await run_in_threadpool(decode_image, data, settings.images, f"upload {file.filename!r}")
        prepared = await prepare(prompt, [image])
        done = await batcher.submit(prepared, settings.catalog_max_tokens, logprobs=0)
        return catalog_body(done, processor.tokenizer, calibration)

    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.api_key:  # before the body limit and the app; the metrics count its 401s
        app.add_middleware(
            APIKeyMiddleware, api_key=settings.api_key, protect_metrics=settings.metrics_need_key
        )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


async def _stream(future: asyncio.Future, deltas: asyncio.Queue, cid: str, name: str, include_usage: bool):
    """SSE chunks as the batch generates: the role, content deltas, the finish reason, [DONE]."""
    try:
        yield chunk_event(cid, name, {"role": "assistant", "content": ""})
        while (text := await deltas.get()) is not None:
            yield chunk_event(cid, name, {"content": text})
        try:
            done = future.result()
        except Exception as e:  # noqa: BLE001  (the headers are sent: report it in the stream)
            yield f"data: {json.dumps(error_body(500, f'generation failed: {e}', 'generation_failed'))}\n\n"
            return
        yield chunk_event(cid, name, {}, done.finish_reason)
        if include_usage:
            yield chunk_event(cid, name, None, usage_=usage(done.prompt_tokens, done.completion_tokens))
        yield "data: [DONE]\n\n"
    finally:
        if not future.done():
            future.cancel()  # the client went away: the worker skips a job that has not started


def app_from_folder(
    model_dir: str | Path, settings: ServeSettings | None = None, dtype="float32", device="cpu"
):
    from productvlm.models.eval_records import model_summary
    from productvlm.models.loading import load_pretrained, resolve_model_dir
    from productvlm.prompting.confidence import load_calibration
    from productvlm.prompting.settings import load_prompt_settings

    model, processor = load_pretrained(model_dir, dtype=dtype, device=device)
    where = resolve_model_dir(model_dir)
    info = model_summary(where) if isinstance(where, Path) else None
    calibration = load_calibration(where) if isinstance(where, Path) else None
    return create_app(
        model, processor, load_prompt_settings(where), settings, model_info=info, calibration=calibration
    )
