"""The runner's internal HTTP API (Starlette, on a Unix socket): health plus the OpenAI routes its
engine supports. Bodies arrive validated by the gateway; answers are OpenAI-shaped JSON or SSE."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from shoal.engines import tools
from shoal.engines.base import Engine
from shoal.errors import ShoalError


def _json(content: Any, status: int = 200) -> Response:
    # orjson: several times faster than json for float vectors, and takes numpy arrays as they are
    return Response(
        orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), status, media_type="application/json"
    )


def _error(status: int, message: str, type_: str, code: str | None) -> Response:
    return _json({"error": {"message": message, "type": type_, "code": code, "param": None}}, status)


def _sse_line(chunk: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(chunk, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n\n"


async def _sse(chunks: AsyncIterator[dict[str, Any]], first: dict[str, Any] | None) -> AsyncIterator[bytes]:
    if first is not None:
        yield _sse_line(first)
    try:
        async for chunk in chunks:
            yield _sse_line(chunk)
    except ShoalError as exc:  # headers are gone: report in-band, as OpenAI does
        error = {"message": exc.message, "type": exc.type, "code": exc.code, "param": None}
        yield _sse_line({"error": error})
    yield b"data: [DONE]\n\n"


def _guarded(handler: Callable[[Engine, Request], Awaitable[Response]], engine: Engine) -> Any:
    """Every engine failure becomes an OpenAI-shaped error: its own status for ShoalErrors, 500 for bugs."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(engine, request)
        except ShoalError as exc:
            return _error(exc.status, exc.message, exc.type, exc.code)
        except orjson.JSONDecodeError as exc:  # the gateway validates bodies first; this is a backstop
            message = f"the body is not JSON the runner can read: {exc}"
            return _error(400, message, "invalid_request_error", None)
        except Exception as exc:  # an engine bug: still answer in the OpenAI shape
            return _error(500, f"{engine.name} failed: {type(exc).__name__}: {exc}", "server_error", None)

    return endpoint


Call = Callable[[Engine, dict[str, Any]], Awaitable[dict[str, Any]]]
Stream = Callable[[Engine, dict[str, Any]], AsyncIterator[dict[str, Any]]]


def _method(name: str) -> Any:
    """The engine's own method of that name, as a call of (engine, body)."""
    return lambda engine, body: getattr(engine, name)(body)


def _openai(call: Call, stream: Stream | None) -> Callable[[Engine, Request], Awaitable[Response]]:
    async def handler(engine: Engine, request: Request) -> Response:
        body = orjson.loads(await request.body())
        if body.get("stream") and stream is not None:
            chunks = stream(engine, body)
            # Pull the first chunk before answering, so an error still gets a real status.
            first = await anext(chunks, None)
            return StreamingResponse(_sse(chunks, first), media_type="text/event-stream")
        return _json(await call(engine, body))

    return handler


def _params(request: Request) -> dict[str, Any]:
    """Binary uploads (audio, images) come as the raw body; their fields in a JSON header."""
    raw = request.headers.get("x-shoal-params", "{}")
    params = orjson.loads(raw)
    return params if isinstance(params, dict) else {}


async def _transcribe(engine: Engine, request: Request) -> Response:
    from shoal.runners.transcripts import render

    params = _params(request)
    result = await engine.transcribe(await request.body(), params)
    content, media_type = render(result, params.get("response_format", "json"))
    return Response(content, media_type=media_type)


async def _speech(engine: Engine, request: Request) -> Response:
    from shoal.engines.audio_encode import MEDIA_TYPES, AudioEncoder, encode_whole

    body = orjson.loads(await request.body())
    fmt = body.get("response_format", "mp3")
    speech = await engine.speech(body)
    if body.get("stream"):
        encoder = AudioEncoder(fmt, speech.sample_rate)

        async def audio() -> AsyncIterator[bytes]:
            try:
                async for pcm in speech.chunks:
                    if data := encoder.feed(pcm):
                        yield data
                yield encoder.finish()
            finally:
                await speech.chunks.aclose()  # type: ignore[attr-defined]  # the client left: stop synthesis

        return StreamingResponse(audio(), media_type=MEDIA_TYPES[fmt])
    pcm = b"".join([chunk async for chunk in speech.chunks])
    return Response(encode_whole(fmt, speech.sample_rate, pcm), media_type=MEDIA_TYPES[fmt])


async def _voices(engine: Engine, _: Request) -> Response:
    return _json({"voices": engine.voices()})


async def _ocr(engine: Engine, request: Request) -> Response:
    return _json(await engine.ocr(await request.body(), _params(request)))


async def _park(engine: Engine, _: Request) -> Response:
    """The weights to host RAM, the GPU memory given back; the process and its sockets stay."""
    if not engine.can_park:
        return _error(
            409, f"{engine.name} cannot park; stop the runner instead", "invalid_request_error", None
        )
    started = time.monotonic()
    await asyncio.to_thread(engine.park)
    return _json({"parked": True, "seconds": time.monotonic() - started})


async def _wake(engine: Engine, _: Request) -> Response:
    """Back onto the device it left (a wake on another GPU is a new runner there: see
    docs/gpu-sharing.md, "Park and wake")."""
    if not engine.can_park:
        return _error(409, f"{engine.name} cannot park", "invalid_request_error", None)
    started = time.monotonic()
    await asyncio.to_thread(engine.wake)
    return _json({"parked": False, "seconds": time.monotonic() - started})


async def warm_up(engine: Engine, timings: dict[str, float], profile: bool = False) -> None:
    """The engine's one real inference (Engine.warm_up; with `profile`, Engine.profile_run at the
    launch's largest batch × context), timed. A failure is logged, not fatal: the runner still
    serves, and the first request meets the same error with its own answer."""
    started = time.monotonic()
    try:
        if profile:
            await engine.profile_run()
            ability: str | None = "profile_run"
        else:
            ability = await engine.warm_up()
    except Exception:
        print(f"shoal runner: {engine.name} warm-up failed; serving anyway", file=sys.stderr)
        traceback.print_exc()
        timings["warm_up_failed"] = 1
    else:
        if ability is None:
            print(f"shoal runner: {engine.name} has nothing to warm up with", file=sys.stderr)
            timings["warm_up_skipped"] = 1
        else:
            timings["warm_ups"] = timings.get("warm_ups", 0) + 1
    timings["warm_up_seconds"] = time.monotonic() - started
    if profile and "warm_up_failed" not in timings:
        timings["profile_runs"] = 1


def _threads() -> dict[str, float]:
    """The cores this runner may use and, when it runs torch, torch's intra-op thread count."""
    counts: dict[str, float] = {"cpus": len(os.sched_getaffinity(0))}
    if "torch" in sys.modules:
        counts["torch_threads"] = sys.modules["torch"].get_num_threads()
    return counts


async def _memory_fraction(engine: Engine, request: Request) -> Response:
    """POST {"fraction": f, "bytes": n}: the torch memory cap follows the reservation once a profile
    set it; `bytes` (the reservation) is taken as a share of the CUDA total this runner sees, and
    `fraction` (of the GPU's NVML total) where it is absent."""
    body = orjson.loads(await request.body())
    fraction = body.get("fraction") if isinstance(body, dict) else None
    reserved = body.get("bytes") if isinstance(body, dict) else None
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
        return _error(
            400, f"fraction must be a number in (0, 1], not {fraction!r}", "invalid_request_error", None
        )
    if reserved is not None and (isinstance(reserved, bool) or not isinstance(reserved, int) or reserved < 1):
        return _error(
            400, f"bytes must be a positive integer, not {reserved!r}", "invalid_request_error", None
        )
    return _json({"applied": engine.set_memory_cap(reserved, float(fraction))})


def build_runner_app(
    engine: Engine, timings: dict[str, float] | None = None, warm: bool = True, profile: bool = False
) -> Starlette:
    """The runner's routes. With `warm`, the engine's warm-up (its profile run with `profile`) runs in
    the app's startup, which uvicorn completes before it listens: the gateway sees /health only once
    the model has answered once, so the peak it then reads includes the warm-up.
    `timings` (the runner's load times) are reported with the engine's counters on /metrics."""
    stats: dict[str, float] = timings if timings is not None else {}

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        if warm:
            await warm_up(engine, stats, profile)
        yield

    async def health(_: Request) -> Response:
        return _json(
            {
                "status": "ready",
                "pid": os.getpid(),
                "engine": engine.name,
                "prewarmed": bool(stats.get("prewarmed")),  # born from a warm spare
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            }
        )

    async def metrics(engine: Engine, _: Request) -> Response:
        return _json({**engine.metrics(), **{f"runner_{k}": v for k, v in {**stats, **_threads()}.items()}})

    post = ["POST"]
    return Starlette(
        lifespan=lifespan,
        routes=[
            Route("/health", health),
            Route("/metrics", _guarded(metrics, engine)),
            Route("/park", _guarded(_park, engine), methods=post),
            Route("/wake", _guarded(_wake, engine), methods=post),
            Route("/memory_fraction", _guarded(_memory_fraction, engine), methods=post),
            Route(
                "/v1/chat/completions", _guarded(_openai(tools.chat, tools.chat_stream), engine), methods=post
            ),
            Route(
                "/v1/completions",
                _guarded(_openai(_method("complete"), _method("complete_stream")), engine),
                methods=post,
            ),
            Route("/v1/embeddings", _guarded(_openai(_method("embed"), None), engine), methods=post),
            Route("/v1/rerank", _guarded(_openai(_method("rerank"), None), engine), methods=post),
            Route("/v1/audio/transcriptions", _guarded(_transcribe, engine), methods=post),
            Route("/v1/audio/translations", _guarded(_transcribe, engine), methods=post),
            Route("/v1/audio/speech", _guarded(_speech, engine), methods=post),
            Route("/v1/audio/voices", _guarded(_voices, engine)),
            Route("/v1/images/ocr", _guarded(_ocr, engine), methods=post),
            Route(
                "/v1/images/generations",
                _guarded(_openai(_method("generate_images"), None), engine),
                methods=post,
            ),
        ],
    )
