"""`--api-key`: with a key set, `/v1/*` (and `/metrics` when asked) need `Authorization: Bearer <key>`,
compared in constant time; anything else gets OpenAI's 401 error body. `/` and `/health` stay open
(the page asks for the key and sends it itself)."""

from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse

from productvlm.serving.errors import error_body
from productvlm.serving.middleware import HTTPMiddleware

API_KEY_ENV = "PRODUCTVLM_API_KEY"


def needs_key(path: str, protect_metrics: bool) -> bool:
    return path.startswith("/v1/") or path == "/v1" or (protect_metrics and path == "/metrics")


def bearer_token(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive), or None."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" and token.strip() else None
    return None


class APIKeyMiddleware(HTTPMiddleware):
    """Pure ASGI, so a refused request never reaches the body-size limit, the app or the model."""

    def __init__(self, app, api_key: str, protect_metrics: bool = False):
        if not api_key:
            raise ValueError("api_key is empty")
        super().__init__(app)
        self.key, self.protect_metrics = api_key.encode(), protect_metrics

    async def handle(self, scope, receive, send):
        if not needs_key(scope["path"], self.protect_metrics):
            return await self.app(scope, receive, send)
        token = bearer_token(scope["headers"])
        if token is not None and hmac.compare_digest(token, self.key):
            return await self.app(scope, receive, send)
        message = (
            "You didn't provide an API key: send it in an Authorization header using Bearer auth "
            "(Authorization: Bearer YOUR_KEY)"
            if token is None
            else "Incorrect API key provided"
        )
        response = JSONResponse(
            error_body(401, message, "invalid_api_key"),
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)


__all__ = ["APIKeyMiddleware", "API_KEY_ENV", "bearer_token", "needs_key"]
