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
from dataclasses import dataclass, field
from typing import Any

from shoal.errors import InvalidRequest
from shoal.gateway.upstream import sse_chunks, upstream_error
from shoal.protocol.anthropic import (
    CountTokensRequest,
    ImageBlock,
    MessagesRequest,
    TextBlock,
    ToolResultBlock,
    ToolUseBlock,
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


def _content(blocks: list[Any], vision: bool) -> str | list[dict[str, Any]]:
    """Text and image blocks as a message's content: a string when it is all text (blocks joined by
    a blank line), else OpenAI content parts."""
    if any(block.type == "image" for block in blocks):
        if not vision:
            raise InvalidRequest(
                "this model cannot read images (it has no vision ability, or it is a GGUF build, which "
                "Shoal's llama.cpp engine runs without an image projector): send text only"
            )
        return [
            {"type": "text", "text": b.text} if isinstance(b, TextBlock) else _image_part(b) for b in blocks
        ]
    return "\n\n".join(block.text for block in blocks)


def _tool_result(block: ToolResultBlock) -> dict[str, Any]:
    content = block.content
    if isinstance(content, list):
        if any(b.type == "image" for b in content):
            raise InvalidRequest("a tool_result with an image is not supported: send its text")
        content = "\n\n".join(b.text for b in content if isinstance(b, TextBlock))
    text = content or ""
    return {
        "role": "tool",
        "tool_call_id": block.tool_use_id,
        "content": f"Error: {text}" if block.is_error else text,
    }


def _message(role: str, content: str | list[Any], vision: bool) -> list[dict[str, Any]]:
    """One Anthropic message as OpenAI ones: an assistant's tool_use blocks become its tool_calls;
    a user's tool_result blocks become tool messages (first, as OpenAI orders them), its other
    blocks the user message after them."""
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    uses = [b for b in content if isinstance(b, ToolUseBlock)]
    results = [b for b in content if isinstance(b, ToolResultBlock)]
    rest = [b for b in content if not isinstance(b, ToolUseBlock | ToolResultBlock)]
    if role == "user" and uses or role == "assistant" and results:
        kind = "tool_use" if uses else "tool_result"
        raise InvalidRequest(f"a {role} message cannot hold a {kind} block")
    out = [_tool_result(b) for b in results]
    if uses:
        calls = [
            {"id": b.id, "type": "function", "function": {"name": b.name, "arguments": json.dumps(b.input)}}
            for b in uses
        ]
        out.append(
            {"role": "assistant", "content": _content(rest, vision) if rest else None, "tool_calls": calls}
        )
    elif rest or not results:
        out.append({"role": role, "content": _content(rest, vision)})
    return out


def _tools(body: CountTokensRequest) -> dict[str, Any]:
    """The OpenAI tools and tool_choice for Anthropic's."""
    out: dict[str, Any] = {}
    choice = body.tool_choice
    if body.tools:
        for tool in body.tools:
            kind = (tool.model_extra or {}).get("type")
            if kind not in (None, "custom"):
                raise InvalidRequest(f"tool {tool.name!r}: server tools ({kind}) are not available in Shoal")
        out["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": tool.name,
                    **({"description": tool.description} if tool.description else {}),
                    "parameters": tool.input_schema or {"type": "object"},
                },
            }
            for tool in body.tools
        ]
    if choice is not None:
        if not body.tools:
            if choice.type != "none":
                raise InvalidRequest("tool_choice needs tools")
            return out
        if choice.type == "tool":
            if not choice.name:
                raise InvalidRequest('tool_choice {"type": "tool"} needs the name of the tool')
            out["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        else:
            out["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
        if choice.disable_parallel_tool_use:
            out["parallel_tool_calls"] = False
    return out


def chat_messages(body: CountTokensRequest, vision: bool) -> list[dict[str, Any]]:
    """The conversation as OpenAI chat messages, the system prompt first."""
    if body.thinking is not None and body.thinking.type not in ("disabled", "adaptive"):
        raise InvalidRequest(
            f"thinking {body.thinking.type!r} is not available in Shoal: no model here thinks"
        )
    messages: list[dict[str, Any]] = []
    system = body.system if isinstance(body.system, str) else "\n\n".join(b.text for b in body.system or [])
    if system:
        messages.append({"role": "system", "content": system})
    for message in body.messages:
        messages.extend(_message(message.role, message.content, vision))
    return messages


def chat_body(body: MessagesRequest, vision: bool) -> dict[str, Any]:
    """The runner's streamed chat request for a Messages request (stop sequences stay here)."""
    chat: dict[str, Any] = {
        "model": body.model,
        "messages": chat_messages(body, vision),
        **_tools(body),
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
    tools = _tools(body)
    if tools.get("tools") and tools.get("tool_choice") != "none":  # the same prompt; never refused
        tools["tool_choice"] = "required"
    return {
        "model": body.model,
        "messages": chat_messages(body, vision),
        **tools,
        "max_tokens": 1,
        "temperature": 0,
    }


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
    calls: dict[int, dict[str, str]] = field(default_factory=dict)  # tool calls: id, name, arguments

    def add_call(self, delta: dict[str, Any]) -> None:
        call = self.calls.setdefault(int(delta.get("index", 0)), {"id": "", "name": "", "arguments": ""})
        call["id"] = delta.get("id") or call["id"]
        function = delta.get("function") or {}
        call["name"] += function.get("name") or ""
        call["arguments"] += function.get("arguments") or ""


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
            for call in (choice.get("delta") or {}).get("tool_calls") or []:
                outcome.add_call(call)
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


TEXT_START = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
PING = {"type": "ping"}


def text_delta(text: str) -> dict[str, Any]:
    return {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}


def tool_use_events(outcome: Outcome, first: int) -> list[dict[str, Any]]:
    """Each tool call as a tool_use block, from index `first`: its start, its input as one
    input_json_delta, its stop."""
    events: list[dict[str, Any]] = []
    for index, (_, call) in enumerate(sorted(outcome.calls.items()), start=first):
        block_id = call["id"] or f"toolu_{uuid.uuid4().hex[:24]}"
        block = {"type": "tool_use", "id": block_id, "name": call["name"], "input": {}}
        delta = {"type": "input_json_delta", "partial_json": call["arguments"] or "{}"}
        events += [
            {"type": "content_block_start", "index": index, "content_block": block},
            {"type": "content_block_delta", "index": index, "delta": delta},
            {"type": "content_block_stop", "index": index},
        ]
    return events


def closing_events(outcome: Outcome, text_open: bool) -> list[dict[str, Any]]:
    """The end of the message: the text block's stop (the text block is opened at the first text;
    an answer with neither text nor calls still has an empty one), the tool_use blocks after it."""
    usage = {"input_tokens": outcome.input_tokens or 0, "output_tokens": outcome.output_tokens}
    delta = {"stop_reason": outcome.stop_reason, "stop_sequence": outcome.stop_sequence}
    text = [] if text_open or outcome.calls else [TEXT_START]
    if text_open or not outcome.calls:
        text.append({"type": "content_block_stop", "index": 0})
    return [
        *text,
        *tool_use_events(outcome, first=1 if text_open else 0),
        {"type": "message_delta", "delta": delta, "usage": usage},
        {"type": "message_stop"},
    ]


def encode_sse(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n".encode()


async def collect(events: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    """One message from a stream of events (a non-streamed answer)."""
    message: dict[str, Any] = {}
    blocks: dict[int, dict[str, Any]] = {}
    inputs: dict[int, list[str]] = {}
    async for event in events:
        if event["type"] == "message_start":
            message = dict(event["message"])
        elif event["type"] == "content_block_start":
            blocks[event["index"]] = dict(event["content_block"])
        elif event["type"] == "content_block_delta":
            delta = event["delta"]
            if delta["type"] == "text_delta":
                blocks[event["index"]]["text"] += delta["text"]
            else:
                inputs.setdefault(event["index"], []).append(delta["partial_json"])
        elif event["type"] == "message_delta":
            message.update(event["delta"])
            message["usage"] = event["usage"]
    for index, parts in inputs.items():
        try:
            blocks[index]["input"] = json.loads("".join(parts))
        except ValueError:
            blocks[index]["input"] = {"arguments": "".join(parts)}  # not JSON: kept, not lost
    message["content"] = [blocks[i] for i in sorted(blocks)]
    return message
