"""Forward an inference request to a ready replica (Unix socket here, TCP on a Ray node), streaming
included.

Bodies pass through as bytes. A runner that dies mid-request turns into a 503 (or, once a stream has
started, an in-band SSE error event, after the stream's own x-shoal-replica header); one that sends
no byte within the first-byte deadline into a 504; never a hang. Both carry x-shoal-replica. The
replica is leased for as long as its answer is being read.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass

from shoal.errors import ModelUnavailable, RequestTimeout, ShoalError
from shoal.services.models import ModelService
from shoal.services.replicas import Replica
from shoal.services.router import gone_message


@dataclass
class Forwarded:
    status: int
    replica: int
    media_type: str = "application/json"
    body: bytes | None = None  # a whole JSON answer
    stream: AsyncIterator[bytes] | None = None  # SSE bytes, chunk by chunk
    close: Callable[[], Awaitable[None]] | None = None  # idempotent; call when the client is gone


JSON_HEADERS = {"content-type": "application/json"}


def _failure(
    service: ModelService, uid: str, replica: Replica, exc: BaseException, wait: float
) -> ShoalError:
    """The 504 or 503 for a runner that failed this request, naming its replica (the answer's
    x-shoal-replica header, as on a success), so a client can tell which one failed."""
    error: ShoalError
    if isinstance(exc, TimeoutError):
        error = RequestTimeout(f"model {uid!r} sent no answer within {wait:.0f} s")
    else:
        service.notice_unreachable(uid, replica)
        error = ModelUnavailable(gone_message(uid, replica, type(exc).__name__), retry_after=2)
    error.replica = replica.index
    return error


def _sse_error(error: ShoalError) -> bytes:
    payload = {"error": {"message": error.message, "type": error.type, "code": error.code}}
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


async def forward(
    service: ModelService,
    uid: str,
    path: str,
    body: bytes,
    stream: bool,
    method: str = "POST",
    headers: dict[str, str] | None = None,
) -> Forwarded:
    """Send `body` to a ready replica of `uid`. JSON by default; binary uploads pass their own
    content type and their fields as a JSON `x-shoal-params` header. Bounded by the server's
    request timeout (the whole answer) and first-byte timeout (each wait for bytes)."""
    timeout = service.settings.request_timeout
    first_byte = min(timeout, service.settings.first_byte_timeout)
    async with AsyncExitStack() as held:
        replica = await held.enter_async_context(service.router.lease(uid))
        runner = replica.runner
        assert runner is not None
        try:
            answer = await runner.http.request(
                method, path, body, headers or JSON_HEADERS, timeout=timeout, first_byte=first_byte
            )
        except (TimeoutError, OSError) as exc:  # ConnectionError is an OSError
            raise _failure(service, uid, replica, exc, first_byte) from exc
        held.callback(answer.close)
        if not stream or answer.status != 200:
            try:
                content = await answer.read()
            except (TimeoutError, OSError) as exc:
                raise _failure(service, uid, replica, exc, first_byte) from exc
            return Forwarded(answer.status, replica.index, answer.content_type, body=content)

        lease = held.pop_all()  # from here the stream holds the replica until close()
        closed = False

        async def close() -> None:
            nonlocal closed
            if not closed:
                closed = True
                answer.close()  # drops the connection: the runner sees the client go and stops generating
                await lease.aclose()

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for chunk in answer.chunks():
                    yield chunk
            except (TimeoutError, OSError) as exc:
                yield _sse_error(_failure(service, uid, replica, exc, first_byte))
            finally:
                await close()

        return Forwarded(200, replica.index, answer.content_type, stream=chunks(), close=close)
    raise AssertionError("unreachable")  # pragma: no cover - the block returns or raises
