"""Error answers: one JSON shape, ``{"error": "<message>"}``, for every refusal the server makes."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("blindnet.serve")

#: Status of a request whose client went away before sending its whole body (nobody receives it; it is counted).
CLIENT_CLOSED_REQUEST = 499


class HTTPError(Exception):
    """An error answer: status code, message, optional extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON error answer every endpoint and the middleware give."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _http_error(request: Request, exc: HTTPError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    # Same {"error": ...} shape as every other refusal (FastAPI's default is a 422 with "detail").
    problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())
    return error_response(400, f"invalid request parameters: {problems}")


async def _routing_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Unknown paths (404) and wrong methods (405, with its Allow header) in the same shape as every other error.
    if exc.status_code == 404:
        message = f"no endpoint {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return error_response(exc.status_code, message, dict(exc.headers or {}))


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("internal error on %s", request.url.path)
    return error_response(500, f"internal server error: {type(exc).__name__}: {exc}")


def install_error_handlers(app: FastAPI) -> None:
    """Answer :class:`HTTPError`, bad parameters, routing misses and crashes all in the JSON error shape."""
    # Starlette types every handler as taking any Exception; each of these is registered for its own class only.
    app.add_exception_handler(HTTPError, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _routing_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _internal_error)
