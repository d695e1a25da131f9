"""Frameworks pointed at Shoal, end to end with their real code: LangChain's OpenAIEmbeddings and
LiteLLM (chat, embeddings, Cohere rerank), against the session server's demo models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # read at import: no fetch of the cost map

import litellm  # noqa: E402
import openai  # noqa: E402
from langchain_openai import OpenAIEmbeddings  # noqa: E402

from conftest import CHAT_MODEL, EMBED_MODEL, ShoalServer  # noqa: E402

# LiteLLM's pydantic types warn about ReadOnly TypedDict items at import time
pytestmark = pytest.mark.filterwarnings(
    "ignore:Item.*ReadOnly:UserWarning", "ignore:Items.*ReadOnly:UserWarning"
)
RERANK_MODEL = "minilm-rerank"
TEXTS = ["hello world", "The quick brown fox jumps over the lazy dog."]
# LangChain tokenizes with tiktoken's cl100k_base, whose file tiktoken downloads on first use; LiteLLM
# ships that file, so the test needs no network.
os.environ.setdefault(
    "TIKTOKEN_CACHE_DIR", str(Path(litellm.__file__).parent / "litellm_core_utils" / "tokenizers")
)


@pytest.fixture(scope="module")
def shoal(chat_server: ShoalServer, embed_server: ShoalServer) -> ShoalServer:
    chat_server.ensure(RERANK_MODEL)
    return chat_server


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5)


def direct(shoal: ShoalServer, texts: list[str]) -> list[list[float]]:
    answer = shoal.http.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": texts}).json()
    return [item["embedding"] for item in sorted(answer["data"], key=lambda d: d["index"])]


def langchain(shoal: ShoalServer, **options: object) -> OpenAIEmbeddings:
    return OpenAIEmbeddings(
        model=EMBED_MODEL, base_url=shoal.url + "/v1", api_key="unused", max_retries=0, **options
    )


def test_langchain_at_its_defaults_gets_a_clear_400(shoal: ShoalServer) -> None:
    """At its defaults LangChain sends tiktoken cl100k ids ([15339, 1917] for "hello world"); they lie
    inside MiniLM's vocabulary but are not its tokens, so Shoal refuses them and names the fix rather
    than embed 'denise 皇'."""
    with pytest.raises(openai.BadRequestError) as refused:
        langchain(shoal).embed_documents(TEXTS)
    assert refused.value.status_code == 400
    assert "check_embedding_ctx_length=False" in refused.value.message


def test_langchain_sending_text_gets_shoals_own_vectors(shoal: ShoalServer) -> None:
    embeddings = langchain(shoal, check_embedding_ctx_length=False)
    vectors = embeddings.embed_documents(TEXTS)
    query = embeddings.embed_query(TEXTS[0])
    expected = direct(shoal, TEXTS)
    assert len(vectors) == 2 and len(vectors[0]) == 384
    for got, want in zip([*vectors, query], [*expected, expected[0]], strict=True):
        assert cosine(got, want) > 0.99
    assert cosine(vectors[0], vectors[1]) < 0.9  # two different texts, two different vectors


def test_litellm_chat(shoal: ShoalServer) -> None:
    answer = litellm.completion(
        model=f"openai/{CHAT_MODEL}",
        api_base=shoal.url + "/v1",
        api_key="unused",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=8,
        temperature=0,
    )
    assert answer.choices[0].message.content.strip()
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert 0 < answer.usage.completion_tokens <= 8 and answer.usage.prompt_tokens > 5


def test_litellm_embedding(shoal: ShoalServer) -> None:
    answer = litellm.embedding(
        model=f"openai/{EMBED_MODEL}", api_base=shoal.url + "/v1", api_key="unused", input=TEXTS
    )
    vectors = [item["embedding"] for item in sorted(answer.data, key=lambda d: d["index"])]
    for got, want in zip(vectors, direct(shoal, TEXTS), strict=True):
        assert cosine(got, want) > 0.99
    assert answer.usage.prompt_tokens == 4 + 12  # [CLS] ... [SEP] each: what was embedded


def test_litellm_cohere_rerank(shoal: ShoalServer) -> None:
    documents = ["Paris is the capital of France.", "Bananas are yellow.", "France's capital city is Paris."]
    answer = litellm.rerank(
        model=f"cohere/{RERANK_MODEL}",
        api_base=shoal.url,
        api_key="unused",
        query="What is the capital of France?",
        documents=documents,
        top_n=2,
    )
    assert len(answer.results) == 2
    assert {r["index"] for r in answer.results} == {0, 2}  # the two about Paris, not the bananas
    assert answer.results[0]["relevance_score"] >= answer.results[1]["relevance_score"]
