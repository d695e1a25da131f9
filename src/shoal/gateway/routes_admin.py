"""Admin routes with Xinference's paths and field names (xinference-client works unchanged)."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from shoal.gateway import observability
from shoal.protocol.admin import EstimateRequest, LaunchRequest, PullRequest, RegisterRequest
from shoal.services.hubs import pull_progress
from shoal.services.models import ModelService
from shoal.services.proxy import forward

router = APIRouter(tags=["admin"])


def _service(request: Request) -> ModelService:
    return request.app.state.models  # type: ignore[no-any-return]


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.post("/v1/models")
async def launch_model(
    request: Request,
    body: LaunchRequest,
    wait_ready: bool = Query(True, description="answer once the model is ready"),
) -> dict[str, Any]:
    model = await _service(request).launch(body, wait=wait_ready)
    return {"model_uid": model.uid, "status": model.status}


def model_card(described: dict[str, Any]) -> dict[str, Any]:
    """A running model as both APIs read it: Xinference's description (xinference-client's
    describe_model and get_model) plus the fields of an OpenAI model object."""
    return {**described, "object": "model", "owned_by": "shoal"}


@router.get("/v1/models/{model_uid}")
async def describe_model(request: Request, model_uid: str) -> dict[str, Any]:
    """Xinference's describe_model and OpenAI's models.retrieve read the same route."""
    return model_card(_service(request).get(model_uid).describe())


@router.get("/v1/models/{model_uid}/engine_metrics")
async def engine_metrics(request: Request, model_uid: str) -> Response:
    """The engine's own counters from one ready replica (llama.cpp: tokens predicted, decode calls...)."""
    service = _service(request)
    result = await forward(service, model_uid, "/metrics", b"", False, method="GET")
    return Response(result.body, status_code=result.status, media_type=result.media_type)


@router.delete("/v1/models/{model_uid}")
async def terminate_model(request: Request, model_uid: str) -> dict[str, Any]:
    await _service(request).terminate(model_uid)
    return {"model_uid": model_uid, "status": "terminated"}


@router.get("/v1/model_registrations/{model_type}")
async def list_registrations(
    request: Request,
    model_type: str,
    detailed: bool = False,
    search: Annotated[str | None, Query(max_length=200)] = None,
) -> list[dict[str, Any]]:
    """The catalog of one model type ("all": every type); `search`: families whose name, family,
    description, abilities or licence hold every word of it."""
    families = _service(request).catalog.list(model_type, search)
    if detailed:
        return [{**f.model_dump(exclude={"builtin"}), "is_builtin": f.builtin} for f in families]
    return [{"model_name": f.model_name, "is_builtin": f.builtin} for f in families]


@router.get("/v1/model_registrations/{model_type}/{model_name}")
async def get_registration(request: Request, model_type: str, model_name: str) -> dict[str, Any]:
    family = _service(request).catalog.get(model_name, model_type)
    return {**family.model_dump(exclude={"builtin"}), "is_builtin": family.builtin}


@router.post("/v1/model_registrations/{model_type}")
async def register_model(request: Request, model_type: str, body: RegisterRequest) -> dict[str, Any]:
    family = _service(request).catalog.register(model_type, body.model, body.persist)
    return {"model_name": family.model_name, "model_type": family.model_type}


@router.delete("/v1/model_registrations/{model_type}/{model_name}")
async def unregister_model(request: Request, model_type: str, model_name: str) -> dict[str, Any]:
    _service(request).catalog.get(model_name, model_type)
    _service(request).catalog.unregister(model_name)
    return {"model_name": model_name, "status": "unregistered"}


@router.get("/v1/cluster/devices")
async def devices(request: Request) -> list[dict[str, Any]]:
    """Each device: total, used by others, each Shoal replica's reservation and measured use, free."""
    return await _service(request).devices()


@router.get("/v1/workers")
async def workers(request: Request) -> list[dict[str, Any]]:
    """The nodes models run on: one ("local") on a single machine, every Ray node in Ray mode."""
    return await asyncio.to_thread(_service(request).workers)


@router.post("/v1/models/estimate")
async def estimate(request: Request, body: EstimateRequest) -> dict[str, Any]:
    """The memory estimate of a launch and where it would be placed now; launches nothing."""
    return await _service(request).estimate(body)


@router.get("/v1/cluster/auth")
async def cluster_auth(request: Request) -> dict[str, bool]:
    """xinference-client asks whether the server wants a key (then it sends its api_key)."""
    return {"auth": bool(request.app.state.settings.api_key or request.app.state.store.keys())}


@router.get("/ready")
async def ready(request: Request) -> Response:
    """200 once every desired model is ready; 503 with the ones that are not."""
    service = _service(request)
    waiting = {m.uid: m.status for m in service.running() if m.status != "ready"}
    health = service.supervisor.health()
    stale = [name for name in ("supervision", "memory_sampling") if health[name]["stale"]]
    if waiting or stale:
        body: dict[str, Any] = {"status": "not ready", "models": waiting, "supervisor": health}
        if stale:
            body["stale"] = stale
        return Response(
            json.dumps(body), status_code=503, media_type="application/json", headers={"Retry-After": "2"}
        )
    return Response(
        json.dumps({"status": "ready", "models": len(service.running()), "supervisor": health}),
        media_type="application/json",
    )


@router.get("/metrics")
async def prometheus_metrics(request: Request) -> Response:
    """Prometheus text: requests, errors, latency, tokens, time to first token, queues, memory, events."""
    return Response(
        await asyncio.to_thread(observability.scrape, _service(request)), media_type=CONTENT_TYPE_LATEST
    )


# ---- the hub cache ------------------------------------------------------------------------------
NDJSON = "application/x-ndjson"


@router.post("/v1/cache/models")
async def pull_model(request: Request, body: PullRequest) -> Response:
    """Download a model into the cache without launching it: NDJSON progress lines (status
    downloading, completed_bytes, total_bytes, rate, ETA), then status success or failed."""
    service = _service(request)
    name, hub, pull = await service.pull(body)  # a missing or gated repo, a full disk: an error now
    lines = pull_progress(service.hubs, name, hub, pull)
    if not body.stream:
        last: dict[str, Any] = {}
        async for line in lines:
            last = line
        return Response(orjson.dumps(last), media_type="application/json")
    return StreamingResponse((orjson.dumps(line) + b"\n" async for line in lines), media_type=NDJSON)


@router.get("/v1/cache/models")
async def cached_models(request: Request) -> dict[str, Any]:
    """Each model in the cache: size, hub, revision, last use, the uids using it."""
    service = _service(request)
    return {"cache": str(service.hubs.root), "data": await asyncio.to_thread(service.cached)}


@router.delete("/v1/cache/models/{name:path}")
async def remove_cached(request: Request, name: str) -> dict[str, Any]:
    """Remove a model's files from the cache, and from each Ray node's (409 while a model uses them
    or they download); says per node what went."""
    return await _service(request).remove_cached(name)
