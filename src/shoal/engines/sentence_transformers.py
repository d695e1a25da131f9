"""sentence-transformers for embedding models (CPU or CUDA, torch).

Requests are checked one by one (token ids, lengths) on a thread of their own with a copy of the
model's tokenizer, then batched across requests (engines/batching.py): the model embeds the inputs of
many requests in one call, and each request shapes its own vectors (dimensions, normalisation,
encoding) and usage.
"""

from __future__ import annotations

import asyncio
import base64
import copy
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from shoal.engines.base import FOREIGN_IDS, Engine
from shoal.engines.batching import Batcher, BatchSettings
from shoal.engines.torch_park import park_modules, wake_modules
from shoal.errors import InvalidRequest


class SentenceTransformersEngine(Engine):
    name = "sentence_transformers"
    can_park = True

    def load(self) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        opts = self.pop_options()
        if self.config.n_threads:
            torch.set_num_threads(self.config.n_threads)
        self.cap_cuda_memory(opts)  # the scheduler's reservation, before any weight
        self._batch_size = int(opts.get("batch_size", 32))
        self._model = SentenceTransformer(
            str(self.config.model_path),
            device=self.config.device,
            trust_remote_code=bool(opts.get("trust_remote_code", False)),
            local_files_only=True,
        )
        self.dimensions = self._model.get_embedding_dimension()
        # Requests are checked with their own copy of the tokenizer on their own thread: a fast
        # tokenizer used from two threads at once raises "Already borrowed", and the model's copy is
        # busy in the batch's forward pass.
        self._tokenizer = copy.deepcopy(self._model.tokenizer)
        self._checks = ThreadPoolExecutor(1, thread_name_prefix="shoal-check")
        self._batcher: Batcher[str, Any] = Batcher(self._embed_batch, BatchSettings.from_options(opts))

    def park(self) -> None:
        park_modules([self._model], self.config.device)

    def wake(self) -> None:
        wake_modules([self._model], self.config.device)

    def close(self) -> None:
        self._batcher.close()
        self._checks.shutdown()
        del self._model

    def metrics(self) -> dict[str, float]:
        return {**self._batcher.counters}

    async def warm_up(self) -> str:
        await self.embed({"input": "Shoal warms the model up with one sentence."})
        return "embed"

    async def profile_run(self) -> None:
        """A full batch of inputs at the model's longest length (each cut there by the model)."""
        longest = int(getattr(self._model, "max_seq_length", None) or 512)
        texts = [" ".join(["memory"] * longest)] * self._batch_size
        await asyncio.to_thread(self._embed_batch, texts)

    def _embed_batch(self, texts: list[str]) -> Any:
        """One forward pass over many requests' inputs: full-size vectors, as the model makes them
        (its own Normalize module included); each request truncates and normalises its own."""
        return self._model.encode(texts, batch_size=self._batch_size, convert_to_numpy=True)

    def _texts(self, raw: Any) -> list[str]:
        if isinstance(raw, str):
            return [raw]
        if raw and all(isinstance(x, int) for x in raw):
            return [self._own_text(raw, 0)]
        if raw and all(isinstance(x, list) for x in raw):
            return [self._own_text(ids, i) for i, ids in enumerate(raw)]
        if not all(isinstance(x, str) for x in raw):
            raise InvalidRequest("input must be a string, a list of strings, or token ids")
        return list(raw)

    def _own_text(self, ids: list[Any], index: int) -> str:
        """The text that token ids stand for, when they are this model's own tokens: exactly what its
        tokenizer makes of that text, special tokens included. Anything else is a 400, because ids
        from another tokenizer (LangChain sends OpenAI's tiktoken ids) mostly fall inside the
        vocabulary too and would embed as some other text. Since the tokenizer gives back these very
        ids for the text, embedding the text reads exactly them."""
        tokenizer = self._tokenizer
        vocabulary = len(tokenizer)
        bad = next(
            (i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocabulary), None
        )
        if bad is not None:  # the tokenizer would raise OverflowError on a negative id, skip a large one
            raise InvalidRequest(
                f"input {index}: token id {bad!r} is not in this model's vocabulary (0 to {vocabulary - 1}). "
                + FOREIGN_IDS
            )
        text = str(tokenizer.decode(ids, skip_special_tokens=True))
        own = list(tokenizer(text, truncation=False, verbose=False)["input_ids"])
        if own != list(ids):
            shown = own if len(own) <= 12 else [*own[:12], "..."]
            raise InvalidRequest(
                f"input {index}: these token ids are not this model's own tokenization of a text (its "
                f"tokenizer makes {shown} of the text they decode to, special tokens included). "
                + FOREIGN_IDS
            )
        return text

    def _lengths(self, texts: list[str]) -> list[int]:
        """Each input's tokens as the model would read it whole (special tokens included)."""
        encoded = self._tokenizer(
            [t.strip() for t in texts], truncation=False, verbose=False, return_attention_mask=False
        )
        return [len(ids) for ids in encoded["input_ids"]]

    def _check_length(self, texts: list[str], truncate: bool) -> list[int]:
        """Tokens each input will be embedded with; over the model's limit is a 400 unless the request
        asked for truncation (then the model reads the first `limit` tokens, and usage says so)."""
        lengths = self._lengths(texts)
        limit = self._model.get_max_seq_length()
        if limit is None:
            return lengths
        if not truncate:
            over = next(((i, n) for i, n in enumerate(lengths) if n > limit), None)
            if over is not None:
                raise InvalidRequest(
                    f"input {over[0]} has {over[1]:,} tokens; this model embeds at most {limit:,} "
                    "(its max_seq_length). Send a shorter input, or truncate: true to embed its first "
                    f"{limit:,} tokens"
                )
        return [min(n, limit) for n in lengths]

    def _check(self, raw: Any, truncate: bool) -> tuple[list[str], list[int]]:
        texts = self._texts(raw)
        return texts, self._check_length(texts, truncate)

    async def embed(self, body: dict[str, Any]) -> dict[str, Any]:
        dimensions = body.get("dimensions")
        if dimensions is not None and not 0 < dimensions <= self.dimensions:
            raise InvalidRequest(f"dimensions must be between 1 and {self.dimensions}")
        truncate = body.get("truncate") is True
        loop = asyncio.get_running_loop()
        texts, lengths = await loop.run_in_executor(self._checks, self._check, body["input"], truncate)
        rows = await self._batcher.submit(texts, lengths)
        vectors = np.stack(rows) if rows else np.zeros((0, self.dimensions or 0), dtype=np.float32)
        if dimensions is not None:  # Matryoshka: the first `dimensions` values, normalised again
            vectors = vectors[:, :dimensions]
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.maximum(norms, 1e-12)
        tokens = sum(lengths)
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
