"""Catalog value types: a model family (one name) with specs per format and where weights come from.

Field names follow Xinference's model JSON so its registrations load unchanged.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ModelType = Literal["LLM", "embedding", "rerank", "audio", "image"]
MODEL_TYPES: tuple[str, ...] = ("LLM", "embedding", "rerank", "audio", "image")
DEFAULT_ABILITIES = {"LLM": ["chat", "generate"], "embedding": ["embed"], "rerank": ["rerank"]}
# What a model can do (Xinference's model_ability values). chat/generate/embed/rerank/audio2text/
# text2audio/text2image/ocr pick the routes a model answers; tools, vision and reasoning say what the
# model itself was trained for (whether an engine serves it is the engine's part: docs/models.md).
KNOWN_ABILITIES = (
    "chat", "generate", "tools", "vision", "reasoning", "embed", "rerank",
    "audio2text", "text2audio", "text2image", "ocr",
)  # fmt: skip

# Which engine serves a (model type, format) when the launch names none; then by format alone.
DEFAULT_ENGINE_BY_TYPE_FORMAT = {
    ("rerank", "sentence_transformers"): "embedding_rerank",
    ("rerank", "cross_encoder"): "cross_encoder",
    ("rerank", "ggufv2"): "llm_rerank",
}
DEFAULT_ENGINE_BY_FORMAT = {
    "ggufv2": "llama.cpp", "gguf": "llama.cpp", "sentence_transformers": "sentence_transformers",
    "pytorch": "transformers", "safetensors": "transformers", "ctranslate2": "faster_whisper",
    "piper": "piper", "hibari": "hibari", "rapidocr": "rapidocr", "cross_encoder": "cross_encoder",
    "diffusers": "diffusers",
}  # fmt: skip


def size_number(size: float | str) -> float | None:
    """A size in billions as a number, in every spelling clients send: 7, 7.0, "7", "7.0", "7B",
    and Xinference's "0_5" for 0.5 (xinference-client writes a float's point as "_": 0.135 → "0_135").
    None for a size that is not a number ("8x7", "MoE")."""
    if isinstance(size, bool):
        return None
    if isinstance(size, int | float):
        return float(size) if math.isfinite(size) else None
    text = size.strip().lower().removesuffix("b").replace("_", ".", 1)
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def same_size(spec_size: float | str | None, asked: float | str) -> bool:
    """Whether a spec's size is the one asked for: equal as numbers when both are, else equal text."""
    if spec_size is None:
        return False
    a, b = size_number(spec_size), size_number(asked)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return str(spec_size).strip().lower() == str(asked).strip().lower()


def default_engine(model_type: str, model_format: str) -> str | None:
    by_type = DEFAULT_ENGINE_BY_TYPE_FORMAT.get((model_type, model_format))
    return by_type or DEFAULT_ENGINE_BY_FORMAT.get(model_format)


class Source(BaseModel):
    """Where a spec's weights come from: a package, a local path, or a hub repo (Hugging Face,
    ModelScope, or both: download_hub picks one)."""

    model_config = ConfigDict(extra="forbid")

    python_package: str | None = Field(None, description="installed package that carries the weights")
    pattern: str | None = Field(None, description="glob inside the package folder (file or folder)")
    pip: str | None = Field(None, description="how to install the package, shown when it is missing")
    assemble: str | None = Field(
        None, description="function in the package that writes the weights to a given path (split packages)"
    )
    path: str | None = Field(None, description="local file (GGUF) or folder")
    hf_repo: str | None = None
    hf_file: str | None = None
    ms_repo: str | None = Field(None, description="the same weights on ModelScope (ORG/REPO)")
    ms_file: str | None = None

    @model_validator(mode="after")
    def _one_origin(self) -> Source:
        origins = [o for o in (self.python_package, self.path, self.hf_repo or self.ms_repo) if o]
        if len(origins) != 1:
            raise ValueError(
                "a source needs exactly one of python_package, path, or a hub repo (hf_repo/ms_repo)"
            )
        return self


class Architecture(BaseModel):
    """A model's shape as its published config.json gives it, kept in the catalog so an estimate
    is right before (or without) any download; the files, once local, take precedence."""

    model_config = ConfigDict(extra="forbid")

    n_layers: int = Field(gt=0)
    n_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    n_params: int = Field(gt=0, description="every parameter the weights hold (all experts of a MoE)")


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model_format: str
    model_size_in_billions: float | str | None = None
    quantization: str = "none"
    source: Source | None = None
    model_uri: str | None = Field(None, description="Xinference's name for a local path")
    architecture: Architecture | None = None

    @model_validator(mode="after")
    def _source_from_uri(self) -> ModelSpec:
        if self.source is None:
            if not self.model_uri:
                raise ValueError("a spec needs a source (or model_uri)")
            self.source = Source(path=self.model_uri.removeprefix("file://"))
        return self


class ModelFamily(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model_name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model_type: ModelType
    model_ability: list[str] = Field(default_factory=list)
    context_length: int | None = Field(None, gt=0)
    dimensions: int | None = None
    model_description: str = ""
    model_family: str | None = Field(None, description="the family a model belongs to (qwen3, llama, ...)")
    license: str | None = Field(None, description="the weights' licence (SPDX id or the licence's name)")
    model_specs: list[ModelSpec] = Field(min_length=1)
    builtin: bool = False

    @model_validator(mode="after")
    def _default_abilities(self) -> ModelFamily:
        if not self.model_ability:
            if self.model_type not in DEFAULT_ABILITIES:
                raise ValueError(
                    f"{self.model_type} models need model_ability (e.g. audio2text, text2audio, ocr)"
                )
            self.model_ability = list(DEFAULT_ABILITIES[self.model_type])
        return self

    def matches(self, text: str) -> bool:
        """Whether every word of `text` is in the name, family, description, an ability or the
        licence (case-insensitive): `shoal models --search`."""
        haystack = " ".join(
            [
                self.model_name,
                self.model_family or "",
                self.model_description,
                self.license or "",
                *self.model_ability,
            ]
        ).lower()
        return all(word in haystack for word in text.lower().split())

    def pick_spec(
        self, model_format: str | None, quantization: str | None, size: float | str | None
    ) -> ModelSpec:
        """The first spec matching every constraint given (None matches anything); sizes match as
        numbers in any spelling (`same_size`)."""
        for spec in self.model_specs:
            if model_format and spec.model_format != model_format:
                continue
            if quantization and spec.quantization.lower() != quantization.lower():
                continue
            if size is not None and not same_size(spec.model_size_in_billions, size):
                continue
            return spec
        raise LookupError(
            f"model {self.model_name!r} has no spec with format={model_format} quantization={quantization} "
            f"size={size}; it has: "
            + ", ".join(
                f"{s.model_format}/{s.model_size_in_billions}B/{s.quantization}" for s in self.model_specs
            )
        )
