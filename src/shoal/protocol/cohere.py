"""Cohere-shaped request bodies: POST /v2/rerank (LiteLLM's Cohere rerank provider calls it).

The gateway turns one into the OpenAI-family `RerankRequest` the rerank engines serve, and the
answer into Cohere's shape; fields Cohere has and Shoal does not use are accepted and ignored."""

from __future__ import annotations

from pydantic import BaseModel, Field

from shoal.protocol.openai import _Body


class CohereDocument(BaseModel):
    """Cohere v1's document object; only its text is ranked."""

    text: str


class CohereRerankRequest(_Body):
    """POST /v2/rerank. `documents` are strings (v2) or {"text"} objects (v1). `max_tokens_per_doc`
    is accepted and not applied: each document is cut at the model's own context by the engine.
    `rank_fields` and other extras are ignored."""

    model: str = Field(min_length=1)
    query: str = Field(min_length=1)
    documents: list[str | CohereDocument] = Field(min_length=1, max_length=1000)
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = False
    max_tokens_per_doc: int | None = Field(None, ge=1)


REQUEST_MODELS: tuple[type[BaseModel], ...] = (CohereRerankRequest,)
