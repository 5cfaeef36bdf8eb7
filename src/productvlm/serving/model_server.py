"""What every route shares: the limits (`ServeSettings`) and `ModelServer` (the model's engine and batcher,
the metrics, the remote-image fetcher, the photo prompt). A route asks for it with a `server: Server`
parameter, a FastAPI dependency that reads `app.state.server`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, FastAPI, Request
from starlette.concurrency import run_in_threadpool

from productvlm.inference.inputs import Prepared
from productvlm.prompting.settings import PromptSettings
from productvlm.serving.batching import Batcher, Engine
from productvlm.serving.errors import APIError
from productvlm.serving.images import ImageLimits, RemoteFetcher, decode_data_url
from productvlm.serving.metrics import Metrics

if TYPE_CHECKING:
    from productvlm.prompting.confidence import Calibration


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


@dataclass
class ModelServer:
    settings: ServeSettings
    engine: Engine
    batcher: Batcher
    metrics: Metrics
    fetcher: RemoteFetcher
    photo_prompt: str  # the trained prompt of /v1/catalog
    model_info: dict | None = None  # models.eval_records.model_summary, for /v1/models and the page
    calibration: Calibration | None = None

    @classmethod
    def around(
        cls,
        model,
        processor,
        trained: PromptSettings,
        settings: ServeSettings,
        address_allowed: Callable[[str], bool],
        **extra,
    ) -> ModelServer:
        engine = Engine(model, processor, trained.num_crops, settings.compile)
        metrics = Metrics()
        batcher = Batcher(
            engine,
            settings.max_batch_size,
            settings.batch_wait_ms,
            settings.max_queue,
            on_batch=metrics.batch_size.observe,
        )
        metrics.queue_depth.set_function(batcher.queue.qsize)
        fetcher = RemoteFetcher(settings.images, address_allowed)
        return cls(settings, engine, batcher, metrics, fetcher, trained.photo_prompt(), **extra)

    @property
    def tokenizer(self):
        return self.engine.processor.tokenizer

    @asynccontextmanager
    async def lifespan(self, app: FastAPI):
        """Warm up (compile) for the limits, run the batcher, and on shutdown stop it and the fetcher."""
        longest = self.settings.max_prompt_tokens + self.settings.max_tokens_limit
        app.state.decode = await self.batcher.warmup(longest, self.settings.default_max_tokens)
        logging.getLogger("uvicorn.error").info(app.state.decode)
        self.batcher.start()
        yield
        await self.batcher.stop()
        await self.fetcher.close()

    async def load_image(self, url: str, where: str):
        if url.startswith("data:"):
            return await run_in_threadpool(decode_data_url, url, self.settings.images, where)
        if url.startswith(("http://", "https://")):
            if not self.settings.allow_remote_images:
                raise APIError(
                    400,
                    f"{where}: remote image URLs are disabled on this server; send a base64 data: URL",
                    "remote_images_disabled",
                )
            return await self.fetcher.fetch(url, where)
        raise APIError(400, f"{where}: expected a data: URL or an http(s) URL", "invalid_image_url")

    async def prepare(self, prompt_text: str, images: list) -> Prepared:
        prepared = await run_in_threadpool(self.engine.prepare, prompt_text, images)
        limit = self.settings.max_prompt_tokens
        if len(prepared.ids) > limit:
            raise APIError(
                400, f"prompt is {len(prepared.ids):,} tokens, over the limit of {limit:,}", "prompt_too_long"
            )
        return prepared


def _server_of(request: Request) -> ModelServer:
    return request.app.state.server


Server = Annotated[ModelServer, Depends(_server_of)]
