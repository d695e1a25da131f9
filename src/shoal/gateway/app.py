"""Composition root: build_app() wires catalog, model service and routes into one FastAPI app."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from shoal import __version__
from shoal.catalog import Catalog
from shoal.errors import ShoalError
from shoal.gateway import (
    errors,
    routes_admin,
    routes_anthropic,
    routes_cohere,
    routes_media,
    routes_ollama,
    routes_openai,
    routes_ui,
)
from shoal.gateway.hot import HotRoutes
from shoal.gateway.middleware import (
    ApiKeyAuth,
    ASGIApp,
    BodyLimit,
    BodyTimeout,
    Receive,
    RequestLog,
    Scope,
    Send,
    UnexpectedErrors,
)
from shoal.hosts import Host
from shoal.hosts.local import LocalHost
from shoal.hosts.spares import parse_families
from shoal.protocol.admin import LaunchRequest
from shoal.services.models import ModelService
from shoal.settings import ServerSettings
from shoal.state import StateStore

log = logging.getLogger("shoal.gateway")


EXAMPLES = {  # one curl line per ability, shown for the models launched at start
    "chat": "curl {url}/v1/chat/completions -H 'Content-Type: application/json' "
    '-d \'{{"model": "{uid}", "messages": [{{"role": "user", "content": "Hello!"}}]}}\'',
    "embed": "curl {url}/v1/embeddings -H 'Content-Type: application/json' "
    '-d \'{{"model": "{uid}", "input": "Hello!"}}\'',
    "rerank": 'curl {url}/v1/rerank -H \'Content-Type: application/json\' -d \'{{"model": "{uid}", '
    '"query": "capital of France", "documents": ["Paris is in France.", "Bananas are yellow."]}}\'',
    "text2audio": "curl {url}/v1/audio/speech -H 'Content-Type: application/json' "
    '-d \'{{"model": "{uid}", "input": "Hello from Shoal.", "response_format": "wav"}}\' -o hello.wav',
    "audio2text": "curl {url}/v1/audio/transcriptions -F model={uid} -F file=@hello.wav",
    "ocr": "curl {url}/v1/images/ocr -F model={uid} -F image=@picture.png",
}


async def _launch_at_start(service: ModelService, names: Sequence[str], base_url: str) -> None:
    for name in names:
        if name in {m.uid for m in service.running()}:
            continue
        try:
            model = await service.launch(LaunchRequest(model_name=name))
            log.info("launched %s", model.uid)
        except ShoalError as exc:
            log.error("could not launch %s: %s", name, exc.message)
    if names:
        lines = []
        for model in service.running():
            ability = next((a for a in EXAMPLES if a in model.family.model_ability), None)
            if ability:
                lines.append("  " + EXAMPLES[ability].format(url=base_url, uid=model.uid))
        running = ", ".join(m.uid for m in service.running())
        print(
            f"\nShoal is serving on {base_url} with: {running}\nWeb UI: {base_url}/ui/\nTry:\n"
            + "\n".join(lines)
            + "\n",
            flush=True,
        )


def _document_raw_bodies(app: FastAPI) -> None:
    """Routes that parse their own bodies reference models FastAPI never saw: add them to the schema."""
    from fastapi.openapi.utils import get_openapi
    from pydantic.json_schema import models_json_schema

    from shoal.protocol import anthropic, cohere, ollama, openai

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            _, defs = models_json_schema(
                [
                    (m, "validation")
                    for m in (
                        *openai.REQUEST_MODELS,
                        *anthropic.REQUEST_MODELS,
                        *ollama.REQUEST_MODELS,
                        *cohere.REQUEST_MODELS,
                    )
                ],
                ref_template="#/components/schemas/{model}",
            )
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def build_host(settings: ServerSettings) -> Host:
    """Where runners live: every node of a Ray cluster (--ray-address), else this machine."""
    if settings.ray_address:
        from shoal.cluster import RayHost  # imports ray: only in Ray mode

        return RayHost(settings.ray_address)
    return LocalHost(settings.fake_gpus, settings.data_dir / "logs", parse_families(settings.warm_spares))


def _supervisor_ended(task: asyncio.Task[None]) -> None:
    if not task.cancelled():  # its steps are guarded, so this is a bug worth shouting about
        log.critical("the supervisor loop ended: %r", task.exception())


class Gateway(FastAPI):
    """FastAPI with Shoal's own middleware (plain ASGI) in front, then gateway.hot's inference
    routes, then FastAPI (its own middleware and routes) for the rest."""

    shoal_middleware: Sequence[tuple[Callable[..., ASGIApp], dict[str, Any]]] = ()  # outermost first
    _front: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._front is None:
            front: ASGIApp = HotRoutes(super().__call__, self)
            for factory, options in reversed(self.shoal_middleware):
                front = factory(front, **options)
            self._front = front
        await self._front(scope, receive, send)


def build_app(settings: ServerSettings, launch: Sequence[str] = ()) -> FastAPI:
    store = StateStore(settings.data_dir / "shoal.db")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        host = build_host(settings)
        service = ModelService(Catalog(store), settings, store, host)
        if hasattr(host, "on_change"):
            host.on_change = service.memory_freed  # nodes came or went: queued launches look again
        app.state.models = service
        await service.start()  # Ray mode: join the cluster, start the node agents
        # The models that were running before a restart are registered before the first request
        # (status "loading", so /ready waits) and load in the background.
        await service.restore()
        supervisor = asyncio.create_task(service.supervisor.run())
        supervisor.add_done_callback(_supervisor_ended)
        starter = asyncio.create_task(
            _launch_at_start(service, launch, f"http://{settings.host}:{settings.port}")
        )
        # What start-up built (modules, routes, schemas) lives as long as the process: out of the
        # collector's reach, each full collection no longer walks it (py-spy: a fifth of the
        # gateway's CPU per request went to the collector before).
        gc.freeze()
        try:
            yield
        finally:
            starter.cancel()
            supervisor.cancel()
            await service.shutdown()

    app = Gateway(title="Shoal", version=__version__, lifespan=lifespan)
    _document_raw_bodies(app)
    app.state.settings = settings
    app.state.store = store
    errors.install(app)
    app.include_router(routes_admin.router)
    app.include_router(routes_openai.router)
    app.include_router(routes_media.router)
    app.include_router(routes_anthropic.router)
    app.include_router(routes_ollama.router)  # the Ollama API, /api/...
    app.include_router(routes_cohere.router)
    routes_ui.mount_ui(app)  # the web UI at /ui (static files shipped in the package)
    # Outermost first: every answer gets a request id and a log line (499 when the client left), a
    # stalled body a 408, an unexpected error a 500 on a connection that stays open; then size and
    # key checks. (Connection caps and header timeouts are the server's: gateway/server.py.)
    app.shoal_middleware = [
        (RequestLog, {}),
        (BodyTimeout, {"seconds": settings.body_timeout}),
        (UnexpectedErrors, {}),
        (BodyLimit, {"max_bytes": settings.max_body}),
        (ApiKeyAuth, {"store": store, "admin_key": settings.api_key}),
    ]
    return app
