"""`serve` under load: 200 chat completions (one synthetic product photo each, 16 new tokens), 32 at a
time, against the tiny model on 127.0.0.1, with dynamic batching and with `--no-batching`.

The server runs in its own process (uvicorn, as `productvlm serve` runs it); the client is httpx's
async client in this process. Both modes get the same requests in the same order.
"""

from __future__ import annotations

import asyncio
import base64
import multiprocessing as mp
import socket
import statistics
import tempfile
import time
from pathlib import Path

REQUESTS = 200
CONCURRENCY = 32
MAX_TOKENS = 16
BATCH = 8


def _serve(model_dir: str, batch: int, port_out) -> None:
    import uvicorn

    from productvlm.serving.app import ServeSettings, app_from_folder

    settings = ServeSettings(max_batch_size=batch, batch_wait_ms=10.0 if batch > 1 else 0.0)
    app = app_from_folder(model_dir, settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port_out.put(sock.getsockname()[1])
    uvicorn.Server(uvicorn.Config(app, log_level="warning", backlog=1024)).run(sockets=[sock])


async def _load(url: str, bodies: list[dict]) -> tuple[float, list[float]]:
    import httpx

    limit = asyncio.Semaphore(CONCURRENCY)
    latencies: list[float] = []

    async with httpx.AsyncClient(
        base_url=url, timeout=300, limits=httpx.Limits(max_connections=CONCURRENCY)
    ) as c:
        for _ in range(20):  # wait until the server answers
            try:
                if (await c.get("/health")).status_code == 200:
                    break
            except httpx.TransportError:
                await asyncio.sleep(0.5)

        async def one(body: dict) -> None:
            async with limit:
                t0 = time.perf_counter()
                r = await c.post("/v1/chat/completions", json=body)
                r.raise_for_status()
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*[one(b) for b in bodies[:CONCURRENCY]])  # warm-up
        latencies.clear()
        t0 = time.perf_counter()
        await asyncio.gather(*[one(b) for b in bodies])
        return time.perf_counter() - t0, latencies


def _measure(model_dir: Path, batch: int, bodies: list[dict]) -> tuple[float, float, float]:
    """(requests/s, p50 s, p99 s) with a server in its own process."""
    ctx = mp.get_context("spawn")
    port_q = ctx.Queue()
    server = ctx.Process(target=_serve, args=(str(model_dir), batch, port_q), daemon=True)
    server.start()
    try:
        port = port_q.get(timeout=120)
        seconds, lat = asyncio.run(_load(f"http://127.0.0.1:{port}", bodies))
    finally:
        server.terminate()
        server.join(10)
        port_q.close()
    q = statistics.quantiles(lat, n=100)
    return len(bodies) / seconds, q[49], q[98]


def run() -> list[dict]:
    from productvlm.data.synth import make_product
    from productvlm.models.phi3v.presets import init_model

    photos = [make_product(0, i, 80_000_000 + i)[1] for i in range(50)]
    bodies = [
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image_url",
                            "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(p).decode()},
                        },
                        {"type": "text", "text": "What is shown in this image?"},
                    ],
                }
            ],
            "max_tokens": MAX_TOKENS,
        }
        for p in (photos[i % len(photos)] for i in range(REQUESTS))
    ]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = init_model("tiny", Path(tmp) / "tiny", seed=0)
        on = _measure(model_dir, BATCH, bodies)
        off = _measure(model_dir, 1, bodies)
    notes = (
        f"{REQUESTS} chat completions, {CONCURRENCY} concurrent, 1 photo + {MAX_TOKENS} new tokens each, tiny model, "
        f"CPU; batching p50/p99 {on[1]:.2f}/{on[2]:.2f} s, --no-batching p50/p99 {off[1]:.2f}/{off[2]:.2f} s"
    )
    return [
        {
            "name": f"serve: throughput, dynamic batching (max {BATCH}, 10 ms window)",
            "value": on[0],
            "unit": "requests/s",
            "baseline": "--no-batching",
            "baseline_value": off[0],
            "ratio": on[0] / off[0],
            "aim": ">= 2x",
            "notes": notes,
        },
        {
            "name": "serve: p50 latency, dynamic batching",
            "value": on[1],
            "unit": "s",
            "baseline": "--no-batching",
            "baseline_value": off[1],
            "ratio": off[1] / on[1],
            "aim": "lower (ratio = baseline / value)",
            "notes": f"{CONCURRENCY} concurrent clients",
        },
        {
            "name": "serve: p99 latency, dynamic batching",
            "value": on[2],
            "unit": "s",
            "baseline": "--no-batching",
            "baseline_value": off[2],
            "ratio": off[2] / on[2],
            "aim": "lower (ratio = baseline / value)",
            "notes": f"{CONCURRENCY} concurrent clients",
        },
    ]


if __name__ == "__main__":
    import json

    for row in run():
        print(json.dumps(row))
