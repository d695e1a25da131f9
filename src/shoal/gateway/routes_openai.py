"""OpenAI-compatible inference routes: parse, check the model can do it, forward, render."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.background import BackgroundTask

from shoal.errors import InvalidRequest
from shoal.protocol.openai import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from shoal.services.models import ModelService
from shoal.services.proxy import forward

router = APIRouter(prefix="/v1", tags=["openai"])
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _service(request: Request) -> ModelService:
    return request.app.state.models  # type: ignore[no-any-return]


async def _run(
    request: Request, body: BaseModel, model: str, ability: str, path: str, stream: bool
) -> Response:
    service = _service(request)
    running = service.get(model)
    if ability not in running.family.model_ability:
        raise InvalidRequest(
            f"model {model!r} ({running.family.model_type}) cannot do {ability}; "
            f"it can do: {', '.join(running.family.model_ability)}"
        )
    payload = body.model_dump_json(exclude_unset=True).encode()
    result = await forward(service, model, path, payload, stream, request.app.state.settings.request_timeout)
    headers = {"x-shoal-replica": str(result.replica)}  # which replica answered, for debugging and tests
    if result.stream is not None:
        return StreamingResponse(
            result.stream,
            media_type="text/event-stream",
            headers={**STREAM_HEADERS, **headers},
            background=BackgroundTask(result.close) if result.close else None,
        )
    return Response(result.body, status_code=result.status, media_type="application/json", headers=headers)


@router.get("/models")
async def list_models(request: Request) -> dict[str, object]:
    return {
        "object": "list",
        "data": [
            {**m.describe(), "object": "model", "owned_by": "shoal"} for m in _service(request).running()
        ],
    }


@router.post("/chat/completions")
async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
    return await _run(request, body, body.model, "chat", "/v1/chat/completions", body.stream)


@router.post("/completions")
async def completions(request: Request, body: CompletionRequest) -> Response:
    return await _run(request, body, body.model, "generate", "/v1/completions", body.stream)


@router.post("/embeddings")
async def embeddings(request: Request, body: EmbeddingRequest) -> Response:
    return await _run(request, body, body.model, "embed", "/v1/embeddings", False)
