"""The OpenAI-compatible endpoints: `GET /v1/models` and `POST /v1/chat/completions` (whole or streamed)."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from productvlm.serving.batching import Sampling
from productvlm.serving.chat import (
    ChatRequest,
    choice_logprobs,
    chunk_event,
    completion_body,
    completion_id,
    to_phi3_prompt,
    usage,
)
from productvlm.serving.errors import APIError, error_body
from productvlm.serving.model_server import ModelServer, Server, ServeSettings

router = APIRouter()


@router.get("/v1/models")
async def models(server: Server) -> dict:
    return {
        "object": "list",
        "data": [
            {
                "id": server.settings.model_name,
                "object": "model",
                "owned_by": "productvlm",
                "productvlm": server.model_info or {"evaluation": None, "currency": None},
            }
        ],
    }


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatRequest, server: Server):
    max_tokens = _max_tokens(req, server.settings)
    if req.n != 1:
        raise APIError(400, "only n=1 is supported", "unsupported_value", "n")
    prepared = await _prepared(req, server)
    sampling = Sampling(req.temperature, req.top_p if req.temperature > 0 else 1.0)
    cid, name, logprobs = completion_id(), server.settings.model_name, req.logprobs_wanted()
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _streamed(server, prepared, max_tokens, sampling, cid, include_usage)
    done = await server.batcher.submit(prepared, max_tokens, sampling, logprobs=logprobs)
    tokens = done.prompt_tokens, done.completion_tokens
    lp = None if logprobs is None else choice_logprobs(server.tokenizer, done.tokens, done.logprobs, done.top)
    return completion_body(cid, name, done.text, done.finish_reason, usage(*tokens), lp)


def _max_tokens(req: ChatRequest, settings: ServeSettings) -> int:
    """The request's max_(completion_)tokens, else the server's default; 400 over the server's limit."""
    default = min(settings.default_max_tokens, settings.max_tokens_limit)
    max_tokens = req.max_completion_tokens or req.max_tokens or default
    if max_tokens > settings.max_tokens_limit:
        raise APIError(
            400,
            f"max_tokens={max_tokens} is over this server's limit of {settings.max_tokens_limit}",
            "max_tokens_too_large",
            "max_tokens",
        )
    return max_tokens


async def _prepared(req: ChatRequest, server: ModelServer):
    """The messages as a Phi-3 prompt with their images loaded, tokenized (400 over the limits)."""
    prompt_text, urls = to_phi3_prompt(req.messages)
    if len(urls) > server.settings.max_images:
        raise APIError(
            400,
            f"{len(urls)} images in the request; this server takes at most {server.settings.max_images}",
            "too_many_images",
        )
    images = [await server.load_image(url, f"image {k + 1}") for k, url in enumerate(urls)]
    return await server.prepare(prompt_text, images)


def _streamed(
    server: ModelServer, prepared, max_tokens: int, sampling: Sampling, cid: str, include_usage: bool
):
    loop = asyncio.get_running_loop()
    deltas: asyncio.Queue[str | None] = asyncio.Queue()
    # Submitted before the response starts, so a full queue is still a plain 503.
    future = server.batcher.submit(
        prepared, max_tokens, sampling, lambda text: loop.call_soon_threadsafe(deltas.put_nowait, text)
    )
    future.add_done_callback(lambda _: deltas.put_nowait(None))  # runs after every queued delta
    return StreamingResponse(
        _stream(future, deltas, cid, server.settings.model_name, include_usage),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
    )


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
