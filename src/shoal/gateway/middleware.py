"""Plain ASGI middleware (streaming-safe): a request id and one structured log line per request
with Prometheus counters, a body-size limit, and API-key auth with two scopes."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from shoal import metrics
from shoal.state import StateStore

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

access_log = logging.getLogger("shoal.access")

OPEN_PATHS = {
    "/health",
    "/ready",
    "/docs",
    "/redoc",
    "/openapi.json",
    "/v1/cluster/auth",
    "/docs/oauth2-redirect",
}
KEY_CACHE_SECONDS = 2.0  # a key created with `shoal keys create` works within this long


async def _send_error(
    send: Send,
    status: int,
    message: str,
    type_: str,
    code: str,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = json.dumps({"error": {"message": message, "type": type_, "code": code, "param": None}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), *(headers or [])],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestLog:
    """x-request-id on every answer (the client's own, or a new one); a JSON log line and metrics."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")[:128]
        request_id = incoming or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        start, status = time.perf_counter(), 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - start
            route = getattr(scope.get("route"), "path", "unmatched")
            model = str(scope.get("state", {}).get("model", ""))
            metrics.REQUESTS.labels(route, model, str(status)).inc()
            metrics.LATENCY.labels(route, model).observe(seconds)
            if status >= 400:
                metrics.ERRORS.labels(route, model, str(status)).inc()
            if route != "/metrics":
                access_log.info(
                    json.dumps(
                        {
                            "request_id": request_id,
                            "method": scope["method"],
                            "path": scope["path"],
                            "route": route,
                            "model": model or None,
                            "status": status,
                            "ms": round(seconds * 1000, 2),
                        }
                    )
                )


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
