"""The Anthropic Messages API through the real `anthropic` SDK against the session server's chat model."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import pytest

from conftest import CHAT_MODEL, ShoalServer
from shoal.gateway.anthropic_translate import StopMatcher

pytestmark = pytest.mark.usefixtures("chat_server")
T0 = {"temperature": 0}  # the SDK has no sampling arguments; the API still takes them
COUNT = [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]


@pytest.fixture
def client(server: ShoalServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


def test_message_has_text_stop_reason_and_usage(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model=CHAT_MODEL,
        max_tokens=48,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        extra_body=T0,
    )
    assert message.id.startswith("msg_")
    assert message.type == "message" and message.role == "assistant" and message.model == CHAT_MODEL
    assert message.content[0].type == "text" and message.content[0].text.strip()
    assert message.stop_reason in ("end_turn", "max_tokens") and message.stop_sequence is None
    assert message.usage.input_tokens > 5
    assert 0 < message.usage.output_tokens <= 48


def test_system_prompt_and_turns_reach_the_model(client: anthropic.Anthropic) -> None:
    turns: list[anthropic.types.MessageParam] = [
        {"role": "user", "content": "My name is Alice."},
        {"role": "assistant", "content": [{"type": "text", "text": "Nice to meet you, Alice."}]},
        {"role": "user", "content": "What is my name?"},
    ]

    def ask(messages: list[anthropic.types.MessageParam], system: Any) -> anthropic.types.Message:
        return client.messages.create(
            model=CHAT_MODEL, max_tokens=16, messages=messages, system=system, extra_body=T0
        )

    one = ask(turns[-1:], "Answer briefly.")
    three = ask(turns, "Answer briefly.")
    longer = ask(turns, "Answer briefly, in one short sentence, and be kind.")
    blocks = ask(turns, [{"type": "text", "text": "Answer briefly."}])
    # the earlier turns and the system prompt are read: the prompt grows with each
    assert three.usage.input_tokens >= one.usage.input_tokens + 12
    assert longer.usage.input_tokens >= three.usage.input_tokens + 8
    assert blocks.usage.input_tokens == three.usage.input_tokens
    assert blocks.content[0].text == three.content[0].text


def test_stop_sequence_ends_the_text_and_is_named(client: anthropic.Anthropic) -> None:
    free = client.messages.create(model=CHAT_MODEL, max_tokens=40, messages=COUNT, extra_body=T0)
    text = free.content[0].text
    assert "5" in text, text
    stopped = client.messages.create(
        model=CHAT_MODEL, max_tokens=40, messages=COUNT, extra_body=T0, stop_sequences=["never", "5"]
    )
    assert stopped.content[0].text == text[: text.index("5")]
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "5"
    assert stopped.usage.input_tokens == free.usage.input_tokens
    assert 0 < stopped.usage.output_tokens < free.usage.output_tokens


def test_max_tokens_bounds_the_answer(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model=CHAT_MODEL,
        max_tokens=3,
        messages=[{"role": "user", "content": "Write a long story about a dragon."}],
        extra_body=T0,
    )
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 3


def test_max_tokens_zero_reads_the_prompt_only(client: anthropic.Anthropic) -> None:
    counted = client.messages.count_tokens(model=CHAT_MODEL, messages=COUNT)
    message = client.messages.create(model=CHAT_MODEL, max_tokens=0, messages=COUNT)
    assert message.content[0].text == "" and message.stop_reason == "max_tokens"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (counted.input_tokens, 0)


def test_output_format_constrains_the_answer_to_the_schema(client: anthropic.Anthropic) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    message = client.messages.create(
        model=CHAT_MODEL,
        max_tokens=24,
        messages=[{"role": "user", "content": "What is 2 + 2? Answer in JSON."}],
        output_config={"format": {"type": "json_schema", "schema": schema}},
        extra_body=T0,
    )
    answer = json.loads(message.content[0].text)
    assert set(answer) == {"answer"} and isinstance(answer["answer"], int)


def test_stream_gives_text_and_the_final_message(client: anthropic.Anthropic) -> None:
    whole = client.messages.create(model=CHAT_MODEL, max_tokens=12, messages=COUNT, extra_body=T0)
    with client.messages.stream(model=CHAT_MODEL, max_tokens=12, messages=COUNT, extra_body=T0) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1
    assert "".join(pieces) == final.content[0].text == whole.content[0].text
    assert final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 12
    assert final.usage.input_tokens == whole.usage.input_tokens


def test_stream_speaks_anthropics_event_types(server: ShoalServer) -> None:
    body = {"model": CHAT_MODEL, "max_tokens": 4, "stream": True, "messages": COUNT, "stop_sequences": [","]}
    with server.http.stream("POST", "/v1/messages", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("event: ") for line in response.iter_lines() if line.startswith("event:")]
    # the text block opens at the first text (an answer may be only tool_use blocks)
    assert events[:3] == ["message_start", "ping", "content_block_start"]
    assert events[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(events[3:-3]) <= {"content_block_delta"}


def test_streamed_stop_sequence(client: anthropic.Anthropic) -> None:
    with client.messages.stream(
        model=CHAT_MODEL, max_tokens=40, messages=COUNT, extra_body=T0, stop_sequences=["5"]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert "5" not in text and text == final.content[0].text
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == "5"
    assert final.usage.input_tokens > 5


def test_count_tokens_matches_the_prompt_of_a_message(client: anthropic.Anthropic) -> None:
    counted = client.messages.count_tokens(model=CHAT_MODEL, messages=COUNT, system="Be brief.")
    message = client.messages.create(model=CHAT_MODEL, max_tokens=2, messages=COUNT, system="Be brief.")
    assert counted.input_tokens == message.usage.input_tokens > 5


def test_unknown_model_is_not_found(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.create(model="no-such-model", max_tokens=8, messages=COUNT)
    assert caught.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    assert "no-such-model" in caught.value.message
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="no-such-model", messages=COUNT)


def test_bad_bodies_are_invalid_requests(server: ShoalServer, client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model=CHAT_MODEL, max_tokens=-1, messages=COUNT)
    assert caught.value.body == {  # Anthropic's error shape
        "type": "error",
        "error": {"type": "invalid_request_error", "message": caught.value.body["error"]["message"]},  # type: ignore[index]
    }
    assert "max_tokens" in caught.value.message
    cases = [
        {"model": CHAT_MODEL, "messages": COUNT},  # no max_tokens
        {"model": CHAT_MODEL, "max_tokens": 8, "messages": [{"role": "system", "content": "x"}]},
        {"model": CHAT_MODEL, "max_tokens": 8, "messages": COUNT, "temperature": 1.5},
        {"model": CHAT_MODEL, "max_tokens": 8, "messages": COUNT, "no_such_field": 1},
        {
            "model": CHAT_MODEL,
            "max_tokens": 8,
            "messages": COUNT,
            "thinking": {"type": "enabled", "budget_tokens": 1024},
        },
        {"model": CHAT_MODEL, "max_tokens": 8, "messages": COUNT, "container": "c1"},
        {
            "model": CHAT_MODEL,
            "max_tokens": 8,
            "messages": [{"role": "user", "content": [{"type": "video"}]}],
        },
    ]
    for body in cases:
        response = server.http.post("/v1/messages", json=body)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["type"] == "error"
        assert response.json()["error"]["type"] == "invalid_request_error"
    not_json = server.http.post("/v1/messages", content=b"{", headers={"content-type": "application/json"})
    assert not_json.status_code == 400 and "JSON" in not_json.json()["error"]["message"]
    too_long = server.http.post(
        "/v1/messages", json={"model": CHAT_MODEL, "max_tokens": 100_000, "messages": COUNT}
    )
    assert too_long.status_code == 400 and "max_tokens" in too_long.json()["error"]["message"]


WEATHER_TOOL = {
    "name": "get_weather",
    "description": "The current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
    },
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_tool_comes_back_as_a_tool_use_block(client: anthropic.Anthropic, stream: bool) -> None:
    choice = {"type": "tool", "name": "get_weather"}
    args: dict[str, Any] = {"model": CHAT_MODEL, "max_tokens": 60, "messages": ASK_WEATHER,
                            "tools": [WEATHER_TOOL], "tool_choice": choice, "extra_body": T0}  # fmt: skip
    if stream:
        with client.messages.stream(**args) as events:
            message = events.get_final_message()
    else:
        message = client.messages.create(**args)
    assert message.stop_reason == "tool_use"
    (use,) = [b for b in message.content if b.type == "tool_use"]
    assert use.name == "get_weather" and set(use.input) == {"city", "unit"}  # type: ignore[arg-type]
    assert use.input["unit"] in ("celsius", "fahrenheit")  # type: ignore[index]
    assert not [b for b in message.content if b.type == "text" and not b.text]  # no empty text block
    # the call and its result go back to the model
    history: list[anthropic.types.MessageParam] = [
        *ASK_WEATHER,  # type: ignore[list-item]
        {"role": "assistant", "content": [use.model_dump()]},  # type: ignore[list-item]
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny, 21 C"}],
        },
    ]
    answer = client.messages.create(model=CHAT_MODEL, max_tokens=16, messages=history, tools=[WEATHER_TOOL],  # type: ignore[list-item]
                                    tool_choice={"type": "none"}, extra_body=T0)  # fmt: skip
    assert answer.content[0].type == "text" and answer.content[0].text
    counted = client.messages.count_tokens(model=CHAT_MODEL, messages=history, tools=[WEATHER_TOOL])  # type: ignore[list-item]
    assert counted.input_tokens > answer.usage.input_tokens - 1  # the tools are described too


def test_tool_use_errors_are_clear(client: anthropic.Anthropic) -> None:
    # SmolLM2's template has no tools: it cannot decide, so auto is refused with the reason
    with pytest.raises(anthropic.BadRequestError, match="cannot express tools"):
        client.messages.create(model=CHAT_MODEL, max_tokens=8, messages=COUNT, tools=[WEATHER_TOOL])  # type: ignore[list-item]
    with pytest.raises(anthropic.BadRequestError, match="server tools"):
        client.messages.create(model=CHAT_MODEL, max_tokens=8, messages=COUNT,
                               tools=[{"type": "web_search_20250305", "name": "web_search"}])  # type: ignore[list-item]  # fmt: skip
    with pytest.raises(anthropic.BadRequestError, match="needs the name"):
        client.messages.create(model=CHAT_MODEL, max_tokens=8, messages=COUNT, tools=[WEATHER_TOOL],  # type: ignore[list-item]
                               tool_choice={"type": "tool"})  # type: ignore[typeddict-item]  # fmt: skip
    misplaced: list[anthropic.types.MessageParam] = [
        {"role": "user", "content": [{"type": "tool_use", "id": "t1", "name": "get_weather", "input": {}}]}
    ]
    with pytest.raises(anthropic.BadRequestError, match="cannot hold a tool_use"):
        client.messages.create(model=CHAT_MODEL, max_tokens=8, messages=misplaced)
    # tool_choice none: the tools are never offered, so the request is served
    served = client.messages.create(
        model=CHAT_MODEL,
        max_tokens=4,
        messages=COUNT,
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        tool_choice={"type": "none"},
    )
    assert served.content[0].text


def test_images_are_refused_without_vision(client: anthropic.Anthropic) -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    content = [image, {"type": "text", "text": "What is this?"}]
    with pytest.raises(anthropic.BadRequestError, match="cannot read images"):
        client.messages.create(
            model=CHAT_MODEL,
            max_tokens=8,
            messages=[{"role": "user", "content": content}],  # type: ignore[list-item]
        )


def test_the_routes_take_an_inference_key() -> None:
    """The SDK sends its key as x-api-key, which ApiKeyAuth reads as it reads a Bearer key."""
    from shoal.gateway.middleware import _needed_scope

    assert _needed_scope("POST", "/v1/messages") == "inference"
    assert _needed_scope("POST", "/v1/messages/count_tokens") == "inference"


@pytest.mark.parametrize(
    ("pieces", "stops", "sent", "found"),
    [
        (["ab", "c"], ["x"], "abc", None),
        (["1, 2", ", 3"], [", 3"], "1, 2", ", 3"),  # a stop split over two chunks is never sent in part
        (["he", "ll", "o"], ["llo", "el"], "h", "el"),  # the earliest match wins
        (["a<", "b"], ["<|end|>"], "a<b", None),  # a held tail that turns out not to be a stop is sent
    ],
)
def test_stop_matcher(pieces: list[str], stops: list[str], sent: str, found: str | None) -> None:
    matcher, out, stop = StopMatcher(stops), "", None
    for piece in pieces:
        safe, stop = matcher.feed(piece)
        out += safe
        if stop:
            break
    if stop is None:
        out += matcher.flush()
    assert (out, stop) == (sent, found)


def test_a_runner_error_mid_stream_ends_it_with_an_error_event() -> None:
    import asyncio

    from shoal.gateway import anthropic_translate as translate
    from shoal.gateway.routes_anthropic import _sse

    upstream = [
        b'data: {"choices": [{"index": 0, "delta": {"content": "Hel"}}]}\n\ndata: {"choi',
        b'ces": [{"index": 0, "delta": {"content": "lo"}}]}\n\n',
        b'data: {"error": {"message": "the runner went away", "type": "server_error", '
        b'"code": "model_unavailable"}}\n\n',
    ]

    async def run() -> list[bytes]:
        async def chunks():  # type: ignore[no-untyped-def]
            for piece in upstream:
                yield piece

        async def events():  # type: ignore[no-untyped-def]
            async for text in translate.texts(translate.parse_sse(chunks()), [], translate.Outcome()):
                yield translate.text_delta(text)

        return [part async for part in _sse(events())]

    parts = asyncio.run(run())
    assert [p.split(b"\n")[0] for p in parts] == [b"event: content_block_delta"] * 2 + [b"event: error"]
    assert b'"overloaded_error"' in parts[-1] and b"the runner went away" in parts[-1]


def test_the_runner_body_takes_integers_past_64_bits() -> None:
    """A client's schema may hold an integer orjson cannot write (the fuzzer found this on /api/chat)."""
    from shoal.gateway.routes_anthropic import _encode

    assert json.loads(_encode({"response_format": {"maxLength": 10**30}})) == {
        "response_format": {"maxLength": 10**30}
    }
