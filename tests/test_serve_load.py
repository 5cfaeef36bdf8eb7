"""A burst of 500 requests, 64 at a time, against the real server: every request is answered (200, or
503 from the full queue), the counts add up in /metrics, and the server is healthy afterwards."""

from __future__ import annotations

import asyncio
import collections

import httpx
import pytest

from productvlm.models.loading import load_pretrained
from productvlm.prompting.settings import load_prompt_settings
from productvlm.serving.app import ServeSettings, create_app
from serve_helpers import data_url, image_message, product_jpeg, running_server

REQUESTS, CONCURRENCY = 500, 64


@pytest.mark.slow
def test_burst_of_500_requests_all_answered(tiny_model_dir):
    model, processor = load_pretrained(tiny_model_dir)
    # A queue smaller than the concurrency, so that the 503 path is part of the burst.
    settings = ServeSettings(max_queue=40, max_batch_size=8)
    app = create_app(model, processor, load_prompt_settings(tiny_model_dir), settings)
    bodies = [
        {"messages": image_message(data_url(product_jpeg(i % 8))), "max_tokens": 4} for i in range(REQUESTS)
    ]

    async def burst(url: str) -> list[httpx.Response]:
        limit = asyncio.Semaphore(CONCURRENCY)
        async with httpx.AsyncClient(
            base_url=url, timeout=120, limits=httpx.Limits(max_connections=CONCURRENCY)
        ) as c:

            async def one(body):
                async with limit:
                    return await c.post("/v1/chat/completions", json=body)

            return await asyncio.gather(*[one(b) for b in bodies])

    with running_server(app) as url:
        responses = asyncio.run(burst(url))
        metrics = httpx.get(f"{url}/metrics").text
        health = httpx.get(f"{url}/health")
    statuses = collections.Counter(r.status_code for r in responses)
    assert len(responses) == REQUESTS and set(statuses) <= {200, 503}, statuses
    assert statuses[200] > 0
    for r in responses:
        body = r.json()
        assert (
            body["error"]["code"] == "queue_full" if r.status_code == 503 else body["choices"][0]["message"]
        )
    for status, n in statuses.items():
        line = f'productvlm_requests_total{{endpoint="/v1/chat/completions",status="{status}"}} {float(n)}'
        assert line in metrics
    assert health.status_code == 200 and health.json()["queue_depth"] == 0
