"""OpenAI-style errors: every bad request gets `{"error": {"message", "type", "code", "param"}}`."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    503: "server_overloaded",
}


class APIError(StarletteHTTPException):
    """A 4xx/5xx answer. An HTTPException, so FastAPI passes it through unchanged even when it is
    raised while the body is being read (the body-size limit)."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(status_code=status, detail=message)
        self.status, self.message, self.code, self.param = status, message, code, param


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "code": code, "param": param}}


def error_response(
    status: int, message: str, code: str | None = None, param: str | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            return error_response(400, f"body is not valid JSON: {first.get('msg', '')}", "invalid_json")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(
            400, f"{where or 'body'}: {first.get('msg', 'invalid')}", "invalid_value", where
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if isinstance(e, APIError):
            return error_response(e.status, e.message, e.code, e.param)
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(e).__name__}", "internal_error")
