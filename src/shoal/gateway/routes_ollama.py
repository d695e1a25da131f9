"""The Ollama API on the same port (/api/...): parse, translate to the OpenAI body, run it through
the same model checks and proxy as /v1, translate the answer back. Errors come in Ollama's shape,
`{"error": "..."}` (gateway/errors.py picks it for /api/ paths; in a stream, as an NDJSON line).

`keep_alive` is Ollama's: `0` unloads the model once it has answered (it stays known and its next
request loads it again), any other value becomes the model's keep-alive (idle that long, it may be
evicted; negative: never), and a request without one puts back the launch's (docs/api-compat.md).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask

from shoal import __version__
from shoal.errors import ModelNotFound
from shoal.gateway import ollama_translate as tr
from shoal.gateway.routes_openai import (
    STREAM_HEADERS,
    body_schema,
    check_model,
    check_size,
    parse_body,
    record_tokens,
)
from shoal.gateway.upstream import runner_error, sse_chunks
from shoal.hub.names import is_hub_name
from shoal.protocol import ollama as protocol
from shoal.protocol.admin import PullRequest
from shoal.protocol.openai import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from shoal.services.hubs import pull_progress
from shoal.services.models import ModelService
from shoal.services.proxy import Forwarded, forward
from shoal.units import parse_duration

router = APIRouter(prefix="/api", tags=["ollama"])
NDJSON = "application/x-ndjson"


def _service(request: Request) -> ModelService:
    return request.app.state.models  # type: ignore[no-any-return]


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _runner_error(result: Forwarded) -> JSONResponse:
    error = runner_error(result)
    return _error(error.status, error.message)


def _openai(model: type[BaseModel], body: dict[str, Any]) -> BaseModel:
    """The translated body, held to the same bounds as a /v1 request."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from exc


async def _checked(request: Request, name: str, ability: str) -> tuple[ModelService, str, int]:
    """check_model for an Ollama name (autoloading it under --autoload): service, uid, ns spent loading."""
    uid, start = tr.model_uid(name), time.perf_counter_ns()
    service = await check_model(request, uid, ability, name if is_hub_name(name) else None)
    return service, uid, time.perf_counter_ns() - start


def _unloads(keep_alive: protocol.KeepAlive) -> bool:
    return keep_alive is not None and parse_duration(keep_alive) == 0


def _keep_alive(
    service: ModelService, uid: str, keep_alive: protocol.KeepAlive
) -> Callable[[], Coroutine[Any, Any, None]]:
    """Apply a request's keep_alive; returns what to do once the model has answered (unload it, for 0)."""
    service.set_keep_alive(uid, None if keep_alive is None else parse_duration(keep_alive))

    async def after() -> None:
        if _unloads(keep_alive):
            await service.unload(uid)

    return after


async def _unload_only(request: Request, name: str, chat: bool, stream: bool) -> Response:
    """An empty chat or prompt with keep_alive 0 (what `ollama stop` sends): unload, load nothing."""
    service = _service(request)
    await service.unload(service.get(tr.model_uid(name)).uid)
    return _answer(tr.loaded(name, chat, reason="unload"), stream)


async def _turn(
    request: Request,
    uid: str,
    name: str,
    path: str,
    body: BaseModel,
    chat: bool,
    stream: bool,
    times: tuple[int, int],
    keep_alive: protocol.KeepAlive,
) -> Response:
    """Forward (always streaming from the runner) and answer NDJSON lines or one whole JSON."""
    service = _service(request)
    check_size(service, uid, body)
    raw = body.model_dump_json(exclude_unset=True, by_alias=True).encode()
    after = _keep_alive(service, uid, keep_alive)
    turn = tr.Turn(name, chat, *times)  # before forward: the runner answers once it has a first token
    result = await forward(service, uid, path, raw, True)
    record_tokens(uid, result)
    if result.stream is None:  # the runner refused before answering
        return _runner_error(result)
    if not stream:
        return await _whole(result, turn, after)
    return StreamingResponse(
        _lines(result, turn, after, service),
        media_type=NDJSON,
        headers={**STREAM_HEADERS, "x-shoal-replica": str(result.replica)},
        background=BackgroundTask(result.close) if result.close else None,
    )


async def _whole(
    result: Forwarded, turn: tr.Turn, after: Callable[[], Coroutine[Any, Any, None]]
) -> Response:
    assert result.stream is not None
    try:
        async for chunk in sse_chunks(result.stream):
            turn.take(chunk)
    finally:
        if result.close:
            await result.close()
    await after()  # before the answer goes: a client that then asks /api/ps sees the model gone
    if turn.error is not None:
        return _error(turn.error_status, turn.error)
    return JSONResponse(turn.whole(), headers={"x-shoal-replica": str(result.replica)})


async def _lines(
    result: Forwarded, turn: tr.Turn, after: Callable[[], Coroutine[Any, Any, None]], service: ModelService
) -> AsyncIterator[bytes]:
    assert result.stream is not None
    read = False
    try:
        async for chunk in sse_chunks(result.stream):
            line = turn.take(chunk)
            if turn.error is not None:  # headers are gone: Ollama reports it in-band
                break
            if line is not None:
                yield orjson.dumps(line) + b"\n"
        read = True
    finally:  # also when the client left mid-stream: the runner stops generating
        if result.close:
            await result.close()
        if not read:  # the client left: keep_alive still applies, without holding up the close
            service.supervisor.spawn(after())
    await after()  # before the last line: a client that then asks /api/ps sees the model gone
    if turn.error is not None:
        yield orjson.dumps({"error": turn.error}) + b"\n"
        return
    if (calls := turn.calls_line()) is not None:
        yield orjson.dumps(calls) + b"\n"
    yield orjson.dumps(turn.last_line()) + b"\n"


def _loaded(name: str, chat: bool, stream: bool) -> Response:
    return _answer(tr.loaded(name, chat), stream)


def _answer(answer: dict[str, Any], stream: bool) -> Response:
    if stream:
        return Response(orjson.dumps(answer) + b"\n", media_type=NDJSON)
    return JSONResponse(answer)


@router.post("/chat", openapi_extra=body_schema(protocol.OllamaChatRequest))
async def chat(request: Request) -> Response:
    body, _ = await parse_body(request, protocol.OllamaChatRequest)
    started = time.perf_counter_ns()
    if not body.messages and _unloads(body.keep_alive):
        return await _unload_only(request, body.model, chat=True, stream=body.stream)
    service, uid, load_ns = await _checked(request, body.model, "chat")
    if not body.messages:
        _keep_alive(service, uid, body.keep_alive)
        return _loaded(body.model, chat=True, stream=body.stream)
    openai = _openai(ChatCompletionRequest, tr.chat_body(body, service.get(uid).engine))
    times = (started, load_ns)
    return await _turn(
        request, uid, body.model, "/v1/chat/completions", openai, True, body.stream, times, body.keep_alive
    )


def _generate_ability(service: ModelService, uid: str, raw: bool) -> str:
    """Through the chat template unless raw or the model has none (an unknown uid: checked next)."""
    try:
        abilities = service.get(uid).family.model_ability
    except ModelNotFound:
        return "generate" if raw else "chat"
    return "chat" if not raw and "chat" in abilities else "generate"


@router.post("/generate", openapi_extra=body_schema(protocol.OllamaGenerateRequest))
async def generate(request: Request) -> Response:
    body, _ = await parse_body(request, protocol.OllamaGenerateRequest)
    started = time.perf_counter_ns()
    if not body.prompt and _unloads(body.keep_alive):
        return await _unload_only(request, body.model, chat=False, stream=body.stream)
    ability = _generate_ability(_service(request), tr.model_uid(body.model), body.raw)
    service, uid, load_ns = await _checked(request, body.model, ability)
    if not body.prompt:
        _keep_alive(service, uid, body.keep_alive)
        return _loaded(body.model, chat=False, stream=body.stream)
    ability = _generate_ability(service, uid, body.raw)  # now that it runs (autoload)
    translated = tr.generate_body(body, service.get(uid).engine, templated=ability == "chat")
    if ability == "chat":
        openai = _openai(ChatCompletionRequest, translated)
        path = "/v1/chat/completions"
    else:
        openai = _openai(CompletionRequest, translated)
        path = "/v1/completions"
    times = (started, load_ns)
    return await _turn(request, uid, body.model, path, openai, False, body.stream, times, body.keep_alive)


async def _embed(
    request: Request, body: protocol.OllamaEmbedRequest | protocol.OllamaEmbeddingsRequest
) -> dict[str, Any] | JSONResponse:
    started = time.perf_counter_ns()
    service, uid, load_ns = await _checked(request, body.model, "embed")
    openai = _openai(EmbeddingRequest, tr.embed_body(body))
    check_size(service, uid, openai)
    raw = openai.model_dump_json(exclude_unset=True, by_alias=True).encode()
    after = _keep_alive(service, uid, body.keep_alive)
    result = await forward(service, uid, "/v1/embeddings", raw, False)
    await after()
    if result.status != 200:
        return _runner_error(result)
    answer = orjson.loads(result.body or b"{}")
    return tr.embed_answer(body.model, answer, time.perf_counter_ns() - started, load_ns)


@router.post("/embed", openapi_extra=body_schema(protocol.OllamaEmbedRequest))
async def embed(request: Request) -> Response:
    body, _ = await parse_body(request, protocol.OllamaEmbedRequest)
    answer = await _embed(request, body)
    if isinstance(answer, Response):
        return answer
    return Response(orjson.dumps(answer), media_type="application/json")


@router.post("/embeddings", openapi_extra=body_schema(protocol.OllamaEmbeddingsRequest))
async def embeddings(request: Request) -> Response:
    """The legacy route: one prompt, one `embedding` (an empty prompt only loads the model)."""
    body, _ = await parse_body(request, protocol.OllamaEmbeddingsRequest)
    if not body.prompt:
        await _checked(request, body.model, "embed")
        return JSONResponse({"embedding": []})
    answer = await _embed(request, body)
    if isinstance(answer, Response):
        return answer
    return Response(orjson.dumps({"embedding": answer["embeddings"][0]}), media_type="application/json")


@router.get("/tags")
async def tags(request: Request) -> dict[str, Any]:
    """The models Shoal runs (Ollama lists the ones downloaded)."""
    return {"models": [tr.tag(m) for m in _service(request).running() if m.status != "failed"]}


@router.get("/ps")
async def ps(request: Request) -> dict[str, Any]:
    """The models that hold memory now; size and size_vram from the ledger's reservations."""
    now, monotonic = datetime.now(UTC), time.monotonic()
    running = [m for m in _service(request).running() if any(r.reservation for r in m.replicas)]
    return {"models": [tr.process(m, m.context, now, monotonic) for m in running]}


@router.post("/show", openapi_extra=body_schema(protocol.OllamaModelRequest))
async def show(request: Request) -> dict[str, Any]:
    body, _ = await parse_body(request, protocol.OllamaModelRequest)
    model = _service(request).get(tr.model_uid(body.target))
    return tr.show(model, model.context)


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": tr.OLLAMA_VERSION, "shoal_version": __version__}


@router.delete("/delete", openapi_extra=body_schema(protocol.OllamaModelRequest))
async def delete(request: Request) -> Response:
    """Terminates the running model (Ollama deletes its files; Shoal's weights stay where they are)."""
    body, _ = await parse_body(request, protocol.OllamaModelRequest)
    await _service(request).terminate(tr.model_uid(body.target))
    return Response(status_code=200)


@router.post("/pull", openapi_extra=body_schema(protocol.OllamaPullRequest))
async def pull(request: Request) -> Response:
    """Download into the cache (a hub name, hf.co/ORG/REPO:QUANT, or a catalog name from a hub),
    with Ollama's progress lines: pulling manifest, pulling DIGEST (total, completed) per file,
    verifying sha256 digest, writing manifest, success."""
    body, _ = await parse_body(request, protocol.OllamaPullRequest)
    service = _service(request)
    target = body.target if is_hub_name(body.target) else tr.model_uid(body.target)
    name, hub, started = await service.pull(
        PullRequest(model_name=target)
    )  # a missing or gated repo: the error now
    lines = tr.pull_lines(pull_progress(service.hubs, name, hub, started))
    if not body.stream:
        last: dict[str, Any] = {}
        async for line in lines:
            last = line
        return _error(502, last["error"]) if "error" in last else JSONResponse(last)
    return StreamingResponse((orjson.dumps(line) + b"\n" async for line in lines), media_type=NDJSON)
