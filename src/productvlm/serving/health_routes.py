"""What a monitor reads: `GET /health` (status, model, queue depth) and `GET /metrics` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from productvlm.serving.model_server import Server

router = APIRouter()


@router.get("/health")
async def health(server: Server) -> dict:
    return {"status": "ok", "model": server.settings.model_name, "queue_depth": server.batcher.queue.qsize()}


@router.get("/metrics")
async def metrics_endpoint(server: Server) -> Response:
    return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)
