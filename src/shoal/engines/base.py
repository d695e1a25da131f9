"""The engine interface. An engine loads one model in a runner process and answers OpenAI-shaped
request bodies (already validated by the gateway) with OpenAI-shaped dicts (orjson-serialisable:
numpy arrays are allowed)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.errors import InvalidRequest


@dataclass(frozen=True)
class EngineConfig:
    model_path: Path
    model_uid: str
    model_format: str
    context_length: int | None
    device: str = "cpu"  # "cpu" or "cuda" (CUDA_VISIBLE_DEVICES is set at spawn)
    n_threads: int | None = None
    options: dict[str, Any] = field(default_factory=dict)  # launch keyword arguments for this engine


class Engine:
    """Base class: an engine overrides what its model kind can do; the rest answers 400."""

    name = "base"

    def __init__(self, config: EngineConfig) -> None:
        self.config = config

    def load(self) -> None:
        """Load the model (blocking, before the runner accepts requests). Raise with the reason."""
        raise NotImplementedError

    def close(self) -> None:
        """Free what load() took."""

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        raise InvalidRequest(f"model {self.config.model_uid!r} ({self.name}) does not support chat")

    def chat_stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        raise InvalidRequest(f"model {self.config.model_uid!r} ({self.name}) does not support chat")

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        raise InvalidRequest(f"model {self.config.model_uid!r} ({self.name}) does not support completions")

    def complete_stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        raise InvalidRequest(f"model {self.config.model_uid!r} ({self.name}) does not support completions")

    async def embed(self, body: dict[str, Any]) -> dict[str, Any]:
        raise InvalidRequest(f"model {self.config.model_uid!r} ({self.name}) does not support embeddings")

    def pop_options(self, *known: str) -> dict[str, Any]:
        """This engine's launch options; any other name is refused so typos do not pass silently."""
        unknown = sorted(set(self.config.options) - set(known))
        if unknown:
            raise ValueError(
                f"unknown option(s) for engine {self.name}: {', '.join(unknown)}; known: {', '.join(known)}"
            )
        return dict(self.config.options)
