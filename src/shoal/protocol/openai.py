"""OpenAI-compatible request bodies. Unknown fields are kept and passed to the engine
(clients send engine extras such as top_k through `extra_body`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Role = Literal["system", "user", "assistant", "tool", "developer", "function"]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text", "image_url", "input_audio", "file"]
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

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


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1, description="only n=1 is supported")
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 16:
            raise ValueError("at most 16 stop strings")
        return value


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(min_length=1)


EmbeddingInput = str | list[str] | list[int] | list[list[int]]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value: EmbeddingInput) -> EmbeddingInput:
        if isinstance(value, list) and not value:
            raise ValueError("input must not be empty")
        if isinstance(value, list) and len(value) > 2048:
            raise ValueError("at most 2048 inputs per request")
        return value


class RerankRequest(BaseModel):
    """POST /v1/rerank (Xinference, Jina and Cohere shape). xinference-client also sends
    max_chunks_per_doc, return_len and a `kwargs` string; they are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    query: str = Field(min_length=1)
    documents: list[str] = Field(min_length=1, max_length=1000)
    top_n: int | None = Field(None, ge=1)
    return_documents: bool | None = None


class SpeechRequest(BaseModel):
    """POST /v1/audio/speech."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    input: str = Field(min_length=1, max_length=4096)
    voice: str | None = None
    response_format: Literal["wav", "mp3", "flac", "opus", "pcm", "aac"] = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    stream: bool = False


class ImageRequest(BaseModel):
    """POST /v1/images/generations (the engine checks size, steps and the rest)."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    prompt: str = Field(min_length=1, max_length=4000)
    n: int = Field(1, ge=1, le=4)
    size: str | None = None
    response_format: Literal["b64_json", "url"] = "b64_json"


TranscriptionFormat = Literal["json", "text", "srt", "vtt", "verbose_json"]


class TranscriptionParams(BaseModel):
    """The form fields of POST /v1/audio/transcriptions and /v1/audio/translations (besides `file`)."""

    model: str = Field(min_length=1)
    language: str | None = Field(None, max_length=16)
    prompt: str | None = Field(None, max_length=4096)
    response_format: TranscriptionFormat = "json"
    temperature: float = Field(0.0, ge=0, le=1)
    timestamp_granularities: list[Literal["word", "segment"]] = ["segment"]


REQUEST_MODELS: tuple[type[BaseModel], ...] = (
    ChatCompletionRequest, CompletionRequest, EmbeddingRequest, RerankRequest, SpeechRequest, ImageRequest,
)  # fmt: skip
