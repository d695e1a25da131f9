"""Rerank with an instruct LLM in GGUF form, through xllamacpp (llama.cpp in-process), the way
Qwen3-Reranker is used: for each document the model is asked, with its own chat template, whether
the document meets the query, and answers with one token.

relevance_score = P(yes) / (P(yes) + P(no)) for that first answer token, where P(yes) sums the
probabilities of the single-token spellings of "yes" the vocabulary has ("yes", "Yes", " yes", ...)
and P(no) likewise. It is read exactly, not from a top-k list that might miss one of the two: every
yes/no token gets the same logit bias (+100), which leaves their ratios unchanged and puts them
above every other token, top_k keeps only them, and llama.cpp's post-sampling probabilities are
then the softmax over the yes/no tokens alone.

Documents are scored concurrently on the server's n_parallel slots; each shares the system prompt,
instruction and query as a prefix, which llama.cpp's prompt cache reuses. A document too long for a
slot's context is cut from its end until the prompt fits. The quality is the model's: a model this
was not trained for may rank no better than chance (SmolLM2-135M does).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from shoal.engines.base import ESTIMATE_DEFAULTS, Engine
from shoal.engines.cross_encoder import parse_rerank, rerank_response
from shoal.engines.llamacpp import start_server
from shoal.errors import InvalidRequest, ShoalError

DEFAULT_PARALLEL: int = ESTIMATE_DEFAULTS["llama.cpp"]["parallel"]
DEFAULT_CONTEXT: int = ESTIMATE_DEFAULTS["llama.cpp"]["context"]  # per slot, capped by the model's own
SYSTEM_PROMPT = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".'
)
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
YES = ("yes", "Yes", "YES")
NO = ("no", "No", "NO")
BIAS = 100.0  # logits rarely spread over more than ~40; +100 puts the biased tokens above all others
TRUNCATE_TRIES = 4
# Sampling settings that leave the biased distribution as it is (temperature 1, no other cut-offs).
NEUTRAL_SAMPLING: dict[str, Any] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "min_p": 0.0,
    "typical_p": 1.0,
    "repeat_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "dry_multiplier": 0.0,
    "xtc_probability": 0.0,
    "post_sampling_probs": True,
    "max_tokens": 1,
}


def _error(result: dict[str, Any]) -> dict[str, Any] | None:
    """xllamacpp returns llama.cpp's errors as dicts ({"code", "message", "type"} or {"error": {...}})."""
    error = result.get("error") if isinstance(result.get("error"), dict) else None
    if error is None and "code" in result and "choices" not in result:
        error = result
    return error


def _raise(error: dict[str, Any]) -> None:
    message = str(error.get("message", error))
    if int(error.get("code", 500)) < 500:
        raise InvalidRequest(message)
    raise ShoalError(f"llama.cpp: {message}")


def _top_probs(result: dict[str, Any]) -> list[dict[str, Any]]:
    try:
        top: list[dict[str, Any]] = result["choices"][0]["logprobs"]["content"][0]["top_probs"]
    except (KeyError, IndexError, TypeError) as exc:
        raise ShoalError(f"llama.cpp returned no token probabilities: {str(result)[:300]}") from exc
    return top


class LlmRerankEngine(Engine):
    name = "llm_rerank"

    def load(self) -> None:

        opts = self.pop_options()
        self._instruction = str(opts.get("instruction", DEFAULT_INSTRUCTION))
        self._system_prompt = str(opts.get("system_prompt", SYSTEM_PROMPT))
        self._server, self.n_parallel, self.slot_context = start_server(self.config, opts)
        self.yes_ids = self._single_tokens(YES)
        self.no_ids = self._single_tokens(NO)
        if not self.yes_ids or not self.no_ids:
            raise ValueError(f"{self.config.model_path}: no single-token 'yes'/'no' in its vocabulary")
        self._bias = [[token, BIAS] for token in sorted(self.yes_ids | self.no_ids)]
        # One thread per slot plus room for documents waiting on a slot.
        self._pool = ThreadPoolExecutor(max_workers=self.n_parallel * 4, thread_name_prefix="llm-rerank")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        del self._server

    def _single_tokens(self, words: tuple[str, ...]) -> set[int]:
        """The ids of the spellings of a word (with and without a leading space) that are one token:
        llama.cpp tokenizes a string logit_bias, so biasing the string alone shows its token(s)."""
        ids: set[int] = set()
        for word in words:
            for spelling in (word, " " + word):
                result = self._server.handle_completions(
                    {
                        **NEUTRAL_SAMPLING,
                        "prompt": "Answer:",
                        "n_probs": 1,
                        "top_k": 0,
                        "logit_bias": [[spelling, BIAS]],
                    }
                )
                if (error := _error(result)) is not None:
                    raise RuntimeError(f"llama.cpp: {error.get('message', error)}")
                top = _top_probs(result)[0]
                if top["prob"] > 0.5 and str(top["token"]).strip() == word:
                    ids.add(int(top["id"]))
        return ids

    def _messages(self, query: str, document: str) -> list[dict[str, str]]:
        user = f"<Instruct>: {self._instruction}\n<Query>: {query}\n<Document>: {document}"
        return [{"role": "system", "content": self._system_prompt}, {"role": "user", "content": user}]

    def _score(self, query: str, document: str) -> tuple[float, int]:
        """Runs on a pool thread: (P(yes) / (P(yes) + P(no)), prompt tokens)."""
        for _ in range(TRUNCATE_TRIES):
            messages = self._messages(query, document)
            result = self._server.handle_chat_completions(
                {
                    **NEUTRAL_SAMPLING,
                    "messages": messages,
                    "logprobs": True,
                    "top_logprobs": len(self._bias),
                    "top_k": len(self._bias),
                    "logit_bias": self._bias,
                    "chat_template_kwargs": {"enable_thinking": False},  # Qwen3: answer at once
                }
            )
            error = _error(result)
            if error is None:
                break
            if error.get("type") != "exceed_context_size_error":
                _raise(error)
            if not document:
                break
            # Cut the document by the overshoot, in characters at the prompt's characters per token.
            n_prompt = int(error.get("n_prompt_tokens", 0)) or len(document)
            over = n_prompt - int(error.get("n_ctx", self.slot_context)) + 8
            chars_per_token = sum(len(m["content"]) for m in messages) / n_prompt
            document = document[: max(0, len(document) - max(1, int(over * chars_per_token * 1.1)))]
        if error is not None:
            raise InvalidRequest(
                f"the query (with the instruction) leaves no room for a document in this model's context "
                f"of {self.slot_context} tokens per slot"
            )
        p_yes = p_no = 0.0
        for top in _top_probs(result):
            token = int(top["id"])
            if token in self.yes_ids:
                p_yes += float(top["prob"])
            elif token in self.no_ids:
                p_no += float(top["prob"])
        score = p_yes / (p_yes + p_no) if p_yes + p_no > 0 else 0.5
        return score, int(result.get("usage", {}).get("prompt_tokens", 0))

    async def rerank(self, body: dict[str, Any]) -> dict[str, Any]:
        request = parse_rerank(body)
        loop = asyncio.get_running_loop()
        scored = await asyncio.gather(
            *(loop.run_in_executor(self._pool, self._score, request.query, doc) for doc in request.documents)
        )
        scores = [score for score, _ in scored]
        return rerank_response(request, scores, sum(tokens for _, tokens in scored))
