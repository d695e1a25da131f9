"""The OpenAI routes through the real `openai` SDK against a real server and real models."""

from __future__ import annotations

import math
import threading

import pytest

from conftest import CHAT_MODEL, EMBED_MODEL

pytestmark = pytest.mark.usefixtures("chat_server", "embed_server")


def test_models_lists_running_models(openai_client) -> None:
    ids = {m.id for m in openai_client.models.list().data}
    assert {CHAT_MODEL, EMBED_MODEL} <= ids


def test_chat_answers_with_text_and_usage(openai_client) -> None:
    answer = openai_client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0,
        seed=7,
    )
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content.strip()
    assert answer.usage.prompt_tokens > 5
    assert 0 < answer.usage.completion_tokens <= 24
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert answer.model == CHAT_MODEL


def test_max_tokens_bounds_the_answer(openai_client) -> None:
    answer = openai_client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "Write a long story about a dragon."}],
        max_tokens=3,
        temperature=0,
    )
    assert answer.usage.completion_tokens == 3
    assert answer.choices[0].finish_reason == "length"


def test_seed_and_zero_temperature_repeat(openai_client) -> None:
    def ask() -> str:
        answer = openai_client.chat.completions.create(
            model=CHAT_MODEL,
            messages=[{"role": "user", "content": "Name three colours."}],
            max_tokens=16,
            temperature=0.8,
            top_p=0.9,
            seed=42,
        )
        return answer.choices[0].message.content

    assert ask() == ask()


def test_stop_string_ends_the_answer(openai_client) -> None:
    messages = [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]
    free = openai_client.chat.completions.create(
        model=CHAT_MODEL, messages=messages, max_tokens=40, temperature=0
    )
    text = free.choices[0].message.content
    assert "5" in text, text
    stopped = openai_client.chat.completions.create(
        model=CHAT_MODEL, messages=messages, max_tokens=40, temperature=0, stop=["5"]
    )
    assert "5" not in stopped.choices[0].message.content
    assert stopped.choices[0].message.content == text[: text.index("5")]
    assert stopped.choices[0].finish_reason == "stop"


def test_chat_streams_chunks_then_done(openai_client) -> None:
    stream = openai_client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "Say hello in five words."}],
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert len([p for p in pieces if p]) >= 2
    assert "".join(pieces).strip()
    assert finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens > 0


def test_streamed_and_whole_answers_agree(openai_client) -> None:
    kwargs = dict(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "Name a fruit."}],
        max_tokens=12,
        temperature=0,
        seed=1,
    )
    whole = openai_client.chat.completions.create(**kwargs).choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in openai_client.chat.completions.create(stream=True, **kwargs)
        if c.choices
    )
    assert streamed == whole


def test_completions(openai_client) -> None:
    answer = openai_client.completions.create(
        model=CHAT_MODEL, prompt="Once upon a time", max_tokens=12, temperature=0
    )
    assert answer.choices[0].text.strip()
    assert answer.usage.completion_tokens == 12
    streamed = openai_client.completions.create(
        model=CHAT_MODEL, prompt="Once upon a time", max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == answer.choices[0].text


def test_parallel_requests_share_the_model(openai_client) -> None:
    """llama.cpp's slots serve requests together: all four streams start before any finishes."""
    events: list[tuple[str, int]] = []
    lock = threading.Lock()

    def stream(i: int) -> None:
        first = True
        for chunk in openai_client.chat.completions.create(
            model=CHAT_MODEL,
            messages=[{"role": "user", "content": f"Tell story number {i} about a cat."}],
            max_tokens=48,
            temperature=0,
            stream=True,
        ):
            if first and chunk.choices and chunk.choices[0].delta.content:
                first = False
                with lock:
                    events.append(("first", i))
        with lock:
            events.append(("done", i))

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    kinds = [kind for kind, _ in events]
    assert kinds.count("done") == 4
    assert kinds[:4] == ["first"] * 4, events


def _cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def test_embeddings_are_real(openai_client) -> None:
    sentences = ["A man is eating food.", "A man is eating a meal.", "The stock market fell sharply today."]
    result = openai_client.embeddings.create(model=EMBED_MODEL, input=sentences, encoding_format="float")
    vectors = [d.embedding for d in sorted(result.data, key=lambda d: d.index)]
    assert [len(v) for v in vectors] == [384, 384, 384]
    for v in vectors:
        assert math.isclose(math.sqrt(_cos(v, v)), 1.0, rel_tol=1e-3)
    assert _cos(vectors[0], vectors[1]) > _cos(vectors[0], vectors[2]) + 0.3
    assert result.usage.prompt_tokens > 10
    assert result.model == EMBED_MODEL


def test_embeddings_base64_matches_float(openai_client) -> None:
    # The SDK asks for base64 by default and decodes it; compare with an explicit float request.
    as_b64 = openai_client.embeddings.create(model=EMBED_MODEL, input="hello world").data[0].embedding
    as_float = (
        openai_client.embeddings.create(model=EMBED_MODEL, input="hello world", encoding_format="float")
        .data[0]
        .embedding
    )
    assert len(as_b64) == 384
    assert max(abs(a - b) for a, b in zip(as_b64, as_float, strict=True)) < 1e-6


def test_embeddings_single_string_and_dimensions(openai_client) -> None:
    one = openai_client.embeddings.create(model=EMBED_MODEL, input="just one", encoding_format="float")
    assert len(one.data) == 1
    short = openai_client.embeddings.create(
        model=EMBED_MODEL, input="just one", dimensions=64, encoding_format="float"
    )
    vector = short.data[0].embedding
    assert len(vector) == 64
    assert math.isclose(math.sqrt(_cos(vector, vector)), 1.0, rel_tol=1e-3)
