"""OpenAI's (legacy) completions shape for engines whose backend answers in another one, and the
fan-out that serves `n` (and a list of prompts) as one request per answer.

llama.cpp's server, on /v1/completions, gives ids prefixed `chatcmpl-`, log probabilities in the chat
shape ({"content": [{token, logprob, bytes, top_logprobs: [...]}]}), ignores `echo`, and reports the
usage of one answer only when it returns several. These helpers are pure: they rewrite answers and
streamed chunks into OpenAI's shape.

The completions shape of `logprobs`: {"tokens": [...], "token_logprobs": [...], "top_logprobs": [{token:
logprob}, ...], "text_offset": [...]}; text_offset counts characters from the start of the choice's
generated text (as vLLM does when echo is off), continuing across streamed chunks.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from shoal.errors import InvalidRequest

SEED_SPACE = 2**32  # llama.cpp's seeds are 32-bit; answer j of n gets seed + j


@dataclass(frozen=True)
class Part:
    """One answer of a fanned-out request: its choice index, its prompt (completions) and its body."""

    index: int
    prompt: str | None
    body: dict[str, Any]


def fan_out(body: dict[str, Any], chat: bool) -> list[Part]:
    """One body per answer: each prompt of a completions list, n times (index = prompt × n + j).
    With a seed, answer j uses seed + j, so the n answers differ and the request still repeats."""
    n = int(body.get("n") or 1)
    prompt = body.get("prompt")
    prompts: list[str | None] = (
        [None] if chat else ([prompt] if isinstance(prompt, str) else list(prompt or []))
    )
    seed = body.get("seed")
    parts = []
    for p, text in enumerate(prompts):
        for j in range(n):
            part = {k: v for k, v in body.items() if k not in ("n", "echo")}
            if not chat:
                part["prompt"] = text
            if isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0 and j:
                part["seed"] = (seed + j) % SEED_SPACE
            parts.append(Part(p * n + j, text, part))
    if not parts:
        raise InvalidRequest("prompt must not be empty")
    return parts


def answer_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"


def summed_usage(usages: list[tuple[bool, dict[str, Any]]]) -> dict[str, int]:
    """(whether its prompt is counted, usage) per answer: each prompt once, every answer's tokens."""
    prompt = sum(int(u.get("prompt_tokens") or 0) for counted, u in usages if counted)
    completion = sum(int(u.get("completion_tokens") or 0) for _, u in usages)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class LegacyLogprobs:
    """Chat-shaped log probabilities → the completions shape, per choice; keeps each choice's text
    offset across the chunks of a stream."""

    def __init__(self) -> None:
        self._offsets: dict[int, int] = {}

    def convert(self, index: int, logprobs: dict[str, Any] | None) -> dict[str, Any] | None:
        if not isinstance(logprobs, dict) or "content" not in logprobs:
            return logprobs
        tokens: list[str] = []
        token_logprobs: list[float] = []
        top: list[dict[str, float]] = []
        offsets: list[int] = []
        offset = self._offsets.get(index, 0)
        for entry in logprobs.get("content") or []:
            token = str(entry.get("token", ""))
            tokens.append(token)
            token_logprobs.append(entry.get("logprob"))
            alternatives: dict[str, float] = {}
            for alt in entry.get("top_logprobs") or []:
                alternatives.setdefault(str(alt.get("token", "")), alt.get("logprob"))  # best first
            top.append(alternatives)
            offsets.append(offset)
            offset += len(token)
        self._offsets[index] = offset
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top,
            "text_offset": offsets,
        }
