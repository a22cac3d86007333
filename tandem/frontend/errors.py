"""Every error the frontend returns, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

User-visible errors are `tandem.protocol.errors.TandemError`s; their `http_status` is the status here.
`type` follows OpenAI: "invalid_request_error" for 4xx, "server_error" otherwise; `code` is the
error's own code ("model_not_found", "overloaded", ...). 503s carry a Retry-After header; 413s
close the connection.
"""

from __future__ import annotations

import logging

import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from tandem.protocol.errors import InvalidRequestError, TandemError
from tandem.protocol.openai import ErrorBody, ErrorResponse

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
"""Seconds a client should wait before retrying a 503 (no live worker / overloaded)."""

_encode = msgspec.json.Encoder().encode


class FieldError(InvalidRequestError):
    """An invalid request field; `param` names it in the error object."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def error_object(exc: TandemError) -> ErrorBody:
    status = exc.http_status
    kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
    return ErrorBody(
        message=str(exc) or exc.code, type=kind, param=getattr(exc, "param", None), code=exc.code
    )


def error_bytes(exc: TandemError) -> bytes:
    return _encode(ErrorResponse(error=error_object(exc)))


def error_response(exc: TandemError) -> Response:
    headers = None
    if exc.http_status == 503:
        headers = {"Retry-After": str(RETRY_AFTER_S)}
    elif exc.http_status == 413:  # the body was not read: close rather than parse the rest of it
        headers = {"connection": "close"}
    return Response(
        error_bytes(exc), status_code=exc.http_status, headers=headers, media_type="application/json"
    )


def _plain(status: int, message: str, code: str) -> Response:
    err = TandemError(message)
    err.http_status = status
    err.code = code
    return error_response(err)


def install_error_handlers(app: FastAPI) -> None:
    """Route every framework error (unknown path, bad method, validation, crash) to OpenAI shape."""

    async def on_tandem(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, TandemError)
        return error_response(exc)

    async def on_http(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = "not_found" if exc.status_code == 404 else "http_error"
        return _plain(exc.status_code, str(exc.detail), code)

    async def on_validation(_: Request, exc: Exception) -> Response:
        return _plain(400, f"invalid request: {exc}", "invalid_request_error")

    async def on_crash(_: Request, exc: Exception) -> Response:
        log.exception("unhandled error in the frontend", exc_info=exc)
        return _plain(500, f"internal error: {type(exc).__name__}", "internal_error")

    app.add_exception_handler(TandemError, on_tandem)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(Exception, on_crash)
