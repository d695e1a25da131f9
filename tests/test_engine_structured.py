"""Structured output (response_format) and chat-template tools on the transformers engine, on tiny
Llamas built here with a byte-level BPE tokenizer (GPT-2's, from a demo package), so the grammar's
token strings are the bytes the text is made of.

`engine` has random weights: it knows nothing of JSON, so every valid answer it gives is the
grammar's doing. A schema whose every part is bounded (enums, integer ranges, booleans, no free
strings) ends by the grammar alone. `json_object` has free strings, which a random model never
closes (a quote is a few hundred tokens of 50,257), so that case runs on `taught`: the same model
after a few seconds of training on short JSON objects, which still writes broken JSON on its own."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from conftest import build_tiny_bpe_llama, build_tiny_llama
from shoal.engines.base import EngineConfig
from shoal.engines.structured import Constraint, Grammars
from shoal.engines.transformers import TransformersEngine
from shoal.errors import InvalidRequest

CONTEXT = 512

# A template that lists tools and reads a tool call's arguments as a dict (as Hugging Face's
# templates do: Qwen2.5, Llama 3.1 write `arguments | tojson`).
TOOLS_TEMPLATE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t['function']['name'] }}: "
    "{{ t['function']['parameters'] | tojson }}\n{% endfor %}</tools>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' and m.get('tool_calls') %}assistant:"
    "{% for c in m['tool_calls'] %} <call>{{ c['function']['name'] }}"
    "(city={{ c['function']['arguments']['city'] }})</call>{% endfor %}{{ '\\n' }}"
    "{% elif m['role'] == 'tool' %}tool[{{ m['tool_call_id'] }}]: {{ m['content'] }}\n"
    "{% else %}{{ m['role'] }}: {{ m['content'] }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)

SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": -5, "maximum": 500},
        "ok": {"type": "boolean"},
        "size": {"enum": ["S", "M", "L"]},
    },
    "required": ["color", "count", "ok"],
    "additionalProperties": False,
}
PROMPTS = ["give me json", "hello there", "a b c", "north light river"]


def load(folder: Path, **options: Any) -> TransformersEngine:
    config = EngineConfig(folder, "tiny", "pytorch", None, "cpu", 2, {"max_batch_size": 4, **options})
    engine = TransformersEngine(config)
    engine.load()
    return engine


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TransformersEngine]:
    folder = tmp_path_factory.mktemp("tiny-bpe-llama")
    build_tiny_bpe_llama(folder, 64, CONTEXT, chat_template=TOOLS_TEMPLATE, initializer_range=0.2)
    eng = load(folder)
    yield eng
    eng.close()


def teach_json(folder: Path, steps: int = 30) -> None:
    """A few steps of AdamW on 16 short JSON objects after a chat prompt: enough to close strings."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = LlamaForCausalLM.from_pretrained(folder, local_files_only=True)
    rng = random.Random(0)
    words = ["apple", "river", "stone", "cloud", "green", "seven", "light", "north"]
    texts = []
    for _ in range(16):
        values = [rng.choice(words), rng.randint(0, 99), True]
        obj = {rng.choice(words): rng.choice(values) for _ in range(rng.randint(1, 3))}
        prompt = [{"role": "user", "content": " ".join(rng.sample(words, 3))}]
        head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        texts.append(f"{head}{json.dumps(obj, separators=(',', ':'))}{tokenizer.eos_token}")
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, encoded))
    ids = torch.full((len(encoded), width), tokenizer.eos_token_id)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(encoded):
        ids[row, : len(tokens)], mask[row, : len(tokens)] = torch.tensor(tokens), 1
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def taught(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TransformersEngine]:
    folder = tmp_path_factory.mktemp("tiny-json-llama")
    build_tiny_bpe_llama(folder, 64, CONTEXT)
    teach_json(folder)
    eng = load(folder)
    yield eng
    eng.close()


def chat_body(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": text}], **extra}


def schema_format(schema: dict[str, Any], strict: bool = True) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": strict}}


def answer(engine: TransformersEngine, body: dict[str, Any]) -> tuple[str, str]:
    choice = asyncio.run(engine.chat(body))["choices"][0]
    return choice["message"]["content"], choice["finish_reason"]


async def collect(stream: Any) -> list[dict[str, Any]]:
    return [chunk async for chunk in stream]


def is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def test_json_schema_holds_even_random_weights(engine: TransformersEngine) -> None:
    for text in PROMPTS:
        free, _ = answer(engine, chat_body(text, temperature=0, max_tokens=40))
        assert not is_json(free)  # on its own the model writes no JSON at all
        for sampling in ({"temperature": 0}, {"temperature": 1.0, "seed": 5}):
            body = chat_body(text, max_tokens=60, response_format=schema_format(SCHEMA), **sampling)
            content, finish = answer(engine, body)
            assert finish == "stop", content
            jsonschema.validate(json.loads(content), SCHEMA)


def test_json_schema_streams_the_same_json(engine: TransformersEngine) -> None:
    body = chat_body(
        "stream it", temperature=1.0, seed=11, max_tokens=60, response_format=schema_format(SCHEMA)
    )
    plain, _ = answer(engine, body)
    chunks = asyncio.run(collect(engine.chat_stream({**body, "stream_options": {"include_usage": True}})))
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert streamed == plain and len(chunks) > 4  # sent piece by piece
    jsonschema.validate(json.loads(streamed), SCHEMA)
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] > 5


def test_too_few_tokens_end_with_length(engine: TransformersEngine) -> None:
    body = chat_body("short", temperature=0, response_format=schema_format(SCHEMA))
    full, _ = answer(engine, {**body, "max_tokens": 60})
    answered = asyncio.run(engine.chat({**body, "max_tokens": 3}))
    cut = answered["choices"][0]
    assert cut["finish_reason"] == "length" and answered["usage"]["completion_tokens"] == 3
    assert full.startswith(cut["message"]["content"]) and not is_json(cut["message"]["content"])


def test_constrained_and_free_rows_share_a_batch(engine: TransformersEngine) -> None:
    """The mask lands on its own row: a free request batched with constrained ones is unchanged."""
    free = chat_body("free text", temperature=0, max_tokens=20)
    alone, _ = answer(engine, free)
    constrained = [
        chat_body(t, temperature=0, max_tokens=60, response_format=schema_format(SCHEMA)) for t in PROMPTS[:3]
    ]

    async def together() -> list[dict[str, Any]]:
        busy = engine.complete_stream({"model": "tiny", "prompt": "x", "max_tokens": 200, "temperature": 0})
        await anext(busy)
        answers = asyncio.gather(*(engine.chat(b) for b in [constrained[0], free, *constrained[1:]]))
        await collect(busy)
        return list(await answers)

    before = engine.batches_run
    answers = asyncio.run(together())
    assert engine.batches_run - before == 2  # the busy one, then the four together
    texts = [a["choices"][0]["message"]["content"] for a in answers]
    assert texts[1] == alone
    for text in (texts[0], *texts[2:]):
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_is_an_object(taught: TransformersEngine) -> None:
    free, constrained = [], []
    for seed in range(6):
        body = chat_body(PROMPTS[seed % len(PROMPTS)], temperature=1.0, seed=seed, max_tokens=80)
        free.append(answer(taught, body)[0])
        content, finish = answer(taught, {**body, "response_format": {"type": "json_object"}})
        assert finish == "stop", content
        constrained.append(json.loads(content))
    assert all(isinstance(value, dict) for value in constrained)
    assert not all(is_json(text) for text in free)  # the model alone gets it wrong
    text, _ = answer(
        taught, chat_body("plain", temperature=0, max_tokens=8, response_format={"type": "text"})
    )
    assert text  # "text" constrains nothing


def test_schemas_that_cannot_be_enforced_are_refused(engine: TransformersEngine) -> None:
    def refused(response_format: Any, match: str) -> None:
        with pytest.raises(InvalidRequest, match=match):
            asyncio.run(engine.chat(chat_body("hi", max_tokens=5, response_format=response_format)))
        with pytest.raises(InvalidRequest, match=match):
            asyncio.run(
                collect(engine.chat_stream(chat_body("hi", max_tokens=5, response_format=response_format)))
            )

    refused(schema_format({"type": "strin"}), "strin")
    refused(schema_format({"type": "string", "pattern": "(?=a)b"}), "look-around")
    refused(schema_format({"properties": {"a": {"$ref": "#/defs/none"}}}), "defs/none")
    refused(schema_format({"type": "string", "minLength": 5, "maxLength": 2}), "Unsatisfiable")
    refused(schema_format({"type": "integer", "minimum": 10**30}), "cannot be compiled")
    refused(schema_format({"type": "string", "format": "no-such-format"}), "no-such-format")  # strict
    refused({"type": "xml"}, "json_object or json_schema")
    refused("json", "must be an object")
    refused({"type": "json_schema"}, "json_schema must be an object")
    refused({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}, "JSON schema object")
    refused({"type": "json_schema", "json_schema": {"name": "x", "schema_": {}}}, "JSON schema object")
    # not strict: a keyword that cannot be enforced is ignored, the rest still holds
    loose = {"type": "object", "properties": {"color": {"enum": ["red"]}}, "required": ["color"],
             "additionalProperties": False, "if": {"type": "object"}, "then": {}}  # fmt: skip
    body = chat_body("hi", temperature=0, max_tokens=30, response_format=schema_format(loose, strict=False))
    content, finish = answer(engine, body)
    assert finish == "stop" and json.loads(content) == {"color": "red"}


def test_compiled_grammars_are_cached_and_bounded(engine: TransformersEngine) -> None:
    body = chat_body("hi", temperature=0, max_tokens=60, response_format=schema_format(SCHEMA))
    answer(engine, body)
    before = engine._grammars.compiles
    reordered = {**SCHEMA, "properties": dict(reversed(list(SCHEMA["properties"].items())))}
    answer(engine, body)
    answer(engine, {**body, "response_format": schema_format(reordered)})  # the same schema
    assert engine._grammars.compiles == before

    grammars = Grammars(engine._llg_tokenizer, size=2)
    schemas = [{"enum": [i]} for i in range(3)]
    for schema in [*schemas, schemas[2], schemas[0]]:
        grammars.matcher(Constraint(schema, strict=True))
    assert grammars.compiles == 4  # the first was dropped for the third; the third was kept


def test_template_with_tools_is_told_the_tools(engine: TransformersEngine) -> None:
    assert engine.template_tools
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]  # fmt: skip
    messages = [
        {"role": "user", "content": "weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },  # fmt: skip
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    prompt = engine._decode(engine._chat_prompt({"messages": messages, "tools": tools}))
    assert prompt.startswith(
        '<tools>get_weather: {"type": "object", "properties": {"city": {"type": "string"}}}'
    )
    assert "assistant: <call>get_weather(city=Oslo)</call>\n" in prompt  # arguments read as a dict
    assert "tool[call_1]: sunny, 21 C\nassistant:" in prompt
    without = engine._decode(engine._chat_prompt({"messages": messages}))
    assert "<tools>" not in without and without in prompt
    # the whole request: told about tools, the prompt is longer
    usage = [asyncio.run(engine.chat({"messages": messages, "max_tokens": 1, **extra}))["usage"]
             for extra in ({}, {"tools": tools})]  # fmt: skip
    assert usage[1]["prompt_tokens"] > usage[0]["prompt_tokens"]


def test_template_without_tools_is_not_told(tmp_path: Path) -> None:
    build_tiny_llama(tmp_path, 32, 128)  # the plain "role: content" template
    eng = load(tmp_path)
    try:
        assert not eng.template_tools
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
        body = {"messages": [{"role": "user", "content": "hi"}]}
        assert eng._chat_prompt({**body, "tools": tools}) == eng._chat_prompt(body)
    finally:
        eng.close()


def test_forced_tool_call_through_the_tool_layer(engine: TransformersEngine) -> None:
    """engines/tools.py around this engine: the tools reach the template, the call is constrained by
    response_format, and even random weights answer with a well-formed call."""
    from shoal.engines import tools as tool_layer

    city = {"type": "string", "enum": ["Oslo", "Lima"]}
    parameters = {"type": "object", "properties": {"city": city}, "required": ["city"]}
    function = {"name": "get_weather", "parameters": {**parameters, "additionalProperties": False}}
    tools = [{"type": "function", "function": function}]
    body = chat_body("weather?", temperature=0, max_tokens=40, tools=tools, tool_choice="required")
    sent, _ = tool_layer.prepare(engine, body)
    assert "get_weather" in engine._decode(engine._chat_prompt(sent))  # rendered by the model's template
    choice = asyncio.run(tool_layer.chat(engine, body))["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"])["city"] in ("Oslo", "Lima")


def test_through_the_server(server: Any, openai_client: Any, tmp_path: Path) -> None:
    """The OpenAI SDK → gateway → runner → this engine: json_schema whole and streamed, a forced
    tool call, and a schema that cannot be compiled as a 400."""
    import openai

    folder = tmp_path / "tiny"
    folder.mkdir()
    build_tiny_bpe_llama(folder, 64, CONTEXT, chat_template=TOOLS_TEMPLATE, initializer_range=0.2)
    spec = {"model_format": "pytorch", "model_uri": str(folder)}
    model = {
        "model_name": "tiny-bpe",
        "model_ability": ["chat"],
        "context_length": CONTEXT,
        "model_specs": [spec],
    }
    assert server.http.post("/v1/model_registrations/LLM", json={"model": model}).status_code == 200
    launched = server.http.post("/v1/models", json={"model_name": "tiny-bpe", "model_engine": "transformers"})
    assert launched.status_code == 200, launched.text
    try:
        ask = [{"role": "user", "content": "json please"}]
        fmt = schema_format(SCHEMA)
        got = openai_client.chat.completions.create(
            model="tiny-bpe", messages=ask, max_tokens=60, temperature=0, response_format=fmt
        )
        assert got.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(got.choices[0].message.content), SCHEMA)
        stream = openai_client.chat.completions.create(
            model="tiny-bpe", messages=ask, max_tokens=60, temperature=0, response_format=fmt, stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == got.choices[0].message.content
        size = {"type": "object", "properties": {"size": {"enum": ["S", "L"]}}, "required": ["size"]}
        # closed (no other properties): free keys are strings a random model never ends
        tools = [
            {
                "type": "function",
                "function": {"name": "pick", "parameters": {**size, "additionalProperties": False}},
            }
        ]
        called = openai_client.chat.completions.create(
            model="tiny-bpe", messages=ask, max_tokens=40, temperature=0, tools=tools, tool_choice="required"
        )
        assert called.choices[0].finish_reason == "tool_calls"
        assert json.loads(called.choices[0].message.tool_calls[0].function.arguments)["size"] in ("S", "L")
        with pytest.raises(openai.BadRequestError, match="look-around"):
            openai_client.chat.completions.create(
                model="tiny-bpe", messages=ask, max_tokens=5,
                response_format=schema_format({"type": "string", "pattern": "(?=a)b"}),
            )  # fmt: skip
    finally:
        server.http.delete("/v1/models/tiny-bpe")
        server.http.delete("/v1/model_registrations/LLM/tiny-bpe")
