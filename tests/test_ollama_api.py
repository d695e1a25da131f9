"""The Ollama API (/api/...) through the real `ollama` client against the session server and the
demo models, plus the pure translation it rests on."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from conftest import CHAT_MODEL, EMBED_MODEL, ShoalServer, alive, pids_of
from shoal.errors import InvalidRequest
from shoal.gateway import ollama_translate as tr
from shoal.gateway.middleware import _needed_scope
from shoal.gateway.upstream import sse_chunks
from shoal.protocol.ollama import OllamaChatRequest as ChatRequest
from shoal.protocol.ollama import OllamaGenerateRequest as GenerateRequest

HELLO = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0, "seed": 7, "num_predict": 16}


@pytest.fixture
def client(chat_server, embed_server) -> ollama.Client:  # type: ignore[no-untyped-def]
    return ollama.Client(host=chat_server.url, timeout=120)


# ---- end to end, with the real client --------------------------------------------------------------
def test_chat_whole_answer(client: ollama.Client) -> None:
    answer = client.chat(model=CHAT_MODEL, messages=HELLO, stream=False, options=GREEDY)
    assert answer.message.role == "assistant"
    assert answer.message.content.strip()
    assert answer.done is True and answer.done_reason in ("stop", "length")
    assert answer.model == CHAT_MODEL
    assert answer.prompt_eval_count > 5
    assert 0 < answer.eval_count <= 16
    assert answer.total_duration >= answer.eval_duration > 0
    assert answer.created_at.endswith("Z")


def test_chat_streams_ndjson_and_matches_the_whole_answer(client: ollama.Client) -> None:
    parts = list(client.chat(model=f"{CHAT_MODEL}:latest", messages=HELLO, stream=True, options=GREEDY))
    assert len(parts) > 2
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert parts[-1].message.content == ""
    assert parts[-1].eval_count > 0 and parts[-1].prompt_eval_count > 5
    streamed = "".join(p.message.content for p in parts)
    whole = client.chat(model=CHAT_MODEL, messages=HELLO, stream=False, options=GREEDY)
    assert streamed == whole.message.content


def test_streaming_is_the_default_and_ndjson(chat_server) -> None:  # type: ignore[no-untyped-def]
    body = {"model": CHAT_MODEL, "messages": HELLO, "options": {"num_predict": 4}}
    with httpx.stream("POST", chat_server.url + "/api/chat", json=body, timeout=120) as response:
        assert response.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in response.iter_lines()]
    assert lines[-1]["done"] is True and len(lines) >= 2


def test_a_client_that_leaves_mid_stream_frees_the_replica(chat_server) -> None:  # type: ignore[no-untyped-def]
    body = {
        "model": CHAT_MODEL,
        "prompt": "Write a long story about a dragon.",
        "options": {"num_predict": 2000},
    }
    with httpx.stream("POST", chat_server.url + "/api/generate", json=body, timeout=120) as response:
        first = json.loads(next(response.iter_lines()))
        assert first["done"] is False
    deadline = time.monotonic() + 60
    while any(r["in_flight"] for r in chat_server.http.get(f"/v1/models/{CHAT_MODEL}").json()["replicas"]):
        assert time.monotonic() < deadline, "the replica stayed leased after the client left"
        time.sleep(0.05)


def test_generate_whole_and_streamed(client: ollama.Client) -> None:
    whole = client.generate(
        model=CHAT_MODEL, prompt="Name a colour.", system="Answer in one word.", options=GREEDY
    )
    assert whole.response.strip() and whole.done
    parts = list(client.generate(model=CHAT_MODEL, prompt="Name a colour.", system="Answer in one word.",
                                 options=GREEDY, stream=True))  # fmt: skip
    assert "".join(p.response for p in parts) == whole.response
    raw = client.generate(model=CHAT_MODEL, prompt="The capital of France is", raw=True, options=GREEDY)
    assert raw.response.strip() and 0 < raw.eval_count <= 16


def test_num_predict_bounds_tokens_and_seed_repeats(client: ollama.Client) -> None:
    prompt = [{"role": "user", "content": "Write a long story about a dragon."}]
    short = client.chat(model=CHAT_MODEL, messages=prompt, options={"num_predict": 3})
    assert short.eval_count <= 3 and short.done_reason == "length"
    sampled = {"temperature": 1.0, "seed": 1234, "num_predict": 12, "top_k": 40, "repeat_penalty": 1.1}
    first = client.chat(model=CHAT_MODEL, messages=prompt, options=sampled)
    again = client.chat(model=CHAT_MODEL, messages=prompt, options=sampled)
    assert first.message.content == again.message.content


def test_format_json_and_schema_give_parseable_json(client: ollama.Client) -> None:
    ask = [
        {"role": "system", "content": "Answer with a short JSON object."},
        {"role": "user", "content": "Give the name and age of a person as JSON."},
    ]
    answer = client.chat(
        model=CHAT_MODEL, messages=ask, format="json", options={"num_predict": 60, "temperature": 0}
    )
    assert isinstance(json.loads(answer.message.content), dict)
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,  # else a schema allows more properties, and a small model rambles
    }
    answer = client.generate(
        model=CHAT_MODEL,
        prompt="A person as JSON.",
        format=schema,
        options={"num_predict": 60, "temperature": 0},
    )
    data = json.loads(answer.response)
    assert set(data) == {"name", "age"} and isinstance(data["age"], int)


def test_logprobs_in_ollamas_shape(client: ollama.Client) -> None:
    answer = client.chat(model=CHAT_MODEL, messages=HELLO, logprobs=True, top_logprobs=2, options=GREEDY)
    assert len(answer.logprobs) == answer.eval_count
    first = answer.logprobs[0]
    assert first.token and first.logprob <= 0 and len(first.top_logprobs) == 2


def test_empty_chat_or_prompt_only_loads(client: ollama.Client) -> None:
    assert client.generate(model=CHAT_MODEL).done_reason == "load"
    assert client.chat(model=CHAT_MODEL, messages=[]).done_reason == "load"


def test_embed_both_routes(client: ollama.Client) -> None:
    one = client.embed(model=EMBED_MODEL, input="hello world")
    assert len(one.embeddings) == 1 and len(one.embeddings[0]) == 384
    assert math.isclose(sum(x * x for x in one.embeddings[0]), 1.0, rel_tol=1e-3)  # normalised, as Ollama's
    many = client.embed(model=f"{EMBED_MODEL}:latest", input=["hello world", "bananas are yellow"])
    assert len(many.embeddings) == 2 and many.prompt_eval_count > 0
    assert many.embeddings[0] == pytest.approx(one.embeddings[0], abs=1e-5)
    legacy = client.embeddings(model=EMBED_MODEL, prompt="hello world")
    assert legacy.embedding == pytest.approx(one.embeddings[0], abs=1e-5)


def test_embed_truncates_unless_told_not_to(client: ollama.Client) -> None:
    long = "word " * 300  # 302 tokens; MiniLM embeds 256
    cut = client.embed(model=EMBED_MODEL, input=long)  # Ollama's default: truncate
    assert cut.prompt_eval_count == 256
    assert cut.embeddings == client.embed(model=EMBED_MODEL, input=long, truncate=True).embeddings
    with pytest.raises(ollama.ResponseError) as refused:
        client.embed(model=EMBED_MODEL, input=long, truncate=False)
    assert refused.value.status_code == 400 and "has 302 tokens" in refused.value.error


# ---- keep_alive: on copies of the demo models under their own uids, so the others stay loaded ------
@pytest.fixture
def copies(server: ShoalServer) -> Iterator[tuple[str, str]]:
    uids = ("ka-chat", "ka-embed")
    for uid, name in zip(uids, (CHAT_MODEL, EMBED_MODEL), strict=True):
        body = {"model_name": name, "model_uid": uid, "keep_alive": "1h"}
        assert server.http.post("/v1/models", json=body).status_code == 200
    yield uids
    for uid in uids:
        server.http.delete(f"/v1/models/{uid}")


def expiry(client: ollama.Client, uid: str) -> float | None:
    """Seconds from now to the model's expires_at in /api/ps; None when it is not loaded."""
    loaded = {m.model: m for m in client.ps().models}
    if f"{uid}:latest" not in loaded:
        return None
    expires = loaded[f"{uid}:latest"].expires_at
    assert expires is not None
    return (expires - datetime.now(UTC)).total_seconds()


def test_keep_alive_zero_unloads_and_other_values_set_the_keep_alive(
    client: ollama.Client, server: ShoalServer, copies: tuple[str, str]
) -> None:
    chat, embed = copies
    assert 3500 < (expiry(client, chat) or 0) <= 3600  # the launch's 1h
    pid = pids_of(server, chat)[0]
    answer = client.chat(model=chat, messages=HELLO, options=GREEDY, keep_alive=0)
    assert answer.message.content.strip()  # answered, then unloaded
    assert expiry(client, chat) is None and not alive(pid)
    assert server.http.get(f"/v1/models/{chat}").json()["status"] == "evicted"
    # the next request loads it again (no --autoload here); its keep_alive is the model's now
    parts = list(client.chat(model=chat, messages=HELLO, options=GREEDY, stream=True, keep_alive="5m"))
    assert "".join(p.message.content for p in parts) == answer.message.content
    assert 240 < (expiry(client, chat) or 0) <= 300
    client.generate(model=chat, prompt="Hi", options=GREEDY, keep_alive=-1)
    assert (expiry(client, chat) or 0) > 100 * 365 * 86400  # forever: Ollama's year 2318
    client.generate(model=chat, prompt="Hi", options=GREEDY)  # none: the launch's again
    assert 3500 < (expiry(client, chat) or 0) <= 3600
    streamed = list(client.generate(model=chat, prompt="Hi", options=GREEDY, stream=True, keep_alive="0s"))
    assert streamed[-1].done and expiry(client, chat) is None  # unloaded before the last line
    # what `ollama stop` sends: an empty prompt with keep_alive 0 unloads without loading first
    client.chat(model=chat, messages=[], keep_alive="1m")  # loads it again
    assert expiry(client, chat) is not None
    assert client.generate(model=chat, prompt="", keep_alive=0).done_reason == "unload"
    assert expiry(client, chat) is None
    assert client.generate(model=chat, prompt="", keep_alive="0").done_reason == "unload"
    assert server.http.get(f"/v1/models/{chat}").json()["status"] == "evicted"  # still not loaded

    vector = client.embed(model=embed, input="hello world", keep_alive=0).embeddings[0]
    assert expiry(client, embed) is None
    assert client.embed(model=embed, input="hello world").embeddings[0] == pytest.approx(vector, abs=1e-6)
    assert expiry(client, embed) is not None


def test_tags_ps_show_version(client: ollama.Client) -> None:
    names = {m.model for m in client.list().models}
    assert {f"{CHAT_MODEL}:latest", f"{EMBED_MODEL}:latest"} <= names
    listed = next(m for m in client.list().models if m.model == f"{CHAT_MODEL}:latest")
    assert listed.details.format == "gguf" and listed.details.quantization_level == "Q4_1"
    assert listed.details.parameter_size == "135M" and listed.size > 0 and len(listed.digest) == 64
    loaded = {m.model: m for m in client.ps().models}
    chat = loaded[f"{CHAT_MODEL}:latest"]
    assert chat.size > 0 and chat.size_vram is not None and chat.expires_at is not None
    assert chat.context_length and chat.context_length > 0
    shown = client.show(CHAT_MODEL)
    assert "completion" in shown.capabilities and shown.details.family == CHAT_MODEL
    assert "embedding" in client.show(f"{EMBED_MODEL}:latest").capabilities
    assert client._client.get("/api/version").json()["version"]  # the client has no version() call


def test_unknown_model_is_a_404_response_error(client: ollama.Client) -> None:
    for call in (
        lambda: client.chat(model="no-such-model", messages=HELLO),
        lambda: client.generate(model="no-such-model:7b", prompt="hi"),
        lambda: client.embed(model="no-such-model", input="hi"),
        lambda: client.show("no-such-model"),
        lambda: client.delete("no-such-model"),
    ):
        with pytest.raises(ollama.ResponseError) as caught:
            call()
        assert caught.value.status_code == 404
        assert isinstance(caught.value.error, str) and "no-such-model" in caught.value.error


def test_bad_bodies_are_400_in_ollamas_shape(chat_server) -> None:  # type: ignore[no-untyped-def]
    http = httpx.Client(base_url=chat_server.url, timeout=60)
    bad = [
        ("/api/chat", b"{not json"),
        ("/api/chat", {"model": CHAT_MODEL, "messages": [{"role": "wizard", "content": "hi"}]}),
        ("/api/chat", {"model": CHAT_MODEL, "messages": HELLO, "options": {"temperature": 9}}),
        ("/api/chat", {"model": CHAT_MODEL, "messages": HELLO, "keep_alive": "soon"}),
        ("/api/generate", {"model": CHAT_MODEL, "prompt": "hi", "template": "{{ .Prompt }}"}),
        ("/api/embed", {"model": EMBED_MODEL, "input": []}),
        ("/api/embed", {"model": CHAT_MODEL, "input": "hi"}),  # a chat model cannot embed
    ]
    for path, body in bad:
        response = http.post(path, content=body) if isinstance(body, bytes) else http.post(path, json=body)
        assert response.status_code == 400, (path, body, response.text)
        assert isinstance(response.json()["error"], str)
    with pytest.raises(ollama.ResponseError) as caught:
        ollama.Client(host=chat_server.url).chat(model=CHAT_MODEL, messages=HELLO, options={"top_p": 5})
    assert caught.value.status_code == 400 and "top_p" in caught.value.error


# ---- pure translation -------------------------------------------------------------------------------
def test_options_map_to_the_openai_body() -> None:
    body = ChatRequest.model_validate(
        {
            "model": "m:latest",
            "messages": HELLO,
            "format": "json",
            "options": {
                "num_predict": 5,
                "repeat_penalty": 1.2,
                "min_p": 0.1,
                "stop": ["\n"],
                "num_ctx": 4096,
            },
        }
    )
    out = tr.chat_body(body, "llama.cpp")
    assert out["model"] == "m" and out["max_tokens"] == 5 and out["repeat_penalty"] == 1.2
    assert out["min_p"] == 0.1 and out["stop"] == ["\n"] and "num_ctx" not in out
    assert out["response_format"] == {"type": "json_object"}
    assert tr.chat_body(body, "transformers")["repetition_penalty"] == 1.2
    unlimited = body.model_copy(update={"options": body.options.model_copy(update={"num_predict": -1})})
    assert "max_tokens" not in tr.chat_body(unlimited, "llama.cpp")


def test_tool_calls_translate_both_ways() -> None:
    body = ChatRequest.model_validate(
        {
            "model": "m",
            "messages": [
                *HELLO,
                {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}]},
                {"role": "tool", "content": "2", "tool_name": "f"},
            ],
        }
    )
    messages = tr.chat_messages(body)
    call = messages[1]["tool_calls"][0]
    assert json.loads(call["function"]["arguments"]) == {"x": 1}
    assert messages[2]["tool_call_id"] == call["id"] and messages[2]["name"] == "f"
    turn = tr.Turn("m", chat=True, started=0, load_ns=0, clock=lambda: 10)
    for piece in ('{"x": ', "2}"):
        turn.take(
            {
                "choices": [
                    {"delta": {"tool_calls": [{"index": 0, "function": {"name": "", "arguments": piece}}]}}
                ]
            }
        )
    turn.take({"choices": [{"delta": {}, "finish_reason": "tool_calls"}]})
    whole = turn.whole()
    assert whole["message"]["tool_calls"] == [{"function": {"name": "", "arguments": {"x": 2}}}]
    assert whole["done_reason"] == "stop"


def test_sse_split_anywhere_and_errors_in_band() -> None:
    data = (
        b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n'
        b'data: {"error": {"message": "boom", "code": "timeout"}}\n\ndata: [DONE]\n\n'
    )

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(data), 7):
            yield data[i : i + 7]

    async def read() -> list[dict[str, Any]]:
        return [chunk async for chunk in sse_chunks(pieces())]

    chunks = asyncio.run(read())
    assert len(chunks) == 2
    turn = tr.Turn("m", chat=False, started=0, load_ns=0)
    assert turn.take(chunks[0])["response"] == "a"
    assert turn.take(chunks[1]) is None and turn.error == "boom" and turn.error_status == 504


def test_generate_refuses_what_it_cannot_honour() -> None:
    for extra in ({"suffix": "x"}, {"context": [1, 2]}, {"images": ["aGk="]}, {"think": True}):
        with pytest.raises(InvalidRequest):
            tr.generate_body(
                GenerateRequest.model_validate({"model": "m", "prompt": "p", **extra}), "llama.cpp", True
            )
    templated = tr.generate_body(GenerateRequest(model="m", prompt="p", system="s"), "llama.cpp", True)
    assert templated["messages"] == [{"role": "system", "content": "s"}, {"role": "user", "content": "p"}]
    assert (
        tr.generate_body(GenerateRequest(model="m", prompt="p", raw=True), "llama.cpp", True)["prompt"] == "p"
    )


def test_delete_needs_admin_and_the_rest_inference() -> None:
    assert _needed_scope("DELETE", "/api/delete") == "admin"
    for method, path in (
        ("POST", "/api/chat"),
        ("GET", "/api/tags"),
        ("POST", "/api/show"),
        ("GET", "/api/ps"),
    ):
        assert _needed_scope(method, path) == "inference"
    assert (
        tr.parameter_size(0.135) == "135M" and tr.parameter_size(7) == "7B" and tr.parameter_size(None) == ""
    )


def test_ps_sizes_come_from_the_ledger() -> None:
    from datetime import UTC, datetime

    from shoal.catalog import ModelFamily
    from shoal.protocol.admin import LaunchRequest
    from shoal.services.ledger import Reservation
    from shoal.services.plan import LaunchPlan
    from shoal.services.replicas import Replica, ReplicaState, RunningModel

    gib = 1024**3
    family = ModelFamily.model_validate(
        {
            "model_name": "m",
            "model_type": "LLM",
            "model_ability": ["chat"],
            "model_specs": [
                {"model_format": "ggufv2", "model_size_in_billions": 7, "source": {"path": "/m.gguf"}}
            ],
        }
    )
    spec = family.model_specs[0]
    held = Reservation(("gpu:0", "gpu:1"), 5 * gib, {}, measured=6 * gib)  # measured over the estimate
    replica = Replica(0, state=ReplicaState.READY, reservation=held, last_used=100.0)
    plan = LaunchPlan("gpu", 2, None, 5 * gib, {"weights": 4 * gib}, 0, False)
    launch = LaunchRequest(model_name="m")
    model = RunningModel("m", family, spec, "llama.cpp", spec.source, launch, plan, 300.0, [replica])
    now = datetime(2026, 1, 1, tzinfo=UTC)
    shown = tr.process(model, 4096, now, monotonic=160.0)
    assert shown["size"] == shown["size_vram"] == 12 * gib  # max(estimate, measured) on each of 2 GPUs
    assert shown["expires_at"] == "2026-01-01T00:04:00Z"  # 300 s keep_alive, 60 s idle
    assert tr.tag(model)["size"] == 4 * gib and tr.tag(model)["details"]["parameter_size"] == "7B"
    model.keep_alive = -1
    assert tr.process(model, 4096, now, 160.0)["expires_at"].startswith("2318")
    model.plan = LaunchPlan("cpu", 1, None, 5 * gib, {}, 2, False)
    assert tr.process(model, 4096, now, 160.0)["size_vram"] == 0


def test_tool_call_arguments_with_huge_integers_translate() -> None:
    """Found by the fuzzer: an integer past 64 bits in a replayed call's arguments was a 500."""
    body = ChatRequest.model_validate(
        {
            "model": "m",
            "messages": [
                *HELLO,
                {
                    "role": "assistant",
                    "tool_calls": [{"function": {"name": "f", "arguments": {"x": 10**30}}}],
                },
            ],
        }
    )
    call = tr.chat_messages(body)[1]["tool_calls"][0]
    assert json.loads(call["function"]["arguments"]) == {"x": 10**30}


def test_show_capabilities_follow_the_catalog_abilities(tmp_path: Path) -> None:
    """What Open WebUI and friends read to offer tools or thinking: the catalog's labels, Ollama's names."""
    from shoal.catalog import Catalog
    from shoal.state import StateStore

    qwen3 = Catalog(StateStore(tmp_path / "state.db")).get("qwen3").model_ability
    assert tr.capabilities(qwen3) == ["completion", "tools", "thinking"]
    assert tr.capabilities(["embed"]) == ["embedding"]
    assert tr.capabilities(["chat", "vision", "generate", "audio2text"]) == ["completion", "vision"]
