"""OpenAI-compatible inference routes: parse, check the model can do it, forward, render.

These are the hot path, so bodies are validated straight from the raw bytes with pydantic (no
FastAPI body injection) and forwarded as they came; the OpenAPI schema still documents them.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import orjson
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask

from shoal import metrics
from shoal.engines.base import MULTIMODAL_ENGINES, TRUNCATING_ENGINES
from shoal.errors import InvalidRequest
from shoal.gateway.routes_admin import model_card
from shoal.protocol.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ImageRequest,
    RerankRequest,
    SpeechRequest,
    check_prompt_size,
)
from shoal.services.models import ModelService
from shoal.services.proxy import Forwarded, forward

router = APIRouter(prefix="/v1", tags=["openai"])
# The inference routes that forward their body as it came: path, body model, ability. gateway.hot
# serves these same paths without FastAPI's routing.
INFERENCE: dict[str, tuple[type[BaseModel], str]] = {
    "/v1/chat/completions": (ChatCompletionRequest, "chat"),
    "/v1/completions": (CompletionRequest, "generate"),
    "/v1/embeddings": (EmbeddingRequest, "embed"),
    "/v1/rerank": (RerankRequest, "rerank"),
    "/v1/audio/speech": (SpeechRequest, "text2audio"),
    "/v1/images/generations": (ImageRequest, "text2image"),
}
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
Body = TypeVar("Body", bound=BaseModel)


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """openapi_extra documenting a JSON body that the route parses itself."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def validate(model: type[Body], raw: bytes) -> Body:
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from exc


async def parse_body(request: Request, model: type[Body]) -> tuple[Body, bytes]:
    raw = await request.body()
    return validate(model, raw), raw


async def check_model(request: Request, uid: str, ability: str, name: str | None = None) -> ModelService:
    """The model exists (loading it first under --autoload, or when a client unloaded it; `name`:
    the hub name an Ollama client asked for, launched under `uid`) and can do this."""
    service: ModelService = request.app.state.models
    await check_model_of(service, request.scope.setdefault("state", {}), uid, ability, name)
    return service


async def check_model_of(
    service: ModelService, state: dict[str, Any], uid: str, ability: str, name: str | None = None
) -> None:
    """check_model with the request's state (scope["state"], which the access log reads)."""
    state["model_requested"] = uid  # logged (clipped) if it turns out unknown
    if service.settings.autoload or service.parked(uid):
        await service.ensure_ready(uid, name)
    running = service.get(uid)
    state["model"] = uid  # a model that exists: the metrics' and access log's model label
    if ability not in running.abilities:
        raise InvalidRequest(
            f"model {uid!r} ({running.family.model_type}) cannot do {ability}; "
            f"it can do: {', '.join(running.abilities)}"
        )


def check_content(service: ModelService, uid: str, body: ChatCompletionRequest) -> None:
    """Image parts only to a model that reads images as it runs; audio and file parts only to an
    engine that hands them to the model (vLLM). Elsewhere they are a 400 here, not an engine's error."""
    kinds = {p.type for m in body.messages if isinstance(m.content, list) for p in m.content}
    if kinds <= {"text"}:
        return
    running = service.get(uid)
    if "image_url" in kinds and "vision" not in running.abilities:
        if "vision" in running.family.model_ability:
            raise InvalidRequest(
                f"model {uid!r} cannot read images as it runs here: its {running.engine} build has no "
                "image projector (Shoal's llama.cpp engine loads no mmproj). Launch its pytorch spec on "
                "vLLM to send images, or send text only"
            )
        raise InvalidRequest(f"model {uid!r} cannot read images (it has no vision ability): send text only")
    other = sorted(kinds - {"text", "image_url"})
    if other and running.engine not in MULTIMODAL_ENGINES:
        raise InvalidRequest(f"model {uid!r} ({running.engine}) reads no {other[0]} content parts: send text")


def render(result: Forwarded) -> Response:
    headers = {"x-shoal-replica": str(result.replica)}  # which replica answered, for debugging and tests
    if result.stream is not None:
        return StreamingResponse(
            result.stream,
            media_type=result.media_type,
            headers={**STREAM_HEADERS, **headers},
            background=BackgroundTask(result.close) if result.close else None,
        )
    return Response(result.body, status_code=result.status, media_type=result.media_type, headers=headers)


async def _run(request: Request, path: str) -> Response:
    state = request.scope.setdefault("state", {})
    return render(await serve(request.app.state.models, state, await request.body(), path))


async def serve(service: ModelService, state: dict[str, Any], raw: bytes, path: str) -> Forwarded:
    """One request to an INFERENCE path, from its raw body to the runner's answer (gateway.hot
    serves these paths without FastAPI's routing; the routes below document them and render what
    it passes on)."""
    model, ability = INFERENCE[path]
    body = validate(model, raw)
    uid: str = body.model  # type: ignore[attr-defined]
    await check_model_of(service, state, uid, ability)
    if isinstance(body, ChatCompletionRequest):
        check_content(service, uid, body)
    check_size(service, uid, body)
    stream: bool = getattr(body, "stream", False)
    result = await forward(service, uid, path, raw, stream)
    if ability in ("chat", "generate"):
        record_tokens(uid, result)
    return result


def check_size(service: ModelService, uid: str, body: BaseModel) -> None:
    """A prompt far beyond the model's context is refused here, before a runner tokenizes it."""
    running = service.get(uid)  # only its family, request and engine are read
    check_prompt_size(body, running.context, truncates=running.engine in TRUNCATING_ENGINES)


def record_tokens(uid: str, result: Forwarded) -> None:
    """Tokens generated and time to first token, read from what passes through."""
    generated = metrics.TOKENS.labels(uid)
    if result.stream is None:
        if result.status == 200 and result.body:
            usage = orjson.loads(result.body).get("usage") or {}
            generated.inc(usage.get("completion_tokens") or 0)
        return
    upstream, start = result.stream, time.perf_counter()

    async def counted() -> AsyncIterator[bytes]:
        first = True
        async for chunk in upstream:
            # llama.cpp and the transformers engine send one token per SSE event with content
            tokens = chunk.count(b'"content":"') + chunk.count(b'"text":"')
            if tokens:
                if first:
                    metrics.TIME_TO_FIRST_TOKEN.labels(uid).observe(time.perf_counter() - start)
                    first = False
                generated.inc(tokens)
            yield chunk

    result.stream = counted()


@router.get("/models")
async def list_models(request: Request) -> dict[str, object]:
    return {
        "object": "list",
        "data": [model_card(m.describe()) for m in request.app.state.models.running()],
    }


@router.post("/chat/completions", openapi_extra=body_schema(ChatCompletionRequest))
async def chat_completions(request: Request) -> Response:
    return await _run(request, "/v1/chat/completions")


@router.post("/completions", openapi_extra=body_schema(CompletionRequest))
async def completions(request: Request) -> Response:
    return await _run(request, "/v1/completions")


@router.post("/embeddings", openapi_extra=body_schema(EmbeddingRequest))
async def embeddings(request: Request) -> Response:
    return await _run(request, "/v1/embeddings")


@router.post("/rerank", openapi_extra=body_schema(RerankRequest))
async def rerank(request: Request) -> Response:
    return await _run(request, "/v1/rerank")


@router.post("/audio/speech", openapi_extra=body_schema(SpeechRequest))
async def speech(request: Request) -> Response:
    """Audio in the response_format; with `stream`, sent as it is synthesised."""
    return await _run(request, "/v1/audio/speech")


@router.post("/images/generations", openapi_extra=body_schema(ImageRequest))
async def image_generations(request: Request) -> Response:
    """Text to image (diffusers); images come back as b64_json PNGs."""
    return await _run(request, "/v1/images/generations")
