"""sentence-transformers for embedding models (CPU or CUDA, torch)."""

from __future__ import annotations

import asyncio
import base64
import threading
from typing import Any

from shoal.engines.base import Engine
from shoal.errors import InvalidRequest


class SentenceTransformersEngine(Engine):
    name = "sentence_transformers"

    def load(self) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        opts = self.pop_options()
        if self.config.n_threads:
            torch.set_num_threads(self.config.n_threads)
        if self.config.device == "cuda" and "memory_fraction" in opts:
            # the scheduler's reservation, enforced: going past it raises OutOfMemoryError here only
            torch.cuda.set_per_process_memory_fraction(float(opts["memory_fraction"]))
        self._batch_size = int(opts.get("batch_size", 32))
        self._model = SentenceTransformer(
            str(self.config.model_path),
            device=self.config.device,
            trust_remote_code=bool(opts.get("trust_remote_code", False)),
            local_files_only=True,
        )
        self.dimensions = self._model.get_embedding_dimension()
        self._lock = threading.Lock()  # torch modules are not safe to call from two threads at once

    def close(self) -> None:
        del self._model

    def _texts(self, raw: Any) -> list[str]:
        if isinstance(raw, str):
            return [raw]
        if raw and all(isinstance(x, int) for x in raw):
            return [self._decode(raw)]
        if raw and all(isinstance(x, list) for x in raw):
            return [self._decode(ids) for ids in raw]
        if not all(isinstance(x, str) for x in raw):
            raise InvalidRequest("input must be a string, a list of strings, or token ids")
        return list(raw)

    def _decode(self, ids: list[Any]) -> str:
        """Token ids back to text; an id outside the vocabulary is a 400 (the tokenizer would raise
        OverflowError on a negative one and skip one past the end silently)."""
        vocabulary = len(self._model.tokenizer)
        bad = next(
            (i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocabulary), None
        )
        if bad is not None:
            raise InvalidRequest(
                f"token id {bad!r} is not in this model's vocabulary (0 to {vocabulary - 1})"
            )
        return str(self._model.tokenizer.decode(ids))

    def _encode(self, texts: list[str], dimensions: int | None) -> tuple[Any, int]:
        with self._lock:
            vectors = self._model.encode(
                texts,
                batch_size=self._batch_size,
                convert_to_numpy=True,
                truncate_dim=dimensions,
                normalize_embeddings=dimensions is not None,
            )
            tokens = int(self._model.preprocess(texts)["attention_mask"].sum())
        return vectors, tokens

    async def embed(self, body: dict[str, Any]) -> dict[str, Any]:
        texts = self._texts(body["input"])
        dimensions = body.get("dimensions")
        if dimensions is not None and not 0 < dimensions <= self.dimensions:
            raise InvalidRequest(f"dimensions must be between 1 and {self.dimensions}")
        vectors, tokens = await asyncio.to_thread(self._encode, texts, dimensions)
        as_base64 = body.get("encoding_format") == "base64"
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()
                if as_base64
                else v.tolist(),
            }
            for i, v in enumerate(vectors)
        ]
        return {
            "object": "list",
            "data": data,
            "model": self.config.model_uid,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
