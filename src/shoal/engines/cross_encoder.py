"""sentence-transformers cross-encoders for rerank (CPU or CUDA, torch).

A cross-encoder reads the query and one document together and gives one logit per pair.
relevance_score is sigmoid(logit) for one-label models (the usual reranker head; the model's own
saved activation is ignored so every model reports 0..1), or the softmax probability of label 1
for two-label models (label 0 irrelevant, label 1 relevant). Models with more labels (NLI
classifiers) are refused at load.

This module also holds what the rerank engines share: checking the request body and shaping the
response (the Xinference/Jina/Cohere rerank shape).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from shoal.engines.base import Engine
from shoal.engines.batching import Batcher, BatchSettings
from shoal.engines.torch_park import park_modules, wake_modules
from shoal.errors import InvalidRequest

MAX_DOCUMENTS = 1000


@dataclass(frozen=True)
class RerankRequest:
    query: str
    documents: list[str]
    top_n: int | None
    return_documents: bool


def parse_rerank(body: dict[str, Any]) -> RerankRequest:
    """Check a rerank body; documents may be strings or {"text": str} objects."""
    query = body.get("query")
    if not isinstance(query, str) or not query.strip():
        raise InvalidRequest("query must be a non-empty string")
    documents = body.get("documents")
    if not isinstance(documents, list) or not documents:
        raise InvalidRequest("documents must be a non-empty list of strings")
    if len(documents) > MAX_DOCUMENTS:
        raise InvalidRequest(f"at most {MAX_DOCUMENTS} documents per request, got {len(documents)}")
    texts: list[str] = []
    for i, doc in enumerate(documents):
        if isinstance(doc, dict) and isinstance(doc.get("text"), str):
            doc = doc["text"]
        if not isinstance(doc, str):
            raise InvalidRequest(f"documents[{i}] must be a string")
        texts.append(doc)
    top_n = body.get("top_n")
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
        raise InvalidRequest("top_n must be a positive integer")
    return RerankRequest(query, texts, top_n, bool(body.get("return_documents") or False))


def rough_tokens(*texts: str) -> int:
    """A rerank input's cost for the batch budget and its place in the length order, before any
    tokenizer has read it: about four characters a token, plus the special tokens."""
    return sum(len(text) for text in texts) // 4 + 3


WARM_UP = {"query": "What warms a model up?", "documents": ["One real inference before it is ready."]}


def rerank_response(request: RerankRequest, scores: Sequence[float], tokens: int | None) -> dict[str, Any]:
    """Results sorted best first (ties keep document order), cut to top_n."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    if request.top_n is not None:
        order = order[: request.top_n]
    results: list[dict[str, Any]] = []
    for i in order:
        result: dict[str, Any] = {"index": i, "relevance_score": float(scores[i])}
        if request.return_documents:
            result["document"] = {"text": request.documents[i]}
        results.append(result)
    usage = {} if tokens is None else {"prompt_tokens": tokens, "total_tokens": tokens}
    return {"results": results, "usage": usage}


class CrossEncoderEngine(Engine):
    name = "cross_encoder"
    can_park = True

    def load(self) -> None:
        import torch
        from sentence_transformers import CrossEncoder

        opts = self.pop_options()
        if self.config.n_threads:
            torch.set_num_threads(self.config.n_threads)
        self.cap_cuda_memory(opts)  # the scheduler's reservation, before any weight
        self._batch_size = int(opts.get("batch_size", 32))
        max_length = opts.get("max_length")
        self._model = CrossEncoder(
            str(self.config.model_path),
            device=self.config.device,
            trust_remote_code=bool(opts.get("trust_remote_code", False)),
            local_files_only=True,
            max_length=int(max_length) if max_length is not None else None,
            activation_fn=torch.nn.Identity(),  # raw logits; _scores maps them to 0..1 itself
        )
        self.num_labels = self._model.num_labels
        if self.num_labels not in (1, 2):
            raise ValueError(
                f"{self.config.model_path} has {self.num_labels} labels; a reranker has 1 (a relevance "
                "logit) or 2 (irrelevant, relevant)"
            )
        self._batcher: Batcher[tuple[str, str], tuple[Any, int | None]] = Batcher(
            self._score_batch, BatchSettings.from_options(opts)
        )

    def park(self) -> None:
        park_modules([self._model], self.config.device)

    def wake(self) -> None:
        wake_modules([self._model], self.config.device)

    def close(self) -> None:
        self._batcher.close()
        del self._model

    def metrics(self) -> dict[str, float]:
        return {**self._batcher.counters}

    async def warm_up(self) -> str:
        await self.rerank(WARM_UP)
        return "rerank"

    def _score_batch(self, pairs: list[tuple[str, str]]) -> list[tuple[Any, int | None]]:
        """(logits, tokens) of each (query, document) pair, many requests' pairs in one call."""
        logits = self._model.predict(pairs, batch_size=self._batch_size, convert_to_tensor=True)
        logits = logits.float().cpu().reshape(len(pairs), -1)
        try:
            tokens: list[int | None] = self._model.preprocess(pairs)["attention_mask"].sum(dim=1).tolist()
        except (KeyError, TypeError):
            tokens = [None] * len(pairs)
        return list(zip(logits, tokens, strict=True))

    async def rerank(self, body: dict[str, Any]) -> dict[str, Any]:
        import torch

        request = parse_rerank(body)
        pairs = [(request.query, doc) for doc in request.documents]
        scored = await self._batcher.submit(pairs, [rough_tokens(q, d) for q, d in pairs])
        logits = torch.stack([row for row, _ in scored])
        if self.num_labels == 1:
            scores = torch.sigmoid(logits.reshape(-1))
        else:
            scores = torch.softmax(logits, dim=-1)[:, 1]
        counts = [n for _, n in scored]
        tokens = None if None in counts else sum(n for n in counts if n is not None)
        return rerank_response(request, scores.tolist(), tokens)
