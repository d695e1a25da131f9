"""Pure translation between Anthropic's Messages API and the OpenAI-shaped chat API of the runners.

Request: `chat_body` turns a Messages request into a `/v1/chat/completions` body (always streamed,
with the final usage). Answer: `parse_sse` reads the runner's SSE into chunk dicts, `texts` turns
them into text deltas while matching `stop_sequences` and filling an `Outcome`; the event builders
make Anthropic's stream events, `encode_sse` writes them as Anthropic does (`event:` and `data:`
lines) and `collect` folds them into one message for a non-streamed answer.

Stop sequences are matched here rather than by the engine, because the runners' OpenAI answer says
only `finish_reason: "stop"` and not whether, or which, stop string ended the text; Anthropic's
answer names it. Text that may be the start of a stop sequence is held back until it is not.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

from shoal.errors import InvalidRequest
from shoal.gateway.upstream import sse_chunks, upstream_error
from shoal.protocol.anthropic import CountTokensRequest, ImageBlock, MessagesRequest, TextBlock

NO_TOOLS = (
    "tool calling is not available in Shoal yet: send the request without `tools` "
    "(or with tool_choice {'type': 'none'})"
)
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    507: "overloaded_error",
    529: "overloaded_error",
}


def error_body(status: int, message: str) -> dict[str, Any]:
    """Anthropic's error shape for an HTTP status."""
    default = "invalid_request_error" if status < 500 else "api_error"
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, default), "message": message}}


# ---- request -------------------------------------------------------------------------------------
def _image_part(block: ImageBlock) -> dict[str, Any]:
    source = block.source
    url = source.url if source.type == "url" else f"data:{source.media_type};base64,{source.data}"
    return {"type": "image_url", "image_url": {"url": url}}


def _content(content: str | list[Any], vision: bool) -> str | list[dict[str, Any]]:
    """A message's content: a string when it is all text (blocks joined by a blank line), else
    OpenAI content parts."""
    if isinstance(content, str):
        return content
    if any(block.type in ("tool_use", "tool_result") for block in content):
        raise InvalidRequest(f"tool_use and tool_result blocks need tool calling; {NO_TOOLS}")
    if any(block.type == "image" for block in content):
        if not vision:
            raise InvalidRequest("this model cannot read images (it has no vision ability): send text only")
        return [
            {"type": "text", "text": b.text} if isinstance(b, TextBlock) else _image_part(b) for b in content
        ]
    return "\n\n".join(block.text for block in content)


def chat_messages(body: CountTokensRequest, vision: bool) -> list[dict[str, Any]]:
    """The conversation as OpenAI chat messages, the system prompt first."""
    if body.tools and (body.tool_choice is None or body.tool_choice.type != "none"):
        raise InvalidRequest(NO_TOOLS)
    if body.tool_choice is not None and body.tool_choice.type != "none":
        raise InvalidRequest(NO_TOOLS)
    if body.thinking is not None and body.thinking.type not in ("disabled", "adaptive"):
        raise InvalidRequest(
            f"thinking {body.thinking.type!r} is not available in Shoal: no model here thinks"
        )
    messages: list[dict[str, Any]] = []
    system = body.system if isinstance(body.system, str) else "\n\n".join(b.text for b in body.system or [])
    if system:
        messages.append({"role": "system", "content": system})
    for message in body.messages:
        messages.append({"role": message.role, "content": _content(message.content, vision)})
    return messages


def chat_body(body: MessagesRequest, vision: bool) -> dict[str, Any]:
    """The runner's streamed chat request for a Messages request (stop sequences stay here)."""
    chat: dict[str, Any] = {
        "model": body.model,
        "messages": chat_messages(body, vision),
        "max_tokens": body.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    for name in ("temperature", "top_p", "top_k"):
        if (value := getattr(body, name)) is not None:
            chat[name] = value
    if body.container is not None:
        raise InvalidRequest("`container` is not available in Shoal: there is no code execution")
    if body.output_config is not None and body.output_config.format is not None:
        schema = body.output_config.format.schema_
        chat["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    return chat


def count_body(body: CountTokensRequest, vision: bool) -> dict[str, Any]:
    """A one-token chat request whose usage.prompt_tokens is the prompt's length in the model's own
    tokens, chat template included (the runners have no tokenize-only route)."""
    return {"model": body.model, "messages": chat_messages(body, vision), "max_tokens": 1, "temperature": 0}


# ---- answer --------------------------------------------------------------------------------------
async def parse_sse(stream: AsyncIterator[bytes]) -> AsyncIterator[dict[str, Any]]:
    """The runner's OpenAI SSE as chunk dicts, up to `[DONE]`; an in-band error raises ShoalError."""
    async for chunk in sse_chunks(stream):
        if isinstance(chunk.get("error"), dict):
            raise upstream_error(chunk["error"])
        yield chunk


class StopMatcher:
    """Finds the first stop sequence in streamed text; holds back a tail that may begin one."""

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """(text that is safe to send, the stop sequence found or None)."""
        self.held += text
        found = [(self.held.find(s), s) for s in self.stops if s in self.held]
        if found:
            at, stop = min(found)
            safe, self.held = self.held[:at], ""
            return safe, stop
        keep = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.held)), keep, -1):
                if self.held.endswith(stop[:n]):
                    keep = n
                    break
        safe = self.held[: len(self.held) - keep]
        self.held = self.held[len(self.held) - keep :]
        return safe, None

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


@dataclass
class Outcome:
    """How the answer ended, filled in by `texts`."""

    stop_reason: str = "end_turn"
    stop_sequence: str | None = None
    input_tokens: int | None = None
    output_tokens: int = 0
    streamed_tokens: int = 0  # content chunks seen: one token each from the chat engines


async def texts(
    chunks: AsyncIterator[dict[str, Any]], stops: Iterable[str], outcome: Outcome
) -> AsyncIterator[str]:
    """The answer's text deltas. Ends at the first stop sequence (the caller then closes the
    runner's stream: its usage never comes, so output tokens are the tokens streamed)."""
    matcher = StopMatcher(stops)
    async for chunk in chunks:
        if usage := chunk.get("usage"):
            outcome.input_tokens = usage.get("prompt_tokens")
            outcome.output_tokens = usage.get("completion_tokens") or 0
        for choice in chunk.get("choices") or []:
            content = (choice.get("delta") or {}).get("content")
            if content:
                outcome.streamed_tokens += 1
                safe, stop = matcher.feed(content)
                if safe:
                    yield safe
                if stop is not None:
                    outcome.stop_reason, outcome.stop_sequence = "stop_sequence", stop
                    outcome.output_tokens = outcome.streamed_tokens
                    return
            if reason := choice.get("finish_reason"):
                outcome.stop_reason = STOP_REASONS.get(reason, "end_turn")
    if held := matcher.flush():
        yield held
    if not outcome.output_tokens:
        outcome.output_tokens = outcome.streamed_tokens


def new_message_id() -> str:
    return "msg_" + uuid.uuid4().hex[:24]


def message_start(message_id: str, model: str) -> dict[str, Any]:
    """The first event; input tokens are known only at the end (message_delta carries them)."""
    message: dict[str, Any] = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "content": [],
        "model": model,
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 0, "output_tokens": 0},
    }
    return {"type": "message_start", "message": message}


def opening_events() -> list[dict[str, Any]]:
    return [
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
    ]


def text_delta(text: str) -> dict[str, Any]:
    return {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}


def closing_events(outcome: Outcome) -> list[dict[str, Any]]:
    usage = {"input_tokens": outcome.input_tokens or 0, "output_tokens": outcome.output_tokens}
    delta = {"stop_reason": outcome.stop_reason, "stop_sequence": outcome.stop_sequence}
    return [
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": delta, "usage": usage},
        {"type": "message_stop"},
    ]


def encode_sse(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n".encode()


async def collect(events: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    """One message from a stream of events (a non-streamed answer)."""
    message: dict[str, Any] = {}
    parts: list[str] = []
    async for event in events:
        if event["type"] == "message_start":
            message = dict(event["message"])
        elif event["type"] == "content_block_delta":
            parts.append(event["delta"]["text"])
        elif event["type"] == "message_delta":
            message.update(event["delta"])
            message["usage"] = event["usage"]
    message["content"] = [{"type": "text", "text": "".join(parts)}]
    return message
