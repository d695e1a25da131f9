"""Forward an inference request to a ready replica over its Unix socket, streaming included.

Bodies pass through as bytes; a runner that dies mid-request turns into a 503 (or, once a stream
has started, an in-band SSE error event), never a hang.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp

from shoal.errors import ModelUnavailable, RequestTimeout
from shoal.services.models import ModelService


@dataclass
class Forwarded:
    status: int
    replica: int
    media_type: str = "application/json"
    body: bytes | None = None  # a whole JSON answer
    stream: AsyncIterator[bytes] | None = None  # SSE bytes, chunk by chunk
    close: Callable[[], Awaitable[None]] | None = None  # idempotent; call when the client is gone


def _runner_gone(uid: str, exc: BaseException) -> ModelUnavailable:
    return ModelUnavailable(
        f"model {uid!r} stopped answering ({type(exc).__name__}); it is being restarted", retry_after=2
    )


async def forward(
    service: ModelService,
    uid: str,
    path: str,
    body: bytes,
    stream: bool,
    timeout: float,
    method: str = "POST",
    headers: dict[str, str] | None = None,
) -> Forwarded:
    """Send `body` to a ready replica of `uid`. JSON by default; binary uploads pass their own
    content type and their fields as a JSON `x-shoal-params` header."""
    replica = await service.checkout(uid)
    assert replica.runner is not None
    try:
        response = await replica.runner.session.request(
            method,
            path,
            data=body,
            headers=headers or {"content-type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=5),
        )
    except TimeoutError as exc:
        service.release(uid, replica)
        raise RequestTimeout(f"model {uid!r} did not answer within {timeout:.0f} s") from exc
    except aiohttp.ClientError as exc:
        service.release(uid, replica)
        service.notice_unreachable(uid, replica)
        raise _runner_gone(uid, exc) from exc
    if not stream or response.status != 200:
        try:
            content = await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _runner_gone(uid, exc) from exc
        finally:
            response.release()
            service.release(uid, replica)
        return Forwarded(response.status, replica.index, response.content_type, body=content)

    closed = False

    async def close() -> None:
        nonlocal closed
        if not closed:
            closed = True
            response.close()  # drops the connection: the runner sees the client go and stops generating
            service.release(uid, replica)

    async def chunks() -> AsyncIterator[bytes]:
        try:
            async for chunk in response.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            error = _runner_gone(uid, exc)
            payload = {"error": {"message": error.message, "type": error.type, "code": error.code}}
            yield b"data: " + json.dumps(payload).encode() + b"\n\n"
        finally:
            await close()

    return Forwarded(200, replica.index, response.content_type, stream=chunks(), close=close)
