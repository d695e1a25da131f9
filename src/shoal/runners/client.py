"""Keep-alive HTTP/1.1 from the gateway to its runners: a Unix socket here, host:port on a Ray node.

Runners are Shoal's own uvicorn servers, so this speaks only what they send (Content-Length or
chunked bodies, keep-alive), with httptools' parser, the one uvicorn itself uses, over an asyncio
protocol: one write per request, no task, cookie jar, tracing or decompression per request. Measured
on the 2-core VM (docs/benchmarks.md), a bare ASGI proxy spent 0.67 ms of CPU per one-sentence
request through aiohttp and 0.35 ms through this.

Failures are the built-in ones: ConnectionError (OSError) when the runner cannot be reached or
drops the connection before its answer is complete, TimeoutError when no byte came within the
wait for it or the answer took longer than its whole timeout. A connection that failed, timed out
or was left before its answer was complete is closed, never reused.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import httptools
import orjson

CONNECT_TIMEOUT = 5.0  # seconds to open a connection (a runner's socket accepts at once when it lives)
HIGH_WATER = 1 << 20  # bytes of an answer held unread before the socket is no longer read
LOW_WATER = HIGH_WATER // 4


class RunnerClient:
    """A pool of keep-alive connections to one runner, as many as requests in flight."""

    def __init__(self, *, socket: str | None = None, host: str = "", port: int = 0) -> None:
        if (socket is None) == (not host or not port):
            raise ValueError("a runner client needs a Unix socket or a host and port")
        self.socket, self.host, self.port = socket, host, port
        self._authority = b"runner" if socket else f"{host}:{port}".encode()
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()
        self.closed = False

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        *,
        timeout: float = 600.0,
        first_byte: float | None = None,
    ) -> Answer:
        """Send one request; returns once the answer's status and headers came. `timeout` bounds the
        whole answer, `first_byte` each wait for bytes (the first and every next one)."""
        if self.closed:
            raise ConnectionError("the connection to the runner is closed")
        loop = asyncio.get_running_loop()
        answer = Answer(self, loop, loop.time() + timeout, min(timeout, first_byte or timeout))
        connection = self._idle_connection() or await self._connect()
        connection.send(_head(method, path, self._authority, len(body), headers) + body, answer)
        await answer._headers()
        return answer

    async def call(
        self, method: str, path: str, payload: Any = None, timeout: float = 10.0
    ) -> tuple[int, bytes]:
        """A small call with an optional JSON body: the status and the whole answer."""
        body = orjson.dumps(payload) if payload is not None else b""
        headers = {"content-type": "application/json"} if payload is not None else None
        answer = await self.request(method, path, body, headers, timeout=timeout)
        try:
            return answer.status, await answer.read()
        finally:
            answer.close()

    async def close(self) -> None:
        """Close every connection; requests in flight fail with ConnectionError."""
        self.closed = True
        for connection in list(self._all):
            connection.drop()
        self._idle.clear()

    def _idle_connection(self) -> _Connection | None:
        while self._idle:
            connection = self._idle.pop()
            if connection.usable:
                return connection
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                if self.socket is not None:
                    _, connection = await loop.create_unix_connection(lambda: _Connection(self), self.socket)
                else:
                    _, connection = await loop.create_connection(
                        lambda: _Connection(self), self.host, self.port
                    )
        except TimeoutError:
            raise ConnectionError(
                f"the runner did not accept a connection within {CONNECT_TIMEOUT:g} s"
            ) from None
        if self.closed:
            connection.drop()
            raise ConnectionError("the connection to the runner is closed")
        self._all.add(connection)
        return connection

    def _reusable(self, connection: _Connection) -> None:
        if self.closed or not connection.usable:
            connection.drop()
        else:
            connection.resume()  # its last answer may have filled the buffer and paused it
            self._idle.append(connection)

    def _forget(self, connection: _Connection) -> None:
        self._all.discard(connection)


def _head(method: str, path: str, authority: bytes, length: int, headers: dict[str, str] | None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1".encode(), b"host: " + authority, b"content-length: %d" % length]
    for name, value in (headers or {}).items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise ValueError(f"header {name!r} holds a line break")
        lines.append(f"{name}: {value}".encode("latin-1"))
    return b"\r\n".join(lines) + b"\r\n\r\n"


class Answer:
    """One runner answer: status and headers first, then its body, whole (read) or piece by piece
    (chunks). Its connection goes back to the pool once the body is complete."""

    def __init__(
        self, client: RunnerClient, loop: asyncio.AbstractEventLoop, deadline: float, wait: float
    ) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self._client, self._loop, self._deadline, self._wait_for = client, loop, deadline, wait
        self._connection: _Connection | None = None
        self._pieces: deque[bytes] = deque()
        self._buffered = 0
        self._started = self._complete = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    @property
    def content_type(self) -> str:
        for name, value in self.headers:
            if name == b"content-type":
                return value.decode("latin-1").split(";", 1)[0].strip()
        return "application/octet-stream"

    async def read(self) -> bytes:
        return b"".join([piece async for piece in self.chunks()])

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's pieces as they come (an SSE stream's events, for one)."""
        while True:
            if self._pieces:
                piece = self._pieces.popleft()
                self._buffered -= len(piece)
                if self._buffered <= LOW_WATER and self._connection is not None:
                    self._connection.resume()
                yield piece
            elif self._error is not None:
                raise self._error
            elif self._complete:
                return
            else:
                await self._wait()

    def close(self) -> None:
        """Done with it: an answer not complete yet drops its connection (the runner sees the client
        go and stops working on it). Idempotent."""
        if self._connection is not None and not self._complete:
            self._connection.drop()
        self._connection = None

    async def _headers(self) -> None:
        try:
            while not self._started:
                if self._error is not None:
                    raise self._error
                await self._wait()
        except BaseException:
            self.close()
            raise

    async def _wait(self) -> None:
        left = self._deadline - self._loop.time()
        wait = min(self._wait_for, left)
        if wait <= 0:
            self.close()
            raise TimeoutError("the runner's answer took longer than its timeout")
        waiter = self._waiter = self._loop.create_future()
        timer = self._loop.call_later(wait, _time_out, waiter)
        try:
            await waiter
        except TimeoutError:
            self.close()
            raise
        finally:
            timer.cancel()
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # fed by the connection
    def _on_headers(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status, self.headers, self._started = status, headers, True
        self._wake()

    def _on_body(self, piece: bytes) -> None:
        self._pieces.append(piece)
        self._buffered += len(piece)
        if self._buffered > HIGH_WATER and self._connection is not None:
            self._connection.pause()
        self._wake()

    def _on_complete(self, reusable: bool) -> None:
        self._complete = True
        connection, self._connection = self._connection, None
        if connection is not None:
            if reusable:
                self._client._reusable(connection)
            else:
                connection.drop()
        self._wake()

    def _on_error(self, error: BaseException) -> None:
        if not self._complete:
            self._error = error
            self._connection = None
            self._wake()


def _time_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("the runner sent no byte in time"))


class _Connection(asyncio.Protocol):
    def __init__(self, client: RunnerClient) -> None:
        self._client = client
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._answer: Answer | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._paused = self._lost = False

    @property
    def usable(self) -> bool:
        return not self._lost and self._transport is not None and not self._transport.is_closing()

    def send(self, data: bytes, answer: Answer) -> None:
        assert self._transport is not None and self._answer is None
        self._answer, answer._connection = answer, self
        self._transport.write(data)

    def drop(self) -> None:
        if self._transport is not None:
            self._transport.close()  # connection_lost follows and fails the answer, if any

    def pause(self) -> None:
        if not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.usable:
            self._paused = False
            assert self._transport is not None
            self._transport.resume_reading()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._client._forget(self)
        answer, self._answer = self._answer, None
        if answer is not None:
            why = f": {exc}" if exc else ""
            answer._on_error(
                ConnectionError(f"the runner closed the connection before its answer was complete{why}")
            )

    def data_received(self, data: bytes) -> None:
        if self._answer is None:  # bytes nobody asked for: this connection cannot be trusted
            self.drop()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            answer, self._answer = self._answer, None
            if answer is not None:
                answer._on_error(ConnectionError(f"the runner's answer is not valid HTTP: {exc}"))
            self.drop()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        if self._answer is not None:
            self._answer._on_headers(self._parser.get_status_code(), self._headers)
        self._headers = []

    def on_body(self, body: bytes) -> None:
        if self._answer is not None:
            self._answer._on_body(body)

    def on_message_complete(self) -> None:
        answer, self._answer = self._answer, None
        if answer is not None:
            answer._on_complete(self._parser.should_keep_alive())
