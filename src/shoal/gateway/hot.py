"""The OpenAI inference POSTs served straight from ASGI.

Same parse, checks, forward, answers and errors as their FastAPI routes in routes_openai (both call
routes_openai.serve and errors.response_for), without FastAPI's route matching over every route,
its Request object and dependency solving, and its middleware layers: measured with py-spy, those
took more of the gateway's CPU per one-sentence embeddings request than parsing and forwarding did.
A whole (not streamed) answer is sent as two ASGI messages, without a Starlette Response.
Any other method, path or root path goes on to the FastAPI app (its lifespan too).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from shoal.errors import ShoalError
from shoal.gateway import errors, routes_openai
from shoal.gateway.middleware import ASGIApp, Receive, Scope, Send
from shoal.services.proxy import Forwarded


async def read_body(receive: Receive) -> bytes:
    """The whole request body (as Starlette's Request.body reads it: a disconnect raises)."""
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


class HotRoutes:
    def __init__(self, app: ASGIApp, fastapi_app: FastAPI) -> None:
        self.app = app
        self.fastapi_app = fastapi_app
        # the FastAPI route of each path, for scope["route"]: the access log's and metrics' label
        self.routes: dict[str, Any] = {
            path: route
            for route in routes_openai.router.routes
            if (path := getattr(route, "path", None)) in routes_openai.INFERENCE
            and "POST" in getattr(route, "methods", ())
        }
        assert len(self.routes) == len(routes_openai.INFERENCE), "an INFERENCE path has no POST route"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = (
            self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        )
        if route is None or scope.get("root_path"):
            return await self.app(scope, receive, send)
        scope["app"], scope["route"] = self.fastapi_app, route
        service = self.fastapi_app.state.models
        response: Response
        try:
            raw = await read_body(receive)
            result = await routes_openai.serve(service, scope.setdefault("state", {}), raw, route.path)
        except (ShoalError, RequestValidationError, HTTPException) as exc:
            response = errors.response_for(route.path, exc)
        else:
            if result.stream is None:  # a whole answer: two messages, no Response object
                return await send_whole(send, result)
            response = routes_openai.render(result)
        await response(scope, receive, send)


async def send_whole(send: Send, result: Forwarded) -> None:
    """What routes_openai.render's Response would send for a whole answer, sent directly."""
    body = result.body or b""
    media_type = result.media_type
    if media_type.startswith("text/") and "charset=" not in media_type:
        media_type += "; charset=utf-8"  # as Starlette's Response adds it
    headers = [
        (b"content-length", str(len(body)).encode()),
        (b"content-type", media_type.encode("latin-1")),
        (b"x-shoal-replica", str(result.replica).encode()),
    ]
    await send({"type": "http.response.start", "status": result.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
