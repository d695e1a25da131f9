"""What a runner sends back, read in one place for every API family that translates it (Ollama,
Anthropic): its OpenAI SSE stream as chunk dicts, and its OpenAI-shaped errors, whole or in-band,
as ShoalErrors with the status they stand for."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson

from shoal.errors import InvalidRequest, ModelUnavailable, RequestTimeout, ShoalError
from shoal.services.proxy import Forwarded


async def sse_chunks(stream: AsyncIterator[bytes]) -> AsyncIterator[dict[str, Any]]:
    """The data payloads of an SSE byte stream, however its pieces are cut, up to `[DONE]`. An
    in-band error event is yielded like any chunk (it holds an "error" key)."""
    buffer = b""
    async for piece in stream:
        buffer += piece
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            for line in event.splitlines():
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                yield orjson.loads(data)


def upstream_error(error: Any) -> ShoalError:
    """An OpenAI error object (an in-band SSE event's, or a whole answer's) as the error it stands for."""
    if not isinstance(error, dict):
        return ShoalError(str(error))
    message = str(error.get("message") or error)
    if error.get("code") == "model_unavailable":
        return ModelUnavailable(message)
    if error.get("code") == "timeout":
        return RequestTimeout(message)
    if error.get("type") == "invalid_request_error":
        return InvalidRequest(message)
    return ShoalError(message)


def runner_error(result: Forwarded) -> ShoalError:
    """A runner's whole refusal (not 200) as an error with its message and the runner's own status."""
    try:
        found = orjson.loads(result.body or b"{}").get("error")
    except (orjson.JSONDecodeError, AttributeError):  # not JSON, or not an object
        found = None
    text = (result.body or b"").decode("utf-8", "replace")[:1000]
    message = upstream_error(found).message if found else text
    error = ShoalError(message or f"the runner answered {result.status}")
    error.status = result.status
    return error
