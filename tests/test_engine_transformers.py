"""The transformers engine on CPU, through its public methods, on a tiny random-weight Llama built
here (no transformers-format LLM ships in a package): MiniLM's WordPiece tokenizer with a chat
template, 2 layers of width 64. Its text is gibberish, but greedy decoding is deterministic."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import build_tiny_llama
from shoal.engines.base import EngineConfig
from shoal.engines.registry import canonical, load_class
from shoal.engines.transformers import TransformersEngine, _Detokenizer
from shoal.errors import InvalidRequest

CONTEXT = 512


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TransformersEngine]:
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(folder, 64, CONTEXT, initializer_range=0.2)  # sharp logits: no greedy ties
    assert canonical("Transformers", "safetensors") == "transformers"
    cls = load_class("transformers")
    config = EngineConfig(folder, "tiny", "pytorch", None, "cpu", 2, {"max_batch_size": 4})
    eng = cls(config)
    eng.load()
    yield eng
    eng.close()


def chat_body(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": text}], **extra}


async def collect(stream: Any) -> list[dict[str, Any]]:
    return [chunk async for chunk in stream]


def test_chat_answers_with_text_and_usage(engine: TransformersEngine) -> None:
    answer = asyncio.run(engine.chat(chat_body("hello there", temperature=0, max_tokens=12)))
    assert answer["id"].startswith("chatcmpl-") and answer["object"] == "chat.completion"
    assert answer["model"] == "tiny"
    choice = answer["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] == "length"  # max_tokens honoured
    usage = answer["usage"]
    assert usage["completion_tokens"] == 12 and usage["prompt_tokens"] > 3
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_stream_matches_the_plain_answer(engine: TransformersEngine) -> None:
    body = chat_body("tell me a story", temperature=0, max_tokens=24)
    plain = asyncio.run(engine.chat(body))["choices"][0]["message"]["content"]
    chunks = asyncio.run(collect(engine.chat_stream({**body, "stream_options": {"include_usage": True}})))
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == plain
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 24
    assert len({c["id"] for c in chunks}) == 1


def test_seed_repeats_sampling(engine: TransformersEngine) -> None:
    def sample(seed: int) -> str:
        body = chat_body("pick words", temperature=1.0, top_p=0.9, seed=seed, max_tokens=16)
        return str(asyncio.run(engine.chat(body))["choices"][0]["message"]["content"])

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_logit_bias_bans_and_forces_tokens(engine: TransformersEngine) -> None:
    def tokens(**extra: Any) -> list[int]:
        body = chat_body("pick words", temperature=0, max_tokens=8, **extra)
        text = asyncio.run(engine.chat(body))["choices"][0]["message"]["content"]
        return engine._encode(text, special=False)

    greedy = tokens()
    banned = tokens(logit_bias={str(greedy[0]): -100})
    assert banned[0] != greedy[0]
    forced_id = engine._encode("river", special=False)[0]
    assert set(tokens(logit_bias={str(forced_id): 100})) == {forced_id}
    with pytest.raises(InvalidRequest, match="past this model"):
        asyncio.run(engine.chat(chat_body("hi", logit_bias={"9999999": 5})))


def test_stop_string_cuts_the_answer(engine: TransformersEngine) -> None:
    body = chat_body("say something", temperature=0, max_tokens=30)
    full = asyncio.run(engine.chat(body))["choices"][0]["message"]["content"]
    stop = full[len(full) // 2 : len(full) // 2 + 4]
    expected = full[: full.find(stop)]
    cut = asyncio.run(engine.chat({**body, "stop": [stop, "never-appears"]}))["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["message"]["content"] == expected
    chunks = asyncio.run(collect(engine.chat_stream({**body, "stop": stop})))
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_concurrent_requests_are_decoded_as_one_batch(engine: TransformersEngine) -> None:
    prompts = ["a", "a much longer prompt than the others, to test left padding", "third one", "4"]
    bodies = [{"model": "tiny", "prompt": p, "temperature": 0, "max_tokens": 10} for p in prompts]
    alone = [asyncio.run(engine.complete(b))["choices"][0]["text"] for b in bodies]

    async def together() -> list[dict[str, Any]]:
        # a long request holds the worker, so all four wait and go in the next batch together
        busy = engine.complete_stream({"model": "tiny", "prompt": "x", "max_tokens": 300, "temperature": 0})
        await anext(busy)
        answers = asyncio.gather(*(engine.complete(b) for b in bodies))
        await collect(busy)
        return list(await answers)

    before = engine.batches_run
    answers = asyncio.run(together())
    assert engine.peak_batch_size == 4
    assert engine.batches_run - before == 2  # the busy one, then the four
    assert [a["choices"][0]["text"] for a in answers] == alone  # padding changes nothing
    assert all(a["usage"]["completion_tokens"] == 10 for a in answers)


def test_completion_with_several_prompts(engine: TransformersEngine) -> None:
    body = {"model": "tiny", "prompt": ["one", "two"], "temperature": 0, "max_tokens": 5}
    answer = asyncio.run(engine.complete(body))
    assert answer["id"].startswith("cmpl-") and [c["index"] for c in answer["choices"]] == [0, 1]
    assert answer["usage"]["completion_tokens"] == 10
    chunks = asyncio.run(collect(engine.complete_stream(body)))
    for index in (0, 1):
        text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == index)
        assert text == answer["choices"][index]["text"]


def test_cancelled_stream_frees_its_slot(engine: TransformersEngine) -> None:
    async def scenario() -> dict[str, Any]:
        stream = engine.chat_stream(chat_body("go on forever", temperature=0))  # up to the context end
        async for chunk in stream:
            if chunk["choices"][0]["delta"].get("content"):
                break
        await stream.aclose()  # type: ignore[attr-defined]
        return await asyncio.wait_for(engine.chat(chat_body("next", temperature=0, max_tokens=4)), 30)

    before = engine.requests_cancelled
    answer = asyncio.run(scenario())
    assert answer["choices"][0]["finish_reason"] == "length"
    assert engine.requests_cancelled == before + 1  # dropped, not run to the context end


def test_max_tokens_beyond_context_is_refused(engine: TransformersEngine) -> None:
    assert engine.context == CONTEXT  # the default (4096) capped by the model's max_position_embeddings
    with pytest.raises(InvalidRequest, match="context"):
        asyncio.run(engine.chat(chat_body("hi", max_tokens=CONTEXT)))
    with pytest.raises(InvalidRequest, match="context"):
        asyncio.run(collect(engine.chat_stream(chat_body("hi", max_completion_tokens=CONTEXT))))
    with pytest.raises(InvalidRequest, match="context"):
        asyncio.run(engine.complete({"model": "tiny", "prompt": "word " * CONTEXT}))


def test_n_and_echo_are_refused_not_ignored(engine: TransformersEngine) -> None:
    with pytest.raises(InvalidRequest, match="n > 1"):
        asyncio.run(engine.chat(chat_body("hi", n=2)))
    with pytest.raises(InvalidRequest, match="n > 1"):
        asyncio.run(collect(engine.complete_stream({"model": "tiny", "prompt": "hi", "n": 2})))
    with pytest.raises(InvalidRequest, match="echo"):
        asyncio.run(engine.complete({"model": "tiny", "prompt": "hi", "echo": True}))
    # log probabilities would come back null: a client that asked for them is told instead
    with pytest.raises(InvalidRequest, match="logprobs"):
        asyncio.run(engine.chat(chat_body("hi", logprobs=True)))
    with pytest.raises(InvalidRequest, match="logprobs"):
        asyncio.run(engine.complete({"model": "tiny", "prompt": "hi", "logprobs": 0}))
    asyncio.run(engine.chat(chat_body("hi", logprobs=False, max_tokens=1)))  # false asks for nothing
    with pytest.raises(InvalidRequest, match="suffix"):
        asyncio.run(engine.complete({"model": "tiny", "prompt": "hi", "suffix": "end"}))


def test_unknown_option_is_refused(tmp_path: Path) -> None:
    config = EngineConfig(tmp_path, "tiny", "pytorch", None, "cpu", 1, {"n_ctx": 64})
    with pytest.raises(ValueError, match="n_ctx"):
        TransformersEngine(config).load()


def test_detokenizer_keeps_characters_whole_and_holds_back_stops() -> None:
    """Byte-level tokens (one byte each): no half character and no piece of a stop is sent early."""
    detok = _Detokenizer(lambda ids: bytes(ids).decode("utf-8", errors="replace"), ("€ end",))
    sent = []
    for byte in "naïve € e".encode():
        delta, stopped = detok.add(byte)
        assert not stopped and "\ufffd" not in delta
        sent.append(delta)
    assert "".join(sent) == "naïve "  # "€ e" could still become the stop string
    for byte in b"nd!":
        delta, stopped = detok.add(byte)
        if stopped:
            break
    assert stopped and delta == ""
    assert detok.text == "naïve "
