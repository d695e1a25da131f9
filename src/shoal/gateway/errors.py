"""One place that turns every failure into the OpenAI error shape with the right status (the
Ollama API's paths, /api/..., get Ollama's shape: {"error": "message"}).

Shoal's own errors, bad input and HTTP errors are handled here; an exception nothing expected is
caught by middleware.UnexpectedErrors (a 500, logged once, the connection kept)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from shoal.errors import InsufficientMemory, ModelUnavailable, ShoalError
from shoal.gateway.middleware import error_body


def error_response(
    status: int,
    message: str,
    type_: str,
    code: str | None = None,
    headers: dict[str, str] | None = None,
    details: dict[str, object] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(message, type_, code, details), status_code=status, headers=headers)


OLLAMA_PREFIX = "/api/"


def _shaped(
    path: str,
    status: int,
    message: str,
    type_: str,
    code: str | None = None,
    headers: dict[str, str] | None = None,
    details: dict[str, object] | None = None,
) -> JSONResponse:
    if path.startswith(OLLAMA_PREFIX):
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    return error_response(status, message, type_, code, headers, details)


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            return f"request body is not valid JSON: {error.get('ctx', {}).get('error', 'parse error')}"
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {error.get('msg')}")
    return "invalid request: " + "; ".join(parts)


def response_for(path: str, exc: Exception) -> JSONResponse:
    """The answer to a ShoalError, a RequestValidationError or an HTTPException raised while
    serving `path` (anything else is re-raised, for middleware.UnexpectedErrors)."""
    if isinstance(exc, ShoalError):
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, ModelUnavailable) else {}
        if exc.replica is not None:
            headers["x-shoal-replica"] = str(exc.replica)
        details = exc.details if isinstance(exc, InsufficientMemory) else None
        return _shaped(path, exc.status, exc.message, exc.type, exc.code, headers, details)
    if isinstance(exc, RequestValidationError):
        return _shaped(path, 400, _describe_validation(exc), "invalid_request_error", "invalid_request")
    if isinstance(exc, HTTPException):
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return _shaped(path, exc.status_code, str(exc.detail), type_, None, dict(exc.headers or {}))
    raise exc


def install(app: FastAPI) -> None:
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        return response_for(request.url.path, exc)

    for kind in (ShoalError, RequestValidationError, HTTPException):
        app.add_exception_handler(kind, handle)
