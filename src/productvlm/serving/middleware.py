"""Pure ASGI middleware (not Starlette's BaseHTTPMiddleware, which buffers around streamed responses): the
`HTTPMiddleware` base of the API key check, the metrics and `BodyLimitMiddleware` (413 over the body limit)."""

from __future__ import annotations

from productvlm.serving.errors import APIError, error_response


class HTTPMiddleware:
    """Hands HTTP requests to `handle`; anything else (the lifespan) passes straight to the app."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        return await self.handle(scope, receive, send)  # a subclass's


class BodyLimitMiddleware(HTTPMiddleware):
    """413 for bodies over `max_bytes`: by Content-Length up front, else while the body streams in."""

    def __init__(self, app, max_bytes: int):
        super().__init__(app)
        self.max_bytes = max_bytes

    async def handle(self, scope, receive, send):
        too_large = APIError(
            413, f"request body over the limit of {self.max_bytes:,} bytes", "body_too_large"
        )
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await error_response(413, too_large.message, too_large.code)(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise too_large
            return message

        await self.app(scope, limited_receive, send)
