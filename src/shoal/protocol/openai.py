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


class CalledFunction(_Body):
    name: str = Field(min_length=1)
    arguments: str = Field(description="the arguments object, as a JSON string")


class ToolCall(_Body):
    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(_Body):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(
        None, description="an assistant's calls, answered by tool messages"
    )
    tool_call_id: str | None = Field(None, description="a tool message: the call it answers")

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        """OpenAI's rule: only an assistant message with tool_calls may leave out its content."""
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
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

    logit_bias: dict[str, float] | None = Field(None, description="token id (as a string) to -100..100")

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if len(value or {}) > 300:
            raise ValueError("logit_bias takes at most 300 tokens")
        for key, bias in (value or {}).items():
            if not key.isdigit() or int(key) > MAX_TOKEN_ID:
                raise ValueError(f"logit_bias keys are token ids, not {key[:40]!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values run from -100 to 100, not {bias}")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 16:
            raise ValueError("at most 16 stop strings")
        return value


FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for function and json_schema names


class _Strict(BaseModel):
    """A typed part of a body: unknown fields are refused, so a misspelt field is not ignored."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class FunctionDefinition(_Strict):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema of the arguments object")
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _object(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value.get("type", "object") != "object":
            raise ValueError("a function's parameters must be a JSON schema of type object")
        return value


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Strict):
    name: str = Field(pattern=FUNCTION_NAME)


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class JsonSchemaFormat(_Strict):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema", description="the JSON schema the answer must match")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_when_named(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('response_format type "json_schema" needs json_schema: {"name", "schema"}')
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f'json_schema is only read with type "json_schema", not {self.type!r}')
        return self


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = Field(None, description="the chosen tokens' log probabilities")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="alternatives per token (needs logprobs)"
    )
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = Field(None, description="false: at most one call per answer")
    response_format: ResponseFormat | None = None
    # Asked-for answers no engine here gives: refused, because the text that would come back instead
    # is not what a client sending them reads (see docs/api-compat.md).
    modalities: list[str] | None = Field(None, description='only ["text"]: no audio output')
    audio: dict[str, Any] | None = Field(None, description="refused: no audio output")
    web_search_options: dict[str, Any] | None = Field(None, description="refused: no web search")
    functions: list[Any] | None = Field(None, description="refused: the legacy form of tools")
    function_call: Any = Field(None, description="refused: the legacy form of tool_choice")

    @model_validator(mode="after")
    def _refused(self) -> ChatCompletionRequest:
        if self.audio is not None or any(m != "text" for m in self.modalities or []):
            raise ValueError(
                'audio output (modalities "audio", audio) is not supported: the models answer in text; '
                'send modalities ["text"] or leave both out (speech: POST /v1/audio/speech)'
            )
        if self.web_search_options is not None:
            raise ValueError(
                "web search (web_search_options) is not supported: the models cannot search the web"
            )
        if self.functions is not None or self.function_call is not None:
            raise ValueError(
                "functions and function_call (OpenAI's deprecated form) are not supported: "
                "send tools and tool_choice"
            )
        return self

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        names = [tool.function.name for tool in self.tools or []]
        if len(set(names)) < len(names):
            raise ValueError("two tools have the same name")
        if self.tool_choice is not None and not self.tools:
            raise ValueError("tool_choice is only allowed when tools are specified")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is not in tools")
        calls = self.tools and self.tool_choice != "none"
        if calls and self.response_format is not None and self.response_format.type != "text":
            raise ValueError(
                "response_format json with tools is not supported: the answer is constrained to a tool "
                "call or to the schema, not both; send one (or tool_choice none)"
            )
        return self


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(min_length=1)
    logprobs: int | None = Field(
        None, ge=0, le=MAX_COMPLETION_LOGPROBS, description="alternatives per token; 0: none"
    )
    echo: bool = Field(False, description="the prompt before each answer's text")
    suffix: str | None = Field(
        None, description="fill-in-the-middle: llama.cpp, for a model with FIM tokens (not streamed)"
    )
    best_of: int | None = Field(None, ge=1, description="only 1 (best_of > 1 is refused)")

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        if self.suffix and self.stream:
            raise ValueError("suffix (fill-in-the-middle) is answered whole: send it with stream false")
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
