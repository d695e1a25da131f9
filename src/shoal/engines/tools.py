"""Tool calling for every chat engine, in one place: the runner wraps an engine's chat and
chat_stream with `chat` and `chat_stream` here.

What a request asks for, and what the engine is sent:
- `tool_choice` "required" or a named function: the answer is constrained to one call, a JSON object
  {"name": ..., "arguments": {...}} whose arguments match the function's parameters — sent to the
  engine as a `response_format` json_schema, which llama.cpp, vLLM and the transformers engine all
  enforce with a grammar. This works even on a model whose template knows nothing of tools (the
  functions are then described in a system message) and on a tiny model. A template with tools is
  sent only the functions the call may go to (llama.cpp, given tools and a schema, lets its grammar
  call any tool it was sent), and calls an engine parsed itself are kept only to those functions.
- "auto" (the default when tools are given): the model's own template renders the tools (llama.cpp
  with its Jinja template, transformers' apply_chat_template) and the answer is parsed for calls in
  the common formats (`parse_calls`). A model whose template cannot render tools is refused with a
  400: it would only answer in plain text.
- "none": the tools are not sent at all.
Engines that parse calls themselves (`native_tools`: vLLM launched with a tool parser) get the
request as it came.

For templates without tools, the conversation's assistant tool calls and tool results are written
as plain messages the template can render.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from shoal.errors import InvalidRequest


class ChatEngine(Protocol):
    config: Any
    name: str
    template_tools: bool
    native_tools: bool

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]: ...

    def chat_stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]: ...


@dataclass(frozen=True)
class ToolRequest:
    functions: list[dict[str, Any]]  # each tool's "function": name, description, parameters
    forced: str | None  # None: the model may answer in text ("auto"); "*": any one call; else a name
    parallel: bool

    @property
    def allowed(self) -> list[dict[str, Any]]:
        """The functions the answer may call: all of them, or only the one a tool_choice names."""
        return [f for f in self.functions if self.forced in (None, "*", f["name"])]

    @property
    def allowed_names(self) -> set[str]:
        return {f["name"] for f in self.allowed}


def tool_request(body: dict[str, Any]) -> ToolRequest | None:
    """The request's tools and tool_choice (validated by the gateway), or None for no calls."""
    tools = body.get("tools") or []
    choice: Any = body.get("tool_choice") or "auto"
    if not tools or choice == "none":
        return None
    forced = None if choice == "auto" else "*" if choice == "required" else choice["function"]["name"]
    functions = [t["function"] for t in tools]
    return ToolRequest(functions, forced, body.get("parallel_tool_calls") is not False)


def call_schema(request: ToolRequest) -> dict[str, Any]:
    """The JSON schema of one call to the forced function (or to any of them)."""

    def one(function: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {
                "name": {"const": function["name"]},
                "arguments": function.get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }

    allowed = request.allowed
    return one(allowed[0]) if len(allowed) == 1 else {"anyOf": [one(f) for f in allowed]}


def tools_prompt(functions: list[dict[str, Any]]) -> str:
    """The functions described in a system message, for a template that cannot render tools."""
    signatures = "\n".join(json.dumps({"type": "function", "function": f}) for f in functions)
    return (
        "You can call functions. Their signatures are within <tools></tools>:\n"
        f"<tools>\n{signatures}\n</tools>\n"
        'To call one, answer with only a JSON object: {"name": <function-name>, "arguments": <args-object>}'
    )


def plain_messages(
    messages: list[dict[str, Any]], functions: list[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """The conversation for a template without tools: the functions (if any) in the system message,
    assistant calls as their JSON, tool results as user messages."""
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            calls = [
                {"name": c["function"]["name"], "arguments": _arguments(c["function"]["arguments"])}
                for c in message["tool_calls"]
            ]
            text = "\n".join(json.dumps(c) for c in calls)
            prefix = message.get("content")
            out.append({"role": "assistant", "content": f"{prefix}\n{text}" if prefix else text})
        elif role == "tool":
            out.append(
                {"role": "user", "content": f"Result of call {message.get('tool_call_id')}: {_text(message)}"}
            )
        else:
            out.append({k: v for k, v in message.items() if k not in ("tool_calls", "tool_call_id")})
    if functions:
        prompt = tools_prompt(functions)
        if out and out[0].get("role") in ("system", "developer"):
            out[0] = {**out[0], "role": "system", "content": f"{_text(out[0])}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return content or ""


def _arguments(raw: Any) -> Any:
    """A call's arguments as an object: OpenAI sends them as a JSON string."""
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw


# ---- reading calls out of what a model wrote ----

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)  # Hermes, Qwen 2.5/3
_MISTRAL = "[TOOL_CALLS]"
_LLAMA = "<|python_tag|>"  # Llama 3.1+; Llama 3.2 often writes the bare JSON
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)


@dataclass(frozen=True)
class Call:
    name: str
    arguments: dict[str, Any]


def parse_calls(text: str, names: set[str]) -> tuple[str | None, list[Call]]:
    """(content, calls) from a model's answer: Hermes/Qwen `<tool_call>{...}</tool_call>` (any number),
    Mistral `[TOOL_CALLS][{...}]`, Llama 3 `<|python_tag|>{...}` or bare JSON objects (one, a list,
    or several separated by `;` or new lines, `arguments` or `parameters`), also inside a ```json
    fence. Only calls to functions in `names` with an object of arguments count; an answer that holds
    anything else is content."""
    stripped = text.strip()
    if "<tool_call>" in stripped:
        head, _, rest = stripped.partition("<tool_call>")
        found = [_as_calls(m, names) for m in _HERMES.findall("<tool_call>" + rest)]
        if found and all(found):
            return head.strip() or None, [c for calls in found for c in calls or []]
        return text, []
    for marker in (_MISTRAL, _LLAMA):
        if marker in stripped:
            head, _, rest = stripped.partition(marker)
            calls = _as_calls(rest, names)
            return (head.strip() or None, calls) if calls else (text, [])
    fenced = _FENCE.match(stripped)
    calls = _as_calls(fenced.group(1) if fenced else stripped, names)
    return (None, calls) if calls else (text, [])


def _as_calls(raw: str, names: set[str]) -> list[Call] | None:
    raw = raw.strip()
    if not raw:
        return None
    try:
        values: Any = json.loads(raw)
    except ValueError:
        # several objects one after another (Llama 3 uses ";", others new lines)
        parts = [p for p in re.split(r"\s*;\s*|\n+", raw) if p.strip()]
        if len(parts) < 2:
            return None
        try:
            values = [json.loads(p) for p in parts]
        except ValueError:
            return None
    if not isinstance(values, list):
        values = [values]
    calls = []
    for value in values:
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            return None
        arguments = value.get("arguments", value.get("parameters", {}))
        arguments = _arguments(arguments)
        if value["name"] not in names or not isinstance(arguments, dict):
            return None
        calls.append(Call(value["name"], arguments))
    return calls or None


def openai_calls(calls: list[Call]) -> list[dict[str, Any]]:
    return [
        {
            "id": f"call_{secrets.token_hex(12)}",
            "type": "function",
            "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)},
        }
        for c in calls
    ]


# ---- the wrapper ----


def prepare(engine: ChatEngine, body: dict[str, Any]) -> tuple[dict[str, Any], ToolRequest | None]:
    """The body the engine is sent, and the tool request to read its answer by (None: plain chat)."""
    request = tool_request(body)
    if engine.native_tools:
        return body, None
    out = {k: v for k, v in body.items() if k not in ("tools", "tool_choice", "parallel_tool_calls")}
    if request is None:
        history = any(m.get("tool_calls") or m.get("role") == "tool" for m in body["messages"])
        if history and not engine.template_tools:  # most chats have none: sent as they are
            out["messages"] = plain_messages(body["messages"], None)
        return out, None
    if request.forced is None and not engine.template_tools:
        raise InvalidRequest(
            f"model {engine.config.model_uid!r}'s chat template cannot express tools, so it would only "
            'answer in text: send tool_choice "required" or a named function (the answer is then '
            "constrained to a call), or use a model whose template has tools"
            + (" (vLLM: launch with the tool_call_parser option)" if engine.name == "vllm" else "")
        )
    if engine.template_tools:
        # Rendered by the model's own template. A forced call sends only the functions it may call:
        # given tools and a schema together, llama.cpp switches to its generic format, whose grammar
        # also lets the model call any tool it was sent.
        names = request.allowed_names
        out["tools"] = [t for t in body["tools"] if t["function"]["name"] in names]
    else:
        out["messages"] = plain_messages(body["messages"], request.functions)
    if request.forced is not None:
        schema = call_schema(request)
        out["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "tool_call", "schema": schema},
        }
    return out, request


def _read(text: str, request: ToolRequest) -> tuple[str | None, list[Call]]:
    content, calls = parse_calls(text, request.allowed_names)
    if calls and not request.parallel:
        calls = calls[:1]
    return content, calls


def _found(calls: list[dict[str, Any]], request: ToolRequest) -> list[dict[str, Any]]:
    """The calls an engine parsed itself, as the request allows them: only functions it may call,
    one when parallel_tool_calls is false."""
    names = request.allowed_names
    kept = [c for c in calls if (c.get("function") or {}).get("name") in names]
    return kept if request.parallel else kept[:1]


async def chat(engine: ChatEngine, body: dict[str, Any]) -> dict[str, Any]:
    sent, request = prepare(engine, body)
    result = await engine.chat(sent)
    if request is None:
        return result
    for choice in result.get("choices") or []:
        message = choice.get("message") or {}
        if message.get("tool_calls"):  # the engine found them itself
            kept = _found(message["tool_calls"], request)
            choice["message"] = {**message, "tool_calls": kept or None}
            if not kept:
                choice["finish_reason"] = "stop"
            continue
        content, calls = _read(message.get("content") or "", request)
        if calls:
            choice["message"] = {**message, "content": content, "tool_calls": openai_calls(calls)}
            choice["finish_reason"] = "tool_calls"
    return result


_MARKERS = ("<tool_call>", _MISTRAL, _LLAMA, "{", "[", "```")


@dataclass
class _Held:
    """One choice's streamed text while it may still turn out to be a call."""

    text: list[str] = field(default_factory=list)
    passing: bool = False  # decided: plain text, sent as it comes

    def might_be_call(self, forced: bool) -> bool:
        if forced:
            return True
        start = "".join(self.text).lstrip()
        return not start or any(start.startswith(m) or m.startswith(start) for m in _MARKERS)


async def chat_stream(engine: ChatEngine, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """The engine's chunks, except that a choice's text that may be a call is held until the choice
    ends, then sent as tool-call deltas in OpenAI's shape (or as the text it was)."""
    sent, request = prepare(engine, body)
    chunks = engine.chat_stream(sent)
    if request is None:
        async for chunk in chunks:
            yield chunk
        return
    held: dict[int, _Held] = {}
    try:
        async for chunk in chunks:
            if not chunk.get("choices"):  # the usage chunk
                yield chunk
                continue
            # each choice's deltas in order; a chunk carries at most one delta per choice
            rows: list[list[dict[str, Any]]] = []
            for choice in chunk["choices"]:
                for i, part in enumerate(_pass_or_hold(choice, held, request)):
                    if i == len(rows):
                        rows.append([])
                    rows[i].append(part)
            for row in rows:
                yield {**chunk, "choices": row}
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]


def _pass_or_hold(
    choice: dict[str, Any], held: dict[int, _Held], request: ToolRequest
) -> list[dict[str, Any]]:
    state = held.setdefault(choice.get("index", 0), _Held())
    delta = choice.get("delta") or {}
    if state.passing or delta.get("tool_calls"):
        return [choice]
    if text := delta.get("content"):
        state.text.append(text)
        if not state.might_be_call(request.forced is not None):
            state.passing = True
            return [{**choice, "delta": {**delta, "content": "".join(state.text)}}]
        delta = {k: v for k, v in delta.items() if k != "content"}
    if choice.get("finish_reason") is not None:
        return _ending(choice, delta, state, request)
    return [{**choice, "delta": delta}] if delta else []


def _ending(
    choice: dict[str, Any], delta: dict[str, Any], state: _Held, request: ToolRequest
) -> list[dict[str, Any]]:
    """A held choice's last chunks: its calls, one delta each (id, name and the whole arguments), and
    the finish; or its text and the finish it had."""
    content, calls = _read("".join(state.text), request)
    if not calls:
        text = "".join(state.text)
        return [{**choice, "delta": {**delta, "content": text} if text else delta}]
    out = []
    if content:
        out.append({**choice, "delta": {"content": content}, "finish_reason": None})
    for i, call in enumerate(openai_calls(calls)):
        out.append({**choice, "delta": {"tool_calls": [{"index": i, **call}]}, "finish_reason": None})
    out.append({**choice, "delta": delta, "finish_reason": "tool_calls"})
    return out
