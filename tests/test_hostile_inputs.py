"""Inputs a hostile (or careless) client sends: each gets a 4xx in the OpenAI error shape, never a 500,
and the same keep-alive connection serves a normal request right after.

Covers the bounds of issue 11: top_logprobs / logprobs, a prompt far beyond the context, launch options
(types and ranges), non-finite numbers anywhere in a body, token ids outside the vocabulary, control
characters in speech input, and model paths that are no weights (devices, /proc, folders, symlinks).
The pure checks behind them are tested first, without a server.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import CHAT_MODEL, EMBED_MODEL, ShoalServer, wait_until_ready
from shoal.catalog.weights import check_path, check_weights
from shoal.engines.base import ESTIMATE_DEFAULTS, context_tokens
from shoal.engines.llamacpp import bound_logprobs, drop_alternatives
from shoal.engines.options import ENGINE_OPTIONS, OPTIONS, check_launch_options
from shoal.engines.registry import ENGINES
from shoal.engines.speech import speech_params
from shoal.errors import InvalidRequest
from shoal.protocol.openai import (
    BATCH_CHARS,
    CHARS_PER_TOKEN,
    TRUNCATED_INPUT_CHARS,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    RerankRequest,
    check_prompt_size,
)

MSG = [{"role": "user", "content": "hi"}]
TTS_MODEL = "piper-en-us-joe"


# ---- the pure checks ------------------------------------------------------------------------------
def test_every_engine_has_its_options_in_the_table() -> None:
    assert set(ENGINE_OPTIONS) == set(ENGINES)
    for engine, names in ENGINE_OPTIONS.items():
        assert set(names) <= set(OPTIONS), engine


def test_launch_options_are_typed_and_bounded() -> None:
    # text from xinference-client or `-o k=v` is read as the option's type
    assert check_launch_options("llama.cpp", {"n_ctx": "512", "n_parallel": 2}) == {
        "n_ctx": 512,
        "n_parallel": 2,
    }
    assert check_launch_options("transformers", {"trust_remote_code": "false"}) == {
        "trust_remote_code": False
    }
    bad = [("n_ctx", 0), ("n_ctx", "abc"), ("n_ctx", 1.5), ("n_ctx", True), ("n_parallel", -1),
           ("n_threads", 0), ("n_gpu_layers", -2), ("memory_fraction", 0), ("memory_fraction", 1.5),
           ("noise_scale", float("nan")), ("score", "best"), ("trust_remote_code", "perhaps")]  # fmt: skip
    for name, value in bad:
        with pytest.raises(InvalidRequest, match=f"{name} must be"):
            check_launch_options(None, {name: value})
    with pytest.raises(InvalidRequest, match="unknown option.*engine llama.cpp: context_length"):
        check_launch_options("llama.cpp", {"context_length": 512})
    # without an engine only known names are checked; others pass as they are
    assert check_launch_options(None, {"cal_model_mem_field": "x"}) == {"cal_model_mem_field": "x"}


def test_context_tokens_follow_the_launch() -> None:
    assert context_tokens("llama.cpp", {"n_ctx": 512}, 8192) == 512
    assert context_tokens("llama.cpp", {}, 8192) == ESTIMATE_DEFAULTS["llama.cpp"]["context"]
    assert context_tokens("llama.cpp", {}, 2048) == 2048
    assert context_tokens("transformers", {"context_length": "1024"}, None) == 1024
    assert context_tokens("sentence_transformers", {}, 256) == 256


def test_prompt_size_bound() -> None:
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "a" * 4097}])  # type: ignore[list-item]
    check_prompt_size(chat, 4096 // CHARS_PER_TOKEN + 1, truncates=False)
    with pytest.raises(InvalidRequest, match=r"4,097 characters.*context of 128 tokens.*4,096"):
        check_prompt_size(chat, 128, truncates=False)
    prompts = CompletionRequest(model="m", prompt=["short", "b" * 5000])
    with pytest.raises(InvalidRequest, match="the prompt has 5,000"):
        check_prompt_size(prompts, 128, truncates=False)
    # an encoder that truncates takes long documents, up to a generous bound; embeddings only when asked
    long = "c" * TRUNCATED_INPUT_CHARS
    check_prompt_size(EmbeddingRequest(model="m", input=long, truncate=True), 256, truncates=True)
    with pytest.raises(InvalidRequest, match="context of 256 tokens.*truncate: true"):
        check_prompt_size(EmbeddingRequest(model="m", input=long), 256, truncates=True)
    with pytest.raises(InvalidRequest, match="per input"):
        check_prompt_size(EmbeddingRequest(model="m", input=long + "c", truncate=True), 256, True)
    many = EmbeddingRequest(model="m", input=["d" * 900_000] * (BATCH_CHARS // 900_000 + 1), truncate=True)
    with pytest.raises(InvalidRequest, match="split them"):
        check_prompt_size(many, 256, truncates=True)
    rerank = RerankRequest(model="m", query="q" * 10, documents=["ok", "e" * TRUNCATED_INPUT_CHARS])
    with pytest.raises(InvalidRequest, match="a query with a document has 1,000,010"):
        check_prompt_size(rerank, 512, truncates=True)
    check_prompt_size(EmbeddingRequest(model="m", input=[[1] * 300]), 256, truncates=True)  # token ids


def test_llama_cpp_logprobs_bounds() -> None:
    body: dict[str, Any] = {"logprobs": True}
    assert bound_logprobs(body, chat=True) and body["top_logprobs"] == 1
    body = {"logprobs": True, "top_logprobs": 3}
    assert not bound_logprobs(body, chat=True) and body["top_logprobs"] == 3
    body = {"logprobs": 0}
    assert bound_logprobs(body, chat=False) and body["logprobs"] == 1
    for bad in ({"top_logprobs": 21, "logprobs": True}, {"n_probs": 10**9}):
        with pytest.raises(InvalidRequest):
            bound_logprobs(bad, chat=True)
    answer = {
        "choices": [{"logprobs": {"content": [{"logprob": -1.0, "top_logprobs": [{"logprob": -1.0}]}]}}]
    }
    drop_alternatives(answer)
    assert answer["choices"][0]["logprobs"]["content"][0] == {"logprob": -1.0, "top_logprobs": []}


def test_speech_input_control_characters() -> None:
    assert speech_params({"input": "hi\x00there\x1b"}, ["v"])[0] == "hi there "
    assert speech_params({"input": "line\nnext\ttab"}, ["v"])[0] == "line\nnext\ttab"
    with pytest.raises(InvalidRequest, match="non-empty"):
        speech_params({"input": "\x00\x01\x7f"}, ["v"])


def test_weights_checks(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    check_weights(gguf, "ggufv2")
    text = tmp_path / "notes.gguf"
    text.write_text("hello")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    check_weights(hf, "pytorch")
    check_weights(hf, "sentence_transformers")
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)  # opening it would block for ever
    to_dev = tmp_path / "zero.gguf"
    to_dev.symlink_to("/dev/zero")
    to_proc = tmp_path / "env"
    to_proc.symlink_to("/proc/self/environ")
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "model.safetensors").symlink_to("/dev/zero")
    cases = [
        (text, "ggufv2", "not a GGUF"),
        (hf, "ggufv2", "is a folder"),
        (gguf, "pytorch", "is a file"),
        (tmp_path / "hf-none", "pytorch", "does not exist"),
        (fifo, "ggufv2", "not a regular file"),
        (to_dev, "ggufv2", "/dev"),
        (to_proc, "ggufv2", "/proc"),
        (linked, "safetensors", "holds none of"),
        (Path("/dev/zero"), "ggufv2", "/dev"),
        (Path("/proc/self/environ"), "piper", "/proc"),
        (Path("/etc/passwd"), "ggufv2", "not a GGUF"),
        (Path("/etc"), "sentence_transformers", "holds none of"),
    ]
    for path, model_format, words in cases:
        with pytest.raises(InvalidRequest, match=words):
            check_weights(path, model_format)
    with pytest.raises(InvalidRequest, match="/proc"):
        check_path(Path("/proc/self/environ"))


# ---- against the server ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(chat_server: ShoalServer, embed_server: ShoalServer) -> Iterator[httpx.Client]:
    """One connection for the whole module: every refusal must leave it usable."""
    with httpx.Client(base_url=chat_server.url, timeout=120, limits=httpx.Limits(max_connections=1)) as http:
        yield http


def _send(client: httpx.Client, method: str, path: str, body: Any) -> tuple[httpx.Response, Any]:
    """The response (read) and the local address of the connection that carried it."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    with client.stream(method, path, content=content, headers=headers) as response:
        address = response.extensions["network_stream"].get_extra_info("client_addr")
        response.read()
    return response, address


def refused(client: httpx.Client, path: str, body: Any, words: str = "", status: int = 400) -> str:
    """POST `body`; assert a 4xx in the OpenAI error shape, then a normal request on the same
    connection. Returns the error message."""
    response, address = _send(client, "POST", path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code", "param"}, error
    assert words in error["message"], error["message"]
    assert response.headers.get("connection", "").lower() != "close"
    ok, again = _send(client, "POST", "/v1/embeddings", {"model": EMBED_MODEL, "input": "still here"})
    assert ok.status_code == 200, ok.text
    assert again == address, "the connection was dropped after the error"
    return str(error["message"])


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": CHAT_MODEL, "messages": MSG, "max_tokens": 2, "temperature": 0, **fields}


@pytest.mark.parametrize(
    "fields",
    [
        {"logprobs": True, "top_logprobs": 10**9},
        {"logprobs": True, "top_logprobs": 21},
        {"logprobs": True, "top_logprobs": -1},
        {"top_logprobs": 2},  # needs logprobs: true (OpenAI's rule)
        {"n_probs": 10**6},  # llama.cpp's own name for it
    ],
)
def test_top_logprobs_bounded(client: httpx.Client, fields: dict[str, Any]) -> None:
    refused(client, "/v1/chat/completions", chat(**fields))


def test_logprobs_without_top_logprobs_has_no_alternatives(client: httpx.Client) -> None:
    answer = client.post("/v1/chat/completions", json=chat(logprobs=True)).json()
    tokens = answer["choices"][0]["logprobs"]["content"]
    assert tokens and all(t["top_logprobs"] == [] and t["logprob"] <= 0 for t in tokens)
    answer = client.post("/v1/chat/completions", json=chat(logprobs=True, top_logprobs=2)).json()
    assert all(len(t["top_logprobs"]) == 2 for t in answer["choices"][0]["logprobs"]["content"])
    with client.stream("POST", "/v1/chat/completions", json=chat(logprobs=True, stream=True)) as stream:
        events = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: {")]
    streamed = [
        t for e in events for c in e["choices"] for t in (c.get("logprobs") or {}).get("content") or []
    ]
    assert streamed and all(t["top_logprobs"] == [] for t in streamed)


def test_completion_logprobs_bounded(client: httpx.Client) -> None:
    body = {"model": CHAT_MODEL, "prompt": "Once", "max_tokens": 2, "temperature": 0}
    for bad in (6, -1, 10**9):
        refused(client, "/v1/completions", {**body, "logprobs": bad})
    chosen = client.post("/v1/completions", json={**body, "logprobs": 0}).json()["choices"][0]["logprobs"]
    assert chosen["tokens"] and chosen["top_logprobs"] == [{}] * len(chosen["tokens"])  # completions shape
    two = client.post("/v1/completions", json={**body, "logprobs": 2}).json()["choices"][0]["logprobs"]
    assert all(len(top) == 2 for top in two["top_logprobs"])


def _prompt_tokens(client: httpx.Client) -> float:
    return float(client.get(f"/v1/models/{CHAT_MODEL}/engine_metrics").json()["prompt_tokens_total"])


def test_prompt_far_beyond_the_context_is_refused_before_tokenizing(client: httpx.Client) -> None:
    # the session's chat model runs with llama.cpp's default context per slot (or less)
    limit = ESTIMATE_DEFAULTS["llama.cpp"]["context"] * CHARS_PER_TOKEN
    before = _prompt_tokens(client)
    huge = "word " * (limit // 5 + 1000)
    message = refused(client, "/v1/chat/completions", chat(messages=[{"role": "user", "content": huge}]))
    numbers = re.search(r"has ([\d,]+) characters.*context of ([\d,]+) tokens.*at most ([\d,]+)", message)
    assert numbers, message
    chars, context, most = (int(n.replace(",", "")) for n in numbers.groups())
    assert chars == len(huge) and most == context * CHARS_PER_TOKEN < chars
    parts = [{"type": "text", "text": huge[: limit // 2]}, {"type": "text", "text": huge[: limit // 2 + 10]}]
    refused(client, "/v1/chat/completions", chat(messages=[{"role": "user", "content": parts}]), "characters")
    completion = {"model": CHAT_MODEL, "prompt": ["fine", huge], "max_tokens": 1}
    refused(client, "/v1/completions", completion, "the prompt has")
    assert _prompt_tokens(client) == before  # llama.cpp never saw them


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "top_k": NaN}',
        b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}',
        b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "min_p": -Infinity}',
        b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "repeat_penalty": NaN}',
        b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "top_p": 1e400}',
        b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "my_extra": {"a": [1, NaN]}}',
        b'{"model": "%s", "messages": [{"role": "user", "content": "hi", "weight": NaN}]}',
    ],
)
def test_non_finite_numbers_refused(client: httpx.Client, body: bytes) -> None:
    refused(client, "/v1/chat/completions", body % CHAT_MODEL.encode(), "finite")


@pytest.mark.parametrize(
    "fields",
    [{"top_k": -5}, {"top_k": "many"}, {"min_p": 1.5}, {"typical_p": 2}, {"repeat_penalty": 0},
     {"repetition_penalty": -1}, {"mirostat": 3}, {"repeat_last_n": -2}],
)  # fmt: skip
def test_sampling_extras_bounded(client: httpx.Client, fields: dict[str, Any]) -> None:
    refused(client, "/v1/chat/completions", chat(**fields), next(iter(fields)))


def test_sampling_extras_in_bounds_still_work(client: httpx.Client) -> None:
    fields = {"top_k": 40, "min_p": 0.05, "typical_p": 1.0, "repeat_penalty": 1.1, "repeat_last_n": 64}
    assert client.post("/v1/chat/completions", json=chat(**fields)).status_code == 200


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ([-1], "not a token id"),
        ([[101, 7592], [5, -3]], "not a token id"),
        ([10**9], "not in this model's vocabulary"),
        ([[101, 10**6, 102]], "not in this model's vocabulary"),
        ([15339, 1917], "check_embedding_ctx_length=False"),  # LangChain's cl100k ids for "hello world"
        ("x" * (TRUNCATED_INPUT_CHARS + 1), "per input"),
        ("long document " * 200, "has 402 tokens; this model embeds at most 256"),  # not cut silently
    ],
)
def test_embedding_inputs_bounded(client: httpx.Client, value: Any, words: str) -> None:
    truncate = {"truncate": True} if words == "per input" else {}
    refused(client, "/v1/embeddings", {"model": EMBED_MODEL, "input": value, **truncate}, words)


def test_embedding_inputs_in_bounds_still_work(client: httpx.Client) -> None:
    # the model's own ids ([CLS] hello [SEP]); 280,000 characters, of which 256 tokens are embedded
    for value, tokens in (([[101, 7592, 102]], 3), ("long document " * 20_000, 256)):
        body = {"model": EMBED_MODEL, "input": value, "truncate": True}
        response = client.post("/v1/embeddings", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["prompt_tokens"] == tokens  # what was embedded
    nan = b'{"model": "%s", "input": "x", "extra": NaN}' % EMBED_MODEL.encode()
    refused(client, "/v1/embeddings", nan, "finite")


@pytest.fixture
def piper(server: ShoalServer) -> Iterator[str]:
    response = server.http.post("/v1/models", json={"model_name": TTS_MODEL})
    assert response.status_code == 200, response.text
    wait_until_ready(server, TTS_MODEL)
    yield TTS_MODEL
    server.http.delete(f"/v1/models/{TTS_MODEL}")


def test_speech_control_characters(client: httpx.Client, piper: str) -> None:
    body = {"model": piper, "response_format": "wav"}
    response = client.post("/v1/audio/speech", json={**body, "input": "Hello\x00 there\x07."})
    assert response.status_code == 200, response.text
    assert response.content[:4] == b"RIFF" and len(response.content) > 1000
    refused(client, "/v1/audio/speech", {**body, "input": "\x00\x01\x1b"}, "non-empty")


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"n_ctx": "abc"}, "n_ctx must be an integer"),
        ({"n_ctx": 0}, "n_ctx must be an integer from 16"),
        ({"n_parallel": 0}, "n_parallel"),
        ({"n_threads": "many"}, "n_threads"),
        ({"n_batch": 1.5}, "n_batch"),
        ({"n_gpu_layers": True}, "n_gpu_layers"),
        ({"n_ctx": 512, "max_num_seqs": 4}, "unknown option(s) for engine llama.cpp: max_num_seqs"),
        ({"replica": "abc"}, "replica"),
        ({"replica": 0}, "replica"),
        ({"gpu_memory": "lots"}, "gpu_memory"),
        ({"gpu_memory": -5}, "gpu_memory"),
        ({"keep_alive": "forever"}, "keep_alive"),
        ({"model_path": "/dev/zero"}, "/dev"),
        ({"model_path": "/proc/self/environ"}, "/proc"),
        ({"model_path": "/etc"}, "is a folder"),
        ({"model_path": "/etc/passwd"}, "not a GGUF"),
    ],
)
def test_bad_launches_refused(client: httpx.Client, fields: dict[str, Any], words: str) -> None:
    refused(client, "/v1/models", {"model_name": CHAT_MODEL, "model_uid": "hostile", **fields}, words)
    assert client.get("/v1/models/hostile").status_code == 404


def test_launch_through_a_symlink_to_a_device_refused(client: httpx.Client, tmp_path: Path) -> None:
    link = tmp_path / "weights.gguf"
    link.symlink_to("/dev/zero")
    body = {"model_name": CHAT_MODEL, "model_uid": "hostile", "model_path": str(link)}
    refused(client, "/v1/models", body, "/dev")


def test_bad_estimates_refused(client: httpx.Client) -> None:
    refused(client, "/v1/models/estimate", {"model_name": CHAT_MODEL, "n_ctx": "abc"}, "n_ctx")
    refused(client, "/v1/models/estimate", {"model_name": CHAT_MODEL, "n_parallel": 0}, "n_parallel")


@pytest.mark.parametrize(
    ("model_type", "model_format", "path", "words"),
    [
        ("LLM", "ggufv2", "/etc/passwd", "not a GGUF"),
        ("LLM", "ggufv2", "/etc", "is a folder"),
        ("LLM", "ggufv2", "/dev/zero", "/dev"),
        ("LLM", "ggufv2", "/proc/self/environ", "/proc"),
        ("LLM", "pytorch", "/etc", "holds none of"),
        ("embedding", "sentence_transformers", "/etc", "holds none of"),
        ("embedding", "sentence_transformers", "/proc/self", "/proc"),
    ],
)
def test_registration_checks_the_weights(
    client: httpx.Client, model_type: str, model_format: str, path: str, words: str
) -> None:
    model = {"model_name": "hostile-reg", "model_specs": [{"model_format": model_format, "model_uri": path}]}
    refused(client, f"/v1/model_registrations/{model_type}", {"model": model, "persist": False}, words)
    assert client.get(f"/v1/model_registrations/{model_type}/hostile-reg").status_code == 404
