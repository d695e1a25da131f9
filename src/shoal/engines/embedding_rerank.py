"""Rerank with a sentence-transformers embedding model (CPU or CUDA, torch): the query and the
documents are embedded (the query with the model's "query" prompt, the documents with its
"document" prompt, where the model defines them) and compared by cosine similarity.

relevance_score is (cos + 1) / 2, so it lies in 0..1 like the other rerank engines' scores, and
0.5 means orthogonal; the launch option score="cosine" reports the raw cosine (-1..1) instead.
Either way the order is the cosine order. A bi-encoder ranks less sharply than a cross-encoder,
and its scores are not probabilities: related but unhelpful documents often score 0.6-0.7.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from shoal.engines.base import Engine
from shoal.engines.cross_encoder import parse_rerank, rerank_response

SCORES = ("unit", "cosine")


class EmbeddingRerankEngine(Engine):
    name = "embedding_rerank"

    def load(self) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        opts = self.pop_options()
        self._score = str(opts.get("score", "unit"))
        if self._score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, not {self._score!r}")
        if self.config.n_threads:
            torch.set_num_threads(self.config.n_threads)
        if self.config.device == "cuda" and "memory_fraction" in opts:
            # the scheduler's reservation, enforced: going past it raises OutOfMemoryError here only
            torch.cuda.set_per_process_memory_fraction(float(opts["memory_fraction"]))
        self._batch_size = int(opts.get("batch_size", 32))
        self._query_prompt: str | None = opts.get("query_prompt")
        self._document_prompt: str | None = opts.get("document_prompt")
        self._model = SentenceTransformer(
            str(self.config.model_path),
            device=self.config.device,
            trust_remote_code=bool(opts.get("trust_remote_code", False)),
            local_files_only=True,
        )
        self._lock = threading.Lock()  # torch modules are not safe to call from two threads at once

    def close(self) -> None:
        del self._model

    def _scores(self, query: str, documents: list[str]) -> tuple[list[float], int]:
        with self._lock:
            q = self._model.encode_query(
                [query],
                prompt=self._query_prompt,
                batch_size=self._batch_size,
                convert_to_tensor=True,
                normalize_embeddings=True,
            )
            d = self._model.encode_document(
                documents,
                prompt=self._document_prompt,
                batch_size=self._batch_size,
                convert_to_tensor=True,
                normalize_embeddings=True,
            )
            tokens = int(self._model.preprocess([query, *documents])["attention_mask"].sum())
        cosine = (d.float() @ q.float()[0]).clamp(-1.0, 1.0).cpu()
        scores = cosine if self._score == "cosine" else (cosine + 1.0) / 2.0
        return scores.tolist(), tokens

    async def rerank(self, body: dict[str, Any]) -> dict[str, Any]:
        request = parse_rerank(body)
        scores, tokens = await asyncio.to_thread(self._scores, request.query, request.documents)
        return rerank_response(request, scores, tokens)
