"""Structured output for engines that decode token by token themselves (transformers): a request's
`response_format` becomes a JSON-schema grammar (llguidance: vLLM's `guidance` backend, a build
option of llama.cpp), and each step's logits are masked to the tokens the grammar allows.

`{"type": "json_object"}` is any JSON object; `{"type": "json_schema", "json_schema": {"schema",
"strict"}}` is that schema. With `strict: true` a keyword llguidance cannot enforce is refused (400);
without it such keywords are ignored and the rest is enforced. JSON is written compactly (no
whitespace between tokens), which keeps a weak model from filling its budget with newlines.

Compiling (tokenizer tables once, a grammar per schema) blocks: callers run it off the event loop.
Compiled grammars are kept by schema, the most recently used `CACHE_SIZE`; a request gets a copy.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from shoal.errors import InvalidRequest, ShoalError

CACHE_SIZE = 64  # compiled grammars kept per model
_MESSAGE = 300  # characters of a library error shown to the client
_SHIFTS = torch.arange(32, dtype=torch.int32)


@dataclass(frozen=True)
class Constraint:
    schema: dict[str, Any]
    strict: bool

    @property
    def key(self) -> str:
        return json.dumps([self.schema, self.strict], sort_keys=True, separators=(",", ":"))


def constraint(body: dict[str, Any]) -> Constraint | None:
    """What the body's `response_format` asks for; None for text or none. Raises InvalidRequest."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise InvalidRequest('response_format must be an object such as {"type": "json_object"}')
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint({"type": "object"}, strict=False)
    if kind != "json_schema":
        raise InvalidRequest(
            f"response_format.type must be text, json_object or json_schema, not {json.dumps(kind)[:80]}"
        )
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise InvalidRequest("response_format.json_schema must be an object with a schema")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise InvalidRequest("response_format.json_schema.schema must be a JSON schema object")
    return Constraint(schema, strict=spec.get("strict") is True)


class Matcher:
    """One request's place in its grammar."""

    def __init__(self, matcher: Any) -> None:
        self._m = matcher

    def words(self) -> torch.Tensor:
        """The allowed next tokens as int32 words, bit i of word j for token 32 j + i."""
        return torch.frombuffer(bytearray(self._m.compute_bitmask()), dtype=torch.int32)

    def accept(self, token: int) -> None:
        if not self._m.consume_token(token):
            raise ShoalError(f"the output grammar refused token {token}: {self._m.get_error()[:_MESSAGE]}")

    @property
    def done(self) -> bool:
        """The grammar is complete and takes no more tokens."""
        return bool(self._m.is_stopped())


def mask_logits(logits: torch.Tensor, rows: list[tuple[int, Matcher]]) -> None:
    """Set to -inf, in place, the logits of tokens each row's grammar does not allow next."""
    words_of = [(row, m.words()) for row, m in rows]
    # a grammar that allows nothing (left unmasked, so the pick stays finite) refuses the token after
    words_of = [(row, w) for row, w in words_of if bool(w.any())]
    if not words_of:
        return
    words = torch.stack([w for _, w in words_of]).to(logits.device)
    bits = (words.unsqueeze(-1) >> _SHIFTS.to(logits.device)) & 1  # (rows, words, 32)
    allowed = bits.flatten(1).bool()
    vocab = logits.shape[-1]
    if allowed.shape[1] < vocab:  # logits past the tokenizer's vocabulary: never allowed
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]))
    index = torch.tensor([row for row, _ in words_of], device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed[:, :vocab], float("-inf"))


class Grammars:
    """Grammars over one model's tokenizer. `tokenizer` builds llguidance's tokenizer (about a second
    for a large vocabulary), on the first constrained request."""

    def __init__(self, tokenizer: Callable[[], Any], size: int = CACHE_SIZE) -> None:
        self._make_tokenizer = tokenizer
        self._size = size
        self._tokenizer: Any = None
        self._refused: InvalidRequest | None = None  # the tokenizer could not be built: kept, not retried
        self._lock = threading.Lock()
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self.compiles = 0  # grammars compiled (cache misses), for tests and diagnostics

    def _llg_tokenizer(self) -> Any:
        with self._lock:
            if self._refused is not None:
                raise self._refused
            if self._tokenizer is None:
                try:
                    self._tokenizer = self._make_tokenizer()
                except InvalidRequest as exc:
                    self._refused = exc
                    raise
                except (ValueError, TypeError, RuntimeError) as exc:
                    self._refused = InvalidRequest(
                        f"this model's tokenizer cannot be used for structured output: {str(exc)[:_MESSAGE]}"
                    )
                    raise self._refused from exc
            return self._tokenizer

    def matcher(self, want: Constraint) -> Matcher:
        """A fresh matcher for the constraint (blocking). A schema it cannot compile: InvalidRequest."""
        key = want.key
        with self._lock:
            if key in self._compiled:
                self._compiled.move_to_end(key)
                return Matcher(self._compiled[key].deep_copy())
        compiled = self._compile(want)
        with self._lock:
            self._compiled[key] = compiled
            while len(self._compiled) > self._size:
                self._compiled.popitem(last=False)
            return Matcher(compiled.deep_copy())

    def _compile(self, want: Constraint) -> Any:
        from llguidance import LLMatcher

        tokenizer = self._llg_tokenizer()
        options = {"whitespace_flexible": False, "lenient": not want.strict}
        try:
            grammar = LLMatcher.grammar_from_json_schema(want.schema, overrides=options)  # type: ignore[arg-type]
        except (ValueError, TypeError, OverflowError) as exc:
            raise InvalidRequest(
                f"response_format's schema cannot be compiled: {str(exc)[:_MESSAGE]}"
            ) from exc
        compiled = LLMatcher(tokenizer, grammar, log_level=0)
        self.compiles += 1
        if compiled.is_error():
            raise InvalidRequest(
                f"response_format's schema cannot be compiled: {compiled.get_error()[:_MESSAGE]}"
            )
        return compiled


def llg_tokenizer(hf_tokenizer: Any, vocab_size: int, eos: list[int]) -> Any:
    """llguidance's view of a Hugging Face fast tokenizer, sized to the model's logits."""
    try:
        import llguidance.hf
    except ImportError as exc:
        raise InvalidRequest(
            "response_format needs the llguidance package on this runner (pip install 'shoal[embeddings]')"
        ) from exc
    return llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=eos or None)
