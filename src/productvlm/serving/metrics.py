"""Prometheus metrics (one registry per app, so several apps can live in one process) and the
ASGI middleware that counts every request by endpoint and status and times it to its last byte."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from productvlm.serving.middleware import HTTPMiddleware

ENDPOINTS = {"/", "/health", "/metrics", "/v1/chat/completions", "/v1/catalog", "/v1/models"}


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "productvlm_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "productvlm_request_seconds",
            "Request latency, to the last byte of the response",
            ["endpoint"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "productvlm_batch_size",
            "Requests per model.generate call",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "productvlm_queue_depth", "Requests waiting for the model", registry=self.registry
        )


class MetricsMiddleware(HTTPMiddleware):
    """Pure ASGI, so streaming responses are timed to their end."""

    def __init__(self, app, metrics: Metrics):
        super().__init__(app)
        self.metrics = metrics

    async def handle(self, scope, receive, send):
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status = {"code": 500}
        start = time.perf_counter()

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
