"""Plain ASGI middleware (streaming-safe): a request id and one structured log line per request
with Prometheus counters, a read timeout on request bodies, the last catch for unexpected errors,
a body-size limit, and API-key auth with two scopes."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.requests import ClientDisconnect

from shoal import metrics
from shoal.state import StateStore

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

access_log = logging.getLogger("shoal.access")
log = logging.getLogger("shoal.gateway")

OPEN_PATHS = {
    "/health",
    "/ready",
    "/docs",
    "/redoc",
    "/openapi.json",
    "/v1/cluster/auth",
    "/docs/oauth2-redirect",
}
# Ollama API routes that change what runs (/api/delete terminates a model); the rest are inference.
OLLAMA_ADMIN_PATHS = {"/api/delete", "/api/pull", "/api/create", "/api/copy", "/api/push"}
KEY_CACHE_SECONDS = 2.0  # a key created with `shoal keys create` works within this long
CLIENT_CLOSED = 499  # nginx's "client closed request": the client left before the answer was complete
# gateway.server puts {"gone": callable} under this key of each request's scope["extensions"]:
# the callable answers True once the client has hung up before its answer was complete
CLIENT_EXTENSION = "shoal.client"
LOG_TEXT_LIMIT = 200  # characters of a path or model name a log line keeps


def error_body(
    message: str, type_: str, code: str | None, details: dict[str, object] | None = None
) -> dict[str, object]:
    """The OpenAI error shape; every error the gateway answers is built here."""
    error: dict[str, object] = {"message": message, "type": type_, "code": code, "param": None}
    if details:
        error["details"] = details  # e.g. a 507's numbers, for programs (the UI) rather than people
    return {"error": error}


async def _send_error(
    send: Send,
    status: int,
    message: str,
    type_: str,
    code: str,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = json.dumps(error_body(message, type_, code)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def clip(text: str, limit: int = LOG_TEXT_LIMIT) -> str:
    """At most `limit` characters of something a client sent, for a log line (which escapes it)."""
    return text if len(text) <= limit else f"{text[:limit]}...(+{len(text) - limit} chars)"


class RequestLog:
    """x-request-id on every answer (the client's own, or a new one); a JSON log line and metrics.

    A client that hangs up before its answer is complete is logged and counted as 499, whatever the
    app went on to do. Labels are bounded: the route template (or "unmatched") and the uid of a model
    that exists (routes set `state.model` only then); a name the client asked for is only logged,
    clipped."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        incoming = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"")
        request_id = incoming.decode("latin-1")[:128] or os.urandom(16).hex()  # 32 hex digits, as uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        id_header = (b"x-request-id", request_id.encode("latin-1"))
        start, status = time.perf_counter(), 500
        finishing = hung_up = False  # the last body part went to the server / the client left first

        async def receive_noting_hangup() -> Message:
            nonlocal hung_up
            message = await receive()
            if message["type"] == "http.disconnect" and not finishing:
                hung_up = True
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status, finishing
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), id_header]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                finishing = True
            await send(message)

        try:
            await self.app(scope, receive_noting_hangup, send_with_id)
        finally:
            gone = scope.get("extensions", {}).get(CLIENT_EXTENSION, {}).get("gone")
            if hung_up or (gone is not None and gone()):
                status = CLIENT_CLOSED
            self._record(scope, request_id, status, time.perf_counter() - start)

    @staticmethod
    def _record(scope: Scope, request_id: str, status: int, seconds: float) -> None:
        route = getattr(scope.get("route"), "path", "unmatched")
        state = scope.get("state", {})
        model = str(state.get("model", ""))
        metrics.RequestMetrics.record(route, model, status, seconds)
        if route == "/metrics" or not access_log.isEnabledFor(logging.INFO):
            return
        line: dict[str, object] = {
            "request_id": request_id,
            "method": scope["method"],
            "path": clip(scope["path"]),
            "route": route,
            "model": model or None,
            "status": status,
            "ms": round(seconds * 1000, 2),
        }
        if not model and state.get("model_requested"):
            line["model_requested"] = clip(str(state["model_requested"]))  # unknown: not a label
        access_log.info(json.dumps(line))


class BodyTimeout:
    """A request body that pauses longer than `seconds` between two reads gets a 408 and the
    connection is closed (nginx's client_body_timeout). The app sees the client as gone."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.seconds <= 0:  # 0: no body timeout
            return await self.app(scope, receive, send)
        body_read = timed_out = started = False

        async def receive_in_time() -> Message:
            nonlocal body_read, timed_out
            if timed_out:
                return {"type": "http.disconnect"}
            if body_read:  # after the body only a disconnect comes, whenever it comes
                return await receive()
            try:
                async with asyncio.timeout(self.seconds):
                    message = await receive()
            except TimeoutError:
                timed_out = True
                metrics.SLOW_CLIENTS.labels("body").inc()
                return {"type": "http.disconnect"}
            body_read = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def send_unless_timed_out(message: Message) -> None:
            nonlocal started
            if timed_out and not started:
                return  # whatever the app makes of the "disconnect", the answer is the 408 below
            started = True
            await send(message)

        try:
            await self.app(scope, receive_in_time, send_unless_timed_out)
        except Exception:
            if not timed_out:
                raise
        if timed_out and not started:
            message = f"the request body paused for more than {self.seconds:g} s"
            headers = [(b"connection", b"close")]
            await _send_error(send, 408, message, "invalid_request_error", "body_timeout", headers)


class UnexpectedErrors:
    """The last catch: an exception nothing else handled is logged once, with its traceback, and
    answered 500 in the OpenAI shape. It is not re-raised (Starlette's ServerErrorMiddleware
    re-raises, so uvicorn logged it a second time and dropped the keep-alive connection). A client
    that hung up mid-body is no error: nothing is logged here and RequestLog writes a 499."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_noting_start(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_noting_start)
        except ClientDisconnect:
            return
        except Exception as exc:
            log.exception("unexpected error on %s %s", scope["method"], clip(scope["path"]))
            if not started:  # else the answer is cut short and the server closes the connection
                message = clip(f"internal error: {type(exc).__name__}: {exc}", 1000)
                await _send_error(send, 500, message, "server_error", "internal_error")


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length")
            if length and length.isdigit() and int(length) > self.max_bytes:
                message = f"the request body is larger than {self.max_bytes // 1024**2} MiB"
                return await _send_error(send, 413, message, "invalid_request_error", "body_too_large")
        await self.app(scope, receive, send)


def _needed_scope(method: str, path: str) -> str | None:
    """None: open; "admin": changes what runs or who may call; "inference": everything else."""
    if path in OPEN_PATHS or path in ("/", "/ui") or path.startswith("/ui/"):
        return None  # the UI's own files; its API calls carry the key
    if method in ("POST", "DELETE", "PUT") and (
        (path.startswith("/v1/models") and path != "/v1/models/estimate")
        or path.startswith("/v1/model_registrations")
        or path.startswith("/v1/keys")
        or path.startswith("/v1/cache/")
        or path in OLLAMA_ADMIN_PATHS
    ):
        return "admin"
    return "inference"


class ApiKeyAuth:
    """Bearer (or x-api-key) keys: the server's --api-key (admin) and keys from `shoal keys create`,
    kept hashed in the state store. Auth is on when either exists."""

    def __init__(self, app: ASGIApp, store: StateStore, admin_key: str | None) -> None:
        self.app = app
        self.store = store
        self.admin_key = admin_key
        self._checked = 0.0
        self._has_keys = False

    def enabled(self) -> bool:
        if self.admin_key:
            return True
        now = time.monotonic()
        if now - self._checked > KEY_CACHE_SECONDS:
            self._has_keys, self._checked = bool(self.store.keys()), now
        return self._has_keys

    def _scope_of(self, key: str) -> str | None:
        if self.admin_key and key == self.admin_key:
            return "admin"
        return self.store.key_scope(key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.enabled():
            return await self.app(scope, receive, send)
        needed = _needed_scope(scope["method"], scope["path"])
        if needed is None:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        key = (
            auth[7:].strip()
            if auth.lower().startswith("bearer ")
            else headers.get(b"x-api-key", b"").decode()
        )
        if not key:
            return await _send_error(
                send,
                401,
                "an API key is required: send 'Authorization: Bearer <key>'",
                "authentication_error",
                "missing_api_key",
                [(b"www-authenticate", b"Bearer")],
            )
        has = self._scope_of(key)
        if has is None:
            return await _send_error(
                send,
                401,
                "invalid API key",
                "authentication_error",
                "invalid_api_key",
                [(b"www-authenticate", b"Bearer")],
            )
        if needed == "admin" and has != "admin":
            return await _send_error(
                send,
                403,
                f"this key has the {has} scope; {scope['method']} {scope['path']} needs an admin key",
                "permission_error",
                "insufficient_scope",
            )
        await self.app(scope, receive, send)
