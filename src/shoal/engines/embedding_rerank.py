"""Rerank with a sentence-transformers embedding model (CPU or CUDA, torch): the query and the
documents are embedded (the query with the model's "query" prompt, the documents with its
"document" prompt, where the model defines them) and compared by cosine similarity.

relevance_score is (cos + 1) / 2, so it lies in 0..1 like the other rerank engines' scores, and
0.5 means orthogonal; the launch option score="cosine" reports the raw cosine (-1..1) instead.
Either way the order is the cosine order. A bi-encoder ranks less sharply than a cross-encoder,
and its scores are not probabilities: related but unhelpful documents often score 0.6-0.7.
"""

from __future__ import annotations

from typing import Any

from shoal.engines.base import Engine
from shoal.engines.batching import Batcher, BatchSettings
from shoal.engines.cross_encoder import WARM_UP, parse_rerank, rerank_response, rough_tokens
from shoal.engines.torch_park import park_modules, wake_modules

SCORES = ("unit", "cosine")


class EmbeddingRerankEngine(Engine):
    name = "embedding_rerank"
    can_park = True

    def load(self) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        opts = self.pop_options()
        self._score = str(opts.get("score", "unit"))
        if self._score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, not {self._score!r}")
        if self.config.n_threads:
            torch.set_num_threads(self.config.n_threads)
        self.cap_cuda_memory(opts)  # the scheduler's reservation, before any weight
        self._batch_size = int(opts.get("batch_size", 32))
        self._query_prompt: str | None = opts.get("query_prompt")
        self._document_prompt: str | None = opts.get("document_prompt")
        self._model = SentenceTransformer(
            str(self.config.model_path),
            device=self.config.device,
            trust_remote_code=bool(opts.get("trust_remote_code", False)),
            local_files_only=True,
        )
        # Items of a batch: ("query", text) or ("document", text), from many requests.
        self._batcher: Batcher[tuple[str, str], tuple[Any, int]] = Batcher(
            self._embed_batch, BatchSettings.from_options(opts)
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

    def _embed_batch(self, items: list[tuple[str, str]]) -> list[tuple[Any, int]]:
        """(unit vector, tokens) of each item: the queries with the query prompt, the documents with
        the document prompt, each kind in one call."""
        out: list[tuple[Any, int]] = [(None, 0)] * len(items)
        for kind, encode, prompt in (
            ("query", self._model.encode_query, self._query_prompt),
            ("document", self._model.encode_document, self._document_prompt),
        ):
            where = [i for i, (k, _) in enumerate(items) if k == kind]
            if not where:
                continue
            texts = [items[i][1] for i in where]
            vectors = encode(
                texts, prompt=prompt, batch_size=self._batch_size, convert_to_tensor=True,
                normalize_embeddings=True,
            )  # fmt: skip
            tokens = self._model.preprocess(texts)["attention_mask"].sum(dim=1).tolist()
            for i, vector, n in zip(where, vectors.float().cpu(), tokens, strict=True):
                out[i] = (vector, int(n))
        return out

    async def rerank(self, body: dict[str, Any]) -> dict[str, Any]:
        import torch

        request = parse_rerank(body)
        items = [("query", request.query), *(("document", doc) for doc in request.documents)]
        embedded = await self._batcher.submit(items, [rough_tokens(text) for _, text in items])
        q = embedded[0][0]
        d = torch.stack([vector for vector, _ in embedded[1:]])
        cosine = (d @ q).clamp(-1.0, 1.0)
        scores = cosine if self._score == "cosine" else (cosine + 1.0) / 2.0
        return rerank_response(request, scores.tolist(), sum(n for _, n in embedded))
