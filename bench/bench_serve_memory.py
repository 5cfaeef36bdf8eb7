"""`serve` memory over a long run: 2,000 chat completions with photos of varying sizes (64 sizes, 160 to
1,600 px a side, so the crop grid, the image-token count and every tensor's size vary), 16 at a time,
against the tiny preset model on 127.0.0.1. The server's resident memory (VmRSS) is read after a
400-request warm-up and after every 400 requests from then on.

Ours: `productvlm serve` as users run it (its allocator settings). Baseline: the same app under uvicorn
started without them (as bench_serve starts it), with glibc malloc's defaults.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REQUESTS = 2000
WARMUP = 400
EVERY = 400
CONCURRENCY = 16
MAX_TOKENS = 8
RISE_BOUND_MB = 32.0  # the most RSS may rise above its post-warm-up value (tests/test_serve_memory.py)

BASELINE_SERVER = """
import sys, uvicorn
from productvlm.serving.app import ServeSettings, app_from_folder
app = app_from_folder(sys.argv[1], ServeSettings())
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


def photos(n: int = 64, seed: int = 0) -> list[bytes]:
    """`n` product photos, each at its own size (160..1,600 px a side, any aspect)."""
    from PIL import Image

    from productvlm.data.synth import make_product

    rng = random.Random(seed)
    out = []
    for i in range(n):
        image = Image.open(io.BytesIO(make_product(0, i, 80_000_000 + i)[1])).convert("RGB")
        image = image.resize((rng.randint(160, 1600), rng.randint(160, 1600)))
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def bodies(n: int) -> list[dict]:
    urls = ["data:image/jpeg;base64," + base64.b64encode(p).decode() for p in photos()]
    return [
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": urls[i % len(urls)]}},
                        {"type": "text", "text": "What is shown in this image?"},
                    ],
                }
            ],
            "max_tokens": MAX_TOKENS,
        }
        for i in range(n)
    ]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _load(url: str, requests: list[dict], server: subprocess.Popen) -> tuple[list[float], float]:
    """Send the requests (CONCURRENCY at a time) once the server answers: (RSS after every EVERY
    requests, seconds from the first request to the last answer)."""
    import httpx

    limit = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(
        base_url=url, timeout=300, limits=httpx.Limits(max_connections=CONCURRENCY)
    ) as c:
        while True:  # wait until the server answers (it loads the model first)
            if server.poll() is not None:
                raise RuntimeError(f"the server exited with code {server.returncode} before answering")
            try:
                if (await c.get("/health")).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)

        async def one(body: dict) -> None:
            async with limit:
                r = await c.post("/v1/chat/completions", json=body)
                r.raise_for_status()

        samples, t0 = [], time.perf_counter()
        for start in range(0, len(requests), EVERY):
            await asyncio.gather(*[one(b) for b in requests[start : start + EVERY]])
            samples.append(rss_mb(server.pid))
        return samples, time.perf_counter() - t0


def measure(command: list[str], requests: list[dict], env: dict | None = None) -> tuple[list[float], float]:
    """(RSS in MB after each EVERY requests, seconds) for a server started by `command` (+ the port)."""
    port = free_port()
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(
            [*command, str(port)], env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=log
        )
        try:
            return asyncio.run(_load(f"http://127.0.0.1:{port}", requests, server))
        except RuntimeError as e:
            log.seek(0)
            raise RuntimeError(f"{e}: {log.read().decode(errors='replace')[-2000:]}") from None
        finally:
            server.terminate()
            server.wait(30)


def growth_per_400(samples: list[float]) -> float:
    """Mean RSS growth per EVERY requests after the warm-up (the first sample)."""
    return (samples[-1] - samples[0]) / (len(samples) - 1)


def rise(samples: list[float]) -> float:
    """How far RSS rose above its post-warm-up value (the first sample), at its highest."""
    return max(samples[1:]) - samples[0]


def ours_command(model_dir: Path) -> list[str]:
    return [sys.executable, "-m", "productvlm", "serve", "--model", str(model_dir), "--port"]


def baseline_command(model_dir: Path) -> list[str]:
    return [sys.executable, "-c", BASELINE_SERVER, str(model_dir)]


def run() -> list[dict]:
    from productvlm.models.phi3v.presets import init_model

    requests = bodies(REQUESTS)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = init_model("tiny", Path(tmp) / "tiny", seed=0)
        ours, ours_s = measure(ours_command(model_dir), requests)
        base, base_s = measure(baseline_command(model_dir), requests)
    rss = lambda xs: ", ".join(f"{x:.0f}" for x in xs)  # noqa: E731
    notes = (
        f"{REQUESTS} chat completions, {CONCURRENCY} concurrent, photos of 64 sizes, tiny model, num_crops 4; "
        f"RSS MB at requests {', '.join(str(WARMUP + i * EVERY) for i in range(len(ours)))}: "
        f"ours {rss(ours)}, baseline {rss(base)}; growth per 400 after warm-up: ours "
        f"{growth_per_400(ours):+.1f} MB, baseline {growth_per_400(base):+.1f} MB"
    )
    return [
        {
            "name": "serve: RSS rise above its post-warm-up value over 1,600 requests of varying photo sizes",
            "value": max(rise(ours), 0.0),
            "unit": "MB",
            "baseline": "glibc malloc defaults",
            "baseline_value": rise(base) if rise(base) > 0 else None,
            "ratio": rise(ours) / rise(base) if rise(base) > 0 and rise(ours) > 0 else None,
            "aim": f"<= {RISE_BOUND_MB:.0f} MB",
            "notes": notes,
        },
        {
            "name": "serve: RSS after the warm-up (400 requests)",
            "value": ours[0],
            "unit": "MB",
            "baseline": "glibc malloc defaults",
            "baseline_value": base[0],
            "ratio": ours[0] / base[0],
            "aim": "lower",
            "notes": f"after {REQUESTS}: ours {ours[-1]:.0f} MB, baseline {base[-1]:.0f} MB",
        },
        {
            "name": "serve: throughput over the soak, allocator settings on",
            "value": REQUESTS / ours_s,
            "unit": "requests/s",
            "baseline": "glibc malloc defaults",
            "baseline_value": REQUESTS / base_s,
            "ratio": base_s / ours_s,
            "aim": "no slower (the fixed mmap threshold maps blocks over 1 MiB on their own)",
            "notes": "same requests, same order, the two servers one after the other",
        },
    ]


if __name__ == "__main__":
    import json

    for row in run():
        print(json.dumps(row))
