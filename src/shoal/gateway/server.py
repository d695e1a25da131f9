"""The gateway's HTTP server: uvicorn, with what a server open to any client needs.

- **Header timeout.** A connection must send a request's headers within `header_timeout` seconds:
  a new connection from when it opens, a kept-alive one from the first byte of its next request.
  Past it the connection is closed (with a 408 if part of a request came).
- **Idle timeout.** A kept-alive connection that sends nothing for `idle_timeout` seconds after an
  answer is closed (uvicorn's `timeout_keep_alive`).
- **Body timeout.** A body that pauses too long gets a 408: `middleware.BodyTimeout`, since it
  needs the request.
- **Connection caps.** At most `max_connections` open in all and `max_connections_per_client`
  from one client address; past either, the connection is answered 503 with Retry-After in the
  OpenAI error shape and closed, so a flood costs a moment's descriptor, never the process's last
  one. The total stays under RLIMIT_NOFILE with a reserve for runner sockets, /proc reads, SQLite
  and logs; the soft limit is raised to the hard one at start.
- **Room for the host itself.** The last `local_reserve` connections under the total are only for
  connections from the host itself (source address = the address connected to: 127.0.0.1 to
  127.0.0.1, or the host's own address to itself), so /health, /ready, /metrics and the CLI on the
  host still get in while other hosts fill the total. Other loopback addresses (127.0.0.2...) count
  as other hosts: the tests use them to stand in for remote clients.

Both of uvicorn's HTTP/1.1 protocols are covered (httptools, which uvicorn[standard] picks, and h11
where httptools is missing): a subclass of each counts its connection and arms the header timer;
the per-connection logic is `_Guard`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import sys
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, cast

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.protocols.http.h11_impl import H11Protocol

from shoal import metrics
from shoal.gateway.middleware import CLIENT_EXTENSION, ASGIApp, error_body
from shoal.settings import ServerSettings

log = logging.getLogger("shoal.gateway")

MAX_CONNECTIONS_AUTO = 10_000  # the auto total where descriptors allow; each costs memory too
RESERVED_DESCRIPTORS = 512  # at least this many (or an eighth of the limit) are never connections
LOCAL_RESERVE = 16  # at most this many (an eighth of the total if less) only for the host itself
RETRY_AFTER = 1  # seconds, in the 503 of a refused connection
LINGER = 1.0  # seconds a refused connection is kept to read its request, so the close is no reset
MAX_LINGERING = 64  # refused connections lingering at once; past it one is closed right away
REFUSAL_LOG_EVERY = 10.0  # seconds between two warnings about refused connections


def raise_descriptor_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def connection_caps(settings: ServerSettings, descriptors: int) -> tuple[int, int]:
    """(total, per client) from the settings; "auto" (None) and anything past the descriptor limit
    are worked out from `descriptors`. A per-client cap of 0 means none beyond the total."""
    ceiling = max(16, descriptors - max(RESERVED_DESCRIPTORS, descriptors // 8))
    total = settings.max_connections
    if total is None:
        total = min(MAX_CONNECTIONS_AUTO, ceiling)
    elif total < 1:
        raise ValueError(f"SHOAL_MAX_CONNECTIONS must be at least 1, not {total}")
    elif total > ceiling:
        log.warning(
            "SHOAL_MAX_CONNECTIONS=%d is past what %d open files allow with a reserve; using %d",
            total,
            descriptors,
            ceiling,
        )
        total = ceiling
    per_client = settings.max_connections_per_client
    if per_client is None:
        per_client = max(1, total // 4)
    elif per_client < 0:
        raise ValueError(f"SHOAL_MAX_CONNECTIONS_PER_CLIENT must be 0 or more, not {per_client}")
    return total, min(per_client or total, total)


def raw_error(status: int, reason: str, message: str, type_: str, code: str, headers: str = "") -> bytes:
    """A whole HTTP/1.1 answer that closes the connection, written straight to the socket."""
    body = json.dumps(error_body(message, type_, code)).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n{headers}connection: close\r\n\r\n"
    )
    return head.encode() + body


def local_reserve(total: int) -> int:
    """How many of `total` connections only the host itself may use."""
    return min(LOCAL_RESERVE, total // 8)


@dataclass
class ConnectionLimits:
    """What all connections of one server share: the caps, the header timeout and the counts."""

    total: int
    per_client: int
    header_timeout: float
    reserve: int = -1  # kept for connections from the host itself; -1: local_reserve(total)
    open: int = 0
    remote: int = 0  # of them, from other hosts: at most total - reserve
    by_client: dict[str, int] = field(default_factory=dict)
    lingering: int = 0
    _refused: int = 0  # since the last warning
    _warned: float = float("-inf")

    def __post_init__(self) -> None:
        if self.reserve < 0:
            self.reserve = local_reserve(self.total)

    def admit(self, client: str, local: bool = False) -> str | None:
        """Count the connection in and return None, or return why not: "total" or "per_client".
        `local`: it comes from the host itself, which may also use the reserve."""
        if self.open >= self.total or (not local and self.remote >= self.total - self.reserve):
            reason = "total"
        elif self.by_client.get(client, 0) >= self.per_client:
            reason = "per_client"
        else:
            self.open += 1
            self.remote += not local
            self.by_client[client] = self.by_client.get(client, 0) + 1
            metrics.OPEN_CONNECTIONS.inc()
            return None
        metrics.CONNECTIONS_REFUSED.labels(reason).inc()
        self._refused += 1
        now = time.monotonic()
        if now - self._warned >= REFUSAL_LOG_EVERY:
            cap = (
                f"{self.total} in all ({self.reserve} only for the host itself)"
                if reason == "total"
                else f"{self.per_client} per client"
            )
            log.warning(
                "refused %d connection(s) at the cap of %s since the last such warning (the last "
                "from %s); warned at most every %g s, all counted in shoal_connections_refused_total; "
                "see SHOAL_MAX_CONNECTIONS and SHOAL_MAX_CONNECTIONS_PER_CLIENT",
                self._refused,
                cap,
                client,
                REFUSAL_LOG_EVERY,
            )
            self._refused, self._warned = 0, now
        return reason

    def release(self, client: str, local: bool = False) -> None:
        self.open -= 1
        self.remote -= not local
        metrics.OPEN_CONNECTIONS.dec()
        left = self.by_client.get(client, 1) - 1
        if left > 0:
            self.by_client[client] = left
        else:
            self.by_client.pop(client, None)


class _Guard:
    """One connection's side of the limits: admission (or a 503 and a short linger), the header
    timer, and the count given back when it closes."""

    def __init__(self, limits: ConnectionLimits, loop: asyncio.AbstractEventLoop) -> None:
        self.limits = limits
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.client = ""
        self.local = False  # from the host itself
        self.refused = False
        self.admitted = False
        self.lingering = False
        self.partial = False  # part of a request's head has come
        self.timer: asyncio.TimerHandle | None = None

    def open(self, transport: asyncio.Transport) -> bool:
        """True: serve it. False: it was answered 503 and will close by itself."""
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.client = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer or "")
        own = transport.get_extra_info("sockname")
        # From the host itself: the kernel refuses a packet from outside that claims a local source.
        self.local = isinstance(own, tuple) and bool(own) and str(own[0]) == self.client
        reason = self.limits.admit(self.client, self.local)
        if reason is None:
            self.admitted = True
            self.arm(partial=False)
            return True
        self.refused = True
        message = (
            f"too many connections from {self.client} (at most {self.limits.per_client})"
            if reason == "per_client"
            else f"the server is at its cap of {self.limits.total} connections "
            f"({self.limits.total - self.limits.reserve} for other hosts, {self.limits.reserve} kept for "
            "clients on the host itself)"
        )
        transport.write(
            raw_error(
                503,
                "Service Unavailable",
                message + "; retry later",
                "server_error",
                "too_many_connections",
                f"retry-after: {RETRY_AFTER}\r\n",
            )
        )
        if self.limits.lingering >= MAX_LINGERING:
            transport.close()
            return False
        # Read (and drop) what the client sends until it closes or LINGER passes: closing a socket
        # with its request unread would reset the connection and could lose the 503 on the way.
        self.limits.lingering += 1
        self.lingering = True
        if transport.can_write_eof():
            transport.write_eof()
        self.timer = self.loop.call_later(LINGER, transport.close)
        return False

    def arm(self, partial: bool) -> None:
        """The clock for a request's head starts (unless it already runs)."""
        self.partial = self.partial or partial
        if self.timer is None and self.limits.header_timeout > 0:
            self.timer = self.loop.call_later(self.limits.header_timeout, self._headers_too_slow)

    def disarm(self) -> None:
        """The head is complete."""
        self.partial = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _headers_too_slow(self) -> None:
        self.timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        metrics.SLOW_CLIENTS.labels("headers").inc()
        log.debug("closing a connection from %s: no request head within the timeout", self.client)
        if self.partial:
            message = f"the request head did not arrive within {self.limits.header_timeout:g} s"
            answer = raw_error(408, "Request Timeout", message, "invalid_request_error", "header_timeout")
            transport.write(answer)
        transport.close()

    def closed(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.admitted:
            self.admitted = False
            self.limits.release(self.client, self.local)
        if self.lingering:
            self.lingering = False
            self.limits.lingering -= 1


def _note_client(scope: Any, cycle: Any) -> None:
    """Let middleware.RequestLog ask whether this request's client hung up before the answer."""
    scope.setdefault("extensions", {})[CLIENT_EXTENSION] = {"gone": lambda: cycle.disconnected}


class _Admission:
    """The opening and closing of a connection, the same for both of uvicorn's protocols: a
    connection over a cap is answered 503 by its _Guard and never reaches uvicorn's code."""

    admission: ConnectionLimits
    loop: asyncio.AbstractEventLoop
    guard: _Guard

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.guard = _Guard(self.admission, self.loop)
        if self.guard.open(cast(asyncio.Transport, transport)):
            super().connection_made(transport)  # type: ignore[misc]

    def connection_lost(self, exc: Exception | None) -> None:
        refused = self.guard.refused
        self.guard.closed()
        if not refused:
            super().connection_lost(exc)  # type: ignore[misc]


def _h11_class(limits: ConnectionLimits) -> type[asyncio.Protocol]:
    import h11

    class GuardedH11(_Admission, H11Protocol):
        admission = limits

        def data_received(self, data: bytes) -> None:
            if self.guard.refused:
                return
            if self.conn.their_state is h11.IDLE:
                self.guard.arm(partial=True)
            super().data_received(data)
            theirs, ours = self.conn.their_state, self.conn.our_state
            if theirs is h11.SEND_BODY and ours is h11.DONE:
                self.guard.arm(partial=False)  # the rest of a body nobody reads: bounded too
            elif theirs is not h11.IDLE:
                self.guard.disarm()

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and CLIENT_EXTENSION not in self.cycle.scope.get("extensions", {}):
                _note_client(self.cycle.scope, self.cycle)

    return GuardedH11


def _httptools_class(limits: ConnectionLimits) -> type[asyncio.Protocol]:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class GuardedHttpTools(_Admission, HttpToolsProtocol):
        admission = limits

        def data_received(self, data: bytes) -> None:
            if self.guard.refused:
                return
            super().data_received(data)
            cycle = self.cycle
            if cycle is not None and cycle.response_complete and self.timeout_keep_alive_task is None:
                self.guard.arm(partial=False)  # the rest of a body nobody reads: bounded too

        def on_message_begin(self) -> None:
            self.guard.arm(partial=True)
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self.guard.disarm()
            super().on_headers_complete()
            if self.cycle is not None and self.cycle.scope is self.scope:
                _note_client(self.scope, self.cycle)

    return GuardedHttpTools


def protocol_class(limits: ConnectionLimits, kind: str = "auto") -> type[asyncio.Protocol]:
    """uvicorn's fast protocol (httptools) when installed, else h11 (or the `kind` named), with
    the limits applied."""
    if kind == "auto":
        try:
            import httptools  # noqa: F401
        except ImportError:
            kind = "h11"
    return _h11_class(limits) if kind == "h11" else _httptools_class(limits)


class QuietServer(uvicorn.Server):
    """uvicorn's server, waking once a second instead of ten times: its loop only refreshes the
    Date header (once a second anyway) and looks for a shutdown signal, which now wakes it at
    once. An idle gateway woke 10 times a second for this: 1.5–3 ms of CPU per second measured,
    since a wake-up from idle costs about as much as a small request (docs/benchmarks.md)."""

    _wake: asyncio.Event | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    async def main_loop(self) -> None:
        self._wake, self._loop = asyncio.Event(), asyncio.get_running_loop()
        while not await self.on_tick(0):  # tick 0: the Date header is refreshed every pass
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._wake.wait()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)  # a signal handler: not in a callback


def serve(app: ASGIApp, settings: ServerSettings, log_level: str = "info") -> None:
    """Run `app` on settings.host:port until SIGINT/SIGTERM."""
    descriptors = raise_descriptor_limit()
    total, per_client = connection_caps(settings, descriptors)
    limits = ConnectionLimits(total, per_client, settings.header_timeout)
    log.info(
        "connections: at most %d (%d per client; the last %d only from the host itself); "
        "timeouts: head %gs, body %gs, idle %gs; %d open files",
        total,
        per_client,
        limits.reserve,
        settings.header_timeout,
        settings.body_timeout,
        settings.idle_timeout,
        descriptors,
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        access_log=False,  # middleware.RequestLog writes one JSON line per request
        timeout_graceful_shutdown=int(settings.grace),
        timeout_keep_alive=max(1, round(settings.idle_timeout)),
        http=protocol_class(limits),
        ws="none",  # no WebSocket routes: an upgrade would hand the connection (and its count) away
    )
    server = QuietServer(config)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it shut down for, after the shutdown
        pass
    if not server.started:
        sys.exit(STARTUP_FAILURE)  # the port was taken, or the app failed to start
