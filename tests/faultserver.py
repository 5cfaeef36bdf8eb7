"""A fault-injecting HTTP server on 127.0.0.1 for the import tests (a real server: no mocks, no network).

`ImageServer(images)` serves the bytes in `images` (name -> bytes) under /MODE/NAME, where MODE picks
a behaviour; it runs aiohttp in a background thread and records every request's path and time.

    /img/NAME        the image                          /slow/NAME       the image after 0.15 s
    /stall/NAME      nothing for 3 s, then the image    /stallbody/NAME  half the body, then 3 s of silence
    /text/NAME       200 with an HTML page              /trunc/NAME      the first 60% of the image
    /flaky/NAME      500 once, then the image           /busy/NAME       429 + Retry-After: 1 once, then 200
    /down/NAME       503 every time                     /empty/NAME      200 with an empty body
    /reset/NAME      connection reset (RST) every time  /resetbody/NAME  half the body, then a reset
    /resetonce/NAME  a reset once, then the image       /loop/NAME       302 to itself, forever
    /moved/NAME      302 to /img/NAME                   /tofile/NAME     302 to file:///etc/passwd
    /wrongtype/NAME  the image labelled text/plain      /chunked/NAME    the image, no Content-Length
    /is/image/BRAND/NAME  the image, at a URL without a file extension (as Burberry's image server)
    anything else, or an unknown NAME: 404
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections import Counter, defaultdict

from aiohttp import web

STALL_SECONDS = 3.0


class ImageServer:
    def __init__(self, images: dict[str, bytes]):
        self.images = images
        self.counts: Counter[str] = Counter()
        self.times: dict[str, list[float]] = defaultdict(list)
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_get("/{mode}/{name}", self._handle)
        app.router.add_get("/is/image/{brand}/{name}", self._handle)  # Burberry's: no file extension
        self.runner = web.AppRunner(app, shutdown_timeout=0.5, handler_cancellation=True)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self._ready.set()
        self.loop.run_forever()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        mode, name = request.match_info.get("mode", "img"), request.match_info["name"]
        self.counts[request.path] += 1
        self.times[request.path].append(time.monotonic())
        first = self.counts[request.path] == 1
        body = self.images.get(name)
        if body is None:
            return web.Response(status=404, text="not found")
        ctype = "image/png" if body.startswith(b"\x89PNG") else "image/jpeg"
        if mode == "slow":
            await asyncio.sleep(0.15)
        elif mode == "stall":
            await asyncio.sleep(STALL_SECONDS)
        elif mode == "text":
            return web.Response(text="<html>sorry</html>", content_type="text/html")
        elif mode == "trunc":
            body = body[: int(len(body) * 0.6)]
        elif mode == "flaky" and first:
            return web.Response(status=500, text="oops")
        elif mode == "busy" and first:
            return web.Response(status=429, headers={"Retry-After": "1"})
        elif mode == "down":
            return web.Response(status=503, text="maintenance")
        elif mode == "empty":
            return web.Response(body=b"", content_type=ctype)
        elif mode == "reset" or (mode == "resetonce" and first):
            return _reset(request)
        elif mode in ("stallbody", "resetbody"):
            return await _half_then(request, body, ctype, reset=mode == "resetbody")
        elif mode == "loop":
            raise web.HTTPFound(request.path)
        elif mode == "moved":
            raise web.HTTPFound(f"/img/{name}")
        elif mode == "tofile":
            raise web.HTTPFound("file:///etc/passwd")
        elif mode == "wrongtype":
            ctype = "text/plain"
        elif mode == "chunked":
            resp = web.StreamResponse(headers={"Content-Type": ctype})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for i in range(0, len(body), 4096):
                await resp.write(body[i : i + 4096])
            await resp.write_eof()
            return resp
        elif mode not in ("img", "flaky", "busy", "resetonce"):
            return web.Response(status=404)
        return web.Response(body=body, content_type=ctype)

    def __enter__(self) -> ImageServer:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            await self.runner.cleanup()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def _abort_with_rst(request: web.Request) -> None:
    """Close the connection with a TCP reset (SO_LINGER 0), as a crashing proxy does."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _reset(request: web.Request) -> web.StreamResponse:
    _abort_with_rst(request)
    raise asyncio.CancelledError  # nothing more to send on a dead connection


async def _half_then(request: web.Request, body: bytes, ctype: str, reset: bool) -> web.StreamResponse:
    """Headers announcing the whole body, half of it, then a reset or a long silence."""
    resp = web.StreamResponse(headers={"Content-Type": ctype})
    resp.content_length = len(body)
    await resp.prepare(request)
    await resp.write(body[: len(body) // 2])
    if reset:
        await asyncio.sleep(0.05)  # let the half reach the client first
        _abort_with_rst(request)
        raise asyncio.CancelledError
    await asyncio.sleep(STALL_SECONDS)
    await resp.write(body[len(body) // 2 :])
    return resp
