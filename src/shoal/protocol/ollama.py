"""Ollama API request bodies (/api/chat, /api/generate, /api/embed, /api/embeddings, /api/show,
/api/delete), validated and nothing more; gateway/ollama_translate.py turns them into the OpenAI
bodies the runners read.

Unknown fields are ignored, as Ollama's own JSON decoding does; numbers must be finite. Option
bounds are the OpenAI ones, checked again on the translated body; only the options whose Ollama
meaning differs (num_predict) are bounded here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shoal.units import parse_duration

Format = Literal["", "json"] | dict[str, Any]  # "json", or a JSON schema
KeepAlive = str | float | None


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


def _duration(value: KeepAlive) -> KeepAlive:
    if value is not None:
        parse_duration(value)  # ValueError: a 400 that names the field
    return value


class OllamaOptions(BaseModel):
    """Ollama's runtime options; the ones not listed are accepted and ignored (docs/api-compat.md)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    typical_p: float | None = None
    seed: int | None = None
    num_predict: int | None = Field(None, ge=-2, description="-1: no limit; -2: fill the context")
    stop: str | list[str] | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    mirostat: int | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None


class OllamaToolCallFunction(BaseModel):
    name: str = Field(min_length=1)
    arguments: dict[str, Any] = Field(default_factory=dict)


class OllamaToolCall(BaseModel):
    function: OllamaToolCallFunction


class OllamaMessage(_Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None


class _Generating(_Body):
    model: str = Field(min_length=1)
    stream: bool = True  # Ollama streams unless told not to
    format: Format | None = None
    options: OllamaOptions | None = None
    keep_alive: KeepAlive = None
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    _keep_alive = field_validator("keep_alive")(_duration)


class OllamaChatRequest(_Generating):
    messages: list[OllamaMessage] = Field(default_factory=list)  # none: only load the model
    tools: list[dict[str, Any]] | None = None


class OllamaGenerateRequest(_Generating):
    prompt: str = ""  # empty: only load the model
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list[str] | None = None


class OllamaEmbedRequest(_Body):
    model: str = Field(min_length=1)
    input: str | list[str]
    truncate: bool | None = None
    dimensions: int | None = Field(None, ge=1)
    options: OllamaOptions | None = None
    keep_alive: KeepAlive = None

    _keep_alive = field_validator("keep_alive")(_duration)

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("input must not be empty")
        return value


class OllamaEmbeddingsRequest(_Body):
    """The legacy /api/embeddings: one prompt, one vector."""

    model: str = Field(min_length=1)
    prompt: str = ""  # empty: only load the model
    options: OllamaOptions | None = None
    keep_alive: KeepAlive = None

    _keep_alive = field_validator("keep_alive")(_duration)


class OllamaModelRequest(_Body):
    """/api/show and /api/delete: `model`, or the older `name`."""

    model: str | None = Field(None, min_length=1)
    name: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _named(self) -> OllamaModelRequest:
        if not (self.model or self.name):
            raise ValueError("model is required")
        return self

    @property
    def target(self) -> str:
        return self.model or self.name or ""


class OllamaPullRequest(OllamaModelRequest):
    """/api/pull: `model` (or `name`), `insecure` (accepted, unused: the hub's TLS is the client's),
    `stream` (progress lines, default true)."""

    insecure: bool = False
    stream: bool = True


REQUEST_MODELS: tuple[type[BaseModel], ...] = (
    OllamaChatRequest, OllamaGenerateRequest, OllamaEmbedRequest, OllamaEmbeddingsRequest, OllamaModelRequest,
    OllamaPullRequest,
)  # fmt: skip
