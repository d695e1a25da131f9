"""The runner's internal HTTP API (Starlette, on a Unix socket): health plus the OpenAI routes its
engine supports. Bodies arrive validated by the gateway; answers are OpenAI-shaped JSON or SSE."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from shoal.engines.base import Engine
from shoal.errors import ShoalError


def _json(content: Any, status: int = 200) -> Response:
    # orjson: several times faster than json for float vectors, and takes numpy arrays as they are
    return Response(
        orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), status, media_type="application/json"
    )


def _error(status: int, message: str, type_: str, code: str | None) -> Response:
    return _json({"error": {"message": message, "type": type_, "code": code}}, status)


def _sse_line(chunk: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(chunk, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n\n"


async def _sse(chunks: AsyncIterator[dict[str, Any]], first: dict[str, Any] | None) -> AsyncIterator[bytes]:
    if first is not None:
        yield _sse_line(first)
    try:
        async for chunk in chunks:
            yield _sse_line(chunk)
    except ShoalError as exc:  # headers are gone: report in-band, as OpenAI does
        yield _sse_line({"error": {"message": exc.message, "type": exc.type, "code": exc.code}})
    yield b"data: [DONE]\n\n"


def build_runner_app(engine: Engine) -> Starlette:
    async def health(_: Request) -> Response:
        return _json({"status": "ready", "pid": os.getpid(), "engine": engine.name})

    def route(call: Any, stream_call: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            body = orjson.loads(await request.body())
            try:
                if body.get("stream") and stream_call is not None:
                    chunks = stream_call(body)
                    # Pull the first chunk before answering, so an error still gets a real status.
                    first = await anext(chunks, None)
                    return StreamingResponse(_sse(chunks, first), media_type="text/event-stream")
                return _json(await call(body))
            except ShoalError as exc:
                return _error(exc.status, exc.message, exc.type, exc.code)
            except Exception as exc:  # an engine bug: still answer in the OpenAI shape
                return _error(500, f"{engine.name} failed: {type(exc).__name__}: {exc}", "server_error", None)

        return endpoint

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/chat/completions", route(engine.chat, engine.chat_stream), methods=["POST"]),
            Route("/v1/completions", route(engine.complete, engine.complete_stream), methods=["POST"]),
            Route("/v1/embeddings", route(engine.embed, None), methods=["POST"]),
        ]
    )
