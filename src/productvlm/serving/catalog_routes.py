"""`POST /v1/catalog`: one uploaded product photo -> its catalog entry with per-field confidence."""

from __future__ import annotations

from fastapi import APIRouter, File, UploadFile
from starlette.concurrency import run_in_threadpool

from productvlm.serving.chat import catalog_body
from productvlm.serving.images import decode_image
from productvlm.serving.model_server import Server

router = APIRouter()


@router.post("/v1/catalog")
async def catalog(server: Server, file: UploadFile = File(..., description="A product photo")) -> dict:
    data = await file.read()
    image = await run_in_threadpool(decode_image, data, server.settings.images, f"upload {file.filename!r}")
    prepared = await server.prepare(server.photo_prompt, [image])
    done = await server.batcher.submit(prepared, server.settings.catalog_max_tokens, logprobs=0)
    return catalog_body(done, server.tokenizer, server.calibration)
