"""OpenAI-compatible request bodies. Unknown fields are kept and passed to the engine
(clients send engine extras such as top_k through `extra_body`); the common sampling extras are typed
and bounded here, and no number anywhere in a body may be NaN or infinite (JSON has neither, and the
runners' parser refuses them).

`check_prompt_size` is the cheap bound on a prompt's length that the gateway applies before any
engine tokenizes it: characters, against the model's context in tokens.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shoal.errors import InvalidRequest

Role = Literal["system", "user", "assistant", "tool", "developer", "function"]
MAX_TOP_LOGPROBS = 20  # OpenAI's bound on chat's top_logprobs
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's bound on (legacy) completions' logprobs
MAX_TOKEN_ID = 2**31 - 1  # past every vocabulary (the engine checks its own)
MAX_INT32 = 2**31 - 1
MAX_N = 128  # OpenAI's bound on n; each engine bounds it further (llama.cpp: its n_parallel slots)


def _finite(value: Any, where: str) -> None:
    """Refuse NaN and infinities anywhere inside an untyped value (extras are forwarded as they came)."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} is {value}; numbers must be finite")
    elif isinstance(value, dict):
        for key, item in value.items():
            _finite(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _finite(item, f"{where}[{i}]")


class _Body(BaseModel):
    """Extras allowed and forwarded; typed floats and extras alike must be finite."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    @model_validator(mode="after")
    def _finite_extras(self) -> _Body:
        for name, value in (self.model_extra or {}).items():
            _finite(value, name)
        return self


class ContentPart(_Body):
    type: Literal["text", "image_url", "input_audio", "file"]
    text: str | None = None


class ChatMessage(_Body):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        """OpenAI's rule: only an assistant message with tool_calls may leave out its content."""
        if self.content is None and not (
            self.role == "assistant" and (self.model_extra or {}).get("tool_calls")
        ):
            raise ValueError(f"a {self.role} message needs content")
        if isinstance(self.content, list):
            for part in self.content:
                if part.type == "text" and part.text is None:
                    raise ValueError("a text content part needs its text")
        return self


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(_Body):
    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(
        1, ge=1, le=MAX_N, description="answers per prompt (llama.cpp: up to n_parallel; transformers: 1)"
    )
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    # Engine extras (llama.cpp's and vLLM's names), bounded where a value has no meaning past the bound.
    top_k: int | None = Field(None, ge=-1, le=MAX_INT32, description="0 or -1: no top-k cut")
    min_p: float | None = Field(None, ge=0, le=1)
    typical_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, gt=0, description="llama.cpp; 1 is none")
    repetition_penalty: float | None = Field(None, gt=0, description="vLLM and transformers; 1 is none")
    repeat_last_n: int | None = Field(None, ge=-1, le=MAX_INT32)
    mirostat: int | None = Field(None, ge=0, le=2)
    n_probs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="llama.cpp's top_logprobs")

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 16:
            raise ValueError("at most 16 stop strings")
        return value


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = Field(None, description="the chosen tokens' log probabilities")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="alternatives per token (needs logprobs)"
    )

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(min_length=1)
    logprobs: int | None = Field(
        None, ge=0, le=MAX_COMPLETION_LOGPROBS, description="alternatives per token; 0: none"
    )
    echo: bool = Field(False, description="the prompt before each answer's text")
    suffix: str | None = Field(None, description="refused unless empty: no engine does fill-in-the-middle")
    best_of: int | None = Field(None, ge=1, description="only 1 (best_of > 1 is refused)")

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError(
                "suffix (fill-in-the-middle) is not supported: llama.cpp's infill is not exposed by the "
                "binding Shoal uses, and the other engines have none"
            )
        if self.best_of is not None and self.best_of > 1:
            raise ValueError(
                "best_of > 1 is not supported; ask for n answers instead (they are all returned)"
            )
        return self


EmbeddingInput = str | list[str] | list[int] | list[list[int]]


class EmbeddingRequest(_Body):
    model: str = Field(min_length=1)
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None
    truncate: bool = Field(
        False,
        strict=True,  # the engine reads the body as sent: "true" as a string would mean two things
        description="TEI's field: embed the first max_seq_length tokens of a longer input instead of "
        "refusing it (sentence-transformers engine)",
    )

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value: EmbeddingInput) -> EmbeddingInput:
        if isinstance(value, list) and not value:
            raise ValueError("input must not be empty")
        if isinstance(value, list) and len(value) > 2048:
            raise ValueError("at most 2048 inputs per request")
        rows = value if isinstance(value, list) and isinstance(value[0], list) else [value]
        for row in rows:
            if isinstance(row, list) and row and isinstance(row[0], int):
                bad = next((i for i in row if not 0 <= i <= MAX_TOKEN_ID), None)  # type: ignore[operator]
                if bad is not None:
                    raise ValueError(f"{bad} is not a token id (they run from 0 to the vocabulary's size)")
        return value


class RerankRequest(_Body):
    """POST /v1/rerank (Xinference, Jina and Cohere shape). xinference-client also sends
    max_chunks_per_doc, return_len and a `kwargs` string; they are accepted and ignored."""

    model: str = Field(min_length=1)
    query: str = Field(min_length=1)
    documents: list[str] = Field(min_length=1, max_length=1000)
    top_n: int | None = Field(None, ge=1)
    return_documents: bool | None = None


class SpeechRequest(_Body):
    """POST /v1/audio/speech."""

    model: str = Field(min_length=1)
    input: str = Field(min_length=1, max_length=4096)
    voice: str | None = None
    response_format: Literal["wav", "mp3", "flac", "opus", "pcm", "aac"] = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    stream: bool = False


class ImageRequest(_Body):
    """POST /v1/images/generations (the engine checks size, steps and the rest)."""

    model: str = Field(min_length=1)
    prompt: str = Field(min_length=1, max_length=4000)
    n: int = Field(1, ge=1, le=4)
    size: str | None = None
    response_format: Literal["b64_json", "url"] = "b64_json"


TranscriptionFormat = Literal["json", "text", "srt", "vtt", "verbose_json"]


class TranscriptionParams(BaseModel):
    """The form fields of POST /v1/audio/transcriptions and /v1/audio/translations (besides `file`)."""

    model_config = ConfigDict(allow_inf_nan=False)

    model: str = Field(min_length=1)
    language: str | None = Field(None, max_length=16)
    prompt: str | None = Field(None, max_length=4096)
    response_format: TranscriptionFormat = "json"
    temperature: float = Field(0.0, ge=0, le=1)
    timestamp_granularities: list[Literal["word", "segment"]] = ["segment"]


REQUEST_MODELS: tuple[type[BaseModel], ...] = (
    ChatCompletionRequest, CompletionRequest, EmbeddingRequest, RerankRequest, SpeechRequest, ImageRequest,
)  # fmt: skip


# ---- the prompt-size bound ------------------------------------------------------------------------
CHARS_PER_TOKEN = 32  # a generous upper bound on characters per token for real tokenizers on real text
TRUNCATED_INPUT_CHARS = 1_000_000  # one input to an encoder that truncates: this many pass at least
BATCH_CHARS = 16 * 1024**2  # all inputs of one embeddings or rerank request to such an encoder


def _message_chars(body: ChatCompletionRequest) -> int:
    total = 0
    for message in body.messages:
        if isinstance(message.content, str):
            total += len(message.content)
        elif message.content:
            total += sum(len(part.text or "") for part in message.content)
    return total


def _sizes(body: BaseModel) -> tuple[str, list[int]]:
    """What a body asks the model to read: (what to call it, characters of each prompt or input;
    a token id counts as one)."""
    if isinstance(body, ChatCompletionRequest):
        return "the messages' text", [_message_chars(body)]
    if isinstance(body, CompletionRequest):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        return "the prompt", [len(p) for p in prompts]
    if isinstance(body, EmbeddingRequest):
        value = body.input
        inputs = [value] if isinstance(value, str) or (value and isinstance(value[0], int)) else value
        return "an input", [len(item) for item in inputs]  # type: ignore[arg-type]
    if isinstance(body, RerankRequest):
        return "a query with a document", [len(body.query) + len(doc) for doc in body.documents]
    return "", []


def check_prompt_size(body: BaseModel, context_tokens: int, truncates: bool) -> None:
    """Refuse (InvalidRequest) a prompt far beyond the model's context before any engine tokenizes it:
    more than `context_tokens` × CHARS_PER_TOKEN characters. A model that truncates its inputs (a
    rerank encoder; an embedding encoder when the request says `truncate: true`) reads only its
    context's worth and drops the rest, so its bound is generous: TRUNCATED_INPUT_CHARS per input at
    least, and BATCH_CHARS for the whole request."""
    what, sizes = _sizes(body)
    if not sizes:
        return
    hint = ""
    if truncates and isinstance(body, EmbeddingRequest) and not body.truncate:  # only when asked to
        truncates, hint = False, " (or send truncate: true to embed its first tokens)"
    limit = context_tokens * CHARS_PER_TOKEN
    if truncates:
        limit = max(limit, TRUNCATED_INPUT_CHARS)
    longest = max(sizes)
    if longest > limit and truncates:
        raise InvalidRequest(
            f"{what} has {longest:,} characters; this model reads {context_tokens:,} tokens of each and "
            f"takes at most {limit:,} characters per input"
        )
    if longest > limit:
        raise InvalidRequest(
            f"{what} has {longest:,} characters, far more than this model's context of {context_tokens:,} "
            f"tokens holds (at most {limit:,} characters are accepted: {CHARS_PER_TOKEN} per token){hint}"
        )
    if truncates and sum(sizes) > BATCH_CHARS:
        raise InvalidRequest(
            f"the inputs have {sum(sizes):,} characters together, more than the {BATCH_CHARS:,} one "
            "request may send to this model: split them over several requests"
        )
