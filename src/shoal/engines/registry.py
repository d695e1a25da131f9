"""Engine names → "module:Class", imported lazily and only inside runner processes."""

from __future__ import annotations

import importlib
import importlib.util

from shoal.errors import EngineMissing, InvalidRequest

ENGINES: dict[str, str] = {
    "llama.cpp": "shoal.engines.llamacpp:LlamaCppEngine",
    "sentence_transformers": "shoal.engines.sentence_transformers:SentenceTransformersEngine",
    "transformers": "shoal.engines.transformers:TransformersEngine",
    "cross_encoder": "shoal.engines.cross_encoder:CrossEncoderEngine",
    "embedding_rerank": "shoal.engines.embedding_rerank:EmbeddingRerankEngine",
    "llm_rerank": "shoal.engines.llm_rerank:LlmRerankEngine",
    "faster_whisper": "shoal.engines.faster_whisper:FasterWhisperEngine",
    "piper": "shoal.engines.piper:PiperEngine",
    "hibari": "shoal.engines.hibari:HibariEngine",
    "rapidocr": "shoal.engines.rapidocr:RapidOcrEngine",
    "diffusers": "shoal.engines.diffusers:DiffusersEngine",
    "vllm": "shoal.engines.vllm:VllmEngine",
}
# The Python package each engine needs, and the extra that installs it.
REQUIRES: dict[str, tuple[str, str]] = {
    "llama.cpp": ("xllamacpp", "llamacpp"),
    "sentence_transformers": ("sentence_transformers", "embeddings"),
    "transformers": ("transformers", "embeddings"),
    "cross_encoder": ("sentence_transformers", "embeddings"),
    "embedding_rerank": ("sentence_transformers", "embeddings"),
    "llm_rerank": ("xllamacpp", "llamacpp"),
    "faster_whisper": ("faster_whisper", "audio"),
    "piper": ("piper", "audio"),
    "hibari": ("hibari", "audio"),
    "rapidocr": ("rapidocr_onnxruntime", "ocr"),
    "diffusers": ("diffusers", "image"),
    "vllm": ("vllm", "vllm"),
}
ALIASES: dict[str, str] = {
    "llama.cpp": "llama.cpp",
    "llama_cpp": "llama.cpp",
    "llamacpp": "llama.cpp",
    "xllamacpp": "llama.cpp",
    "sentence_transformers": "sentence_transformers",
    "sentence-transformers": "sentence_transformers",
    "transformers": "transformers",  # looked up lower-cased, so "Transformers" too
    "pytorch": "transformers",
    "hf": "transformers",
    "cross_encoder": "cross_encoder",
    "crossencoder": "cross_encoder",
    "embedding_rerank": "embedding_rerank",
    "llm_rerank": "llm_rerank",
    "faster_whisper": "faster_whisper",
    "faster-whisper": "faster_whisper",
    "whisper": "faster_whisper",
    "piper": "piper",
    "hibari": "hibari",
    "rapidocr": "rapidocr",
    "diffusers": "diffusers",
    "vllm": "vllm",
}
# Engines that can park (Engine.can_park): weights to host RAM and back, the process kept. The
# gateway reads this table (it imports no engine); the others are stopped when their room is needed.
PARKS = frozenset(
    {"sentence_transformers", "transformers", "cross_encoder", "embedding_rerank", "diffusers", "vllm"}
)
# Which engines can serve which model format.
FORMATS: dict[str, tuple[str, ...]] = {
    "llama.cpp": ("ggufv2", "gguf"),
    "sentence_transformers": ("sentence_transformers", "pytorch"),
    "transformers": ("pytorch", "safetensors"),
    "cross_encoder": ("cross_encoder", "pytorch", "sentence_transformers"),
    "embedding_rerank": ("sentence_transformers", "pytorch"),
    "llm_rerank": ("ggufv2", "gguf"),
    "faster_whisper": ("ctranslate2",),
    "piper": ("piper",),
    "hibari": ("hibari",),
    "rapidocr": ("rapidocr",),
    "diffusers": ("diffusers",),
    "vllm": ("pytorch", "safetensors", "gptq", "awq", "fp8"),
}


def canonical(name: str, model_format: str) -> str:
    engine = ALIASES.get(name.lower())
    if engine is None:
        raise InvalidRequest(f"unknown model_engine {name!r}; known: {', '.join(ENGINES)}")
    if model_format not in FORMATS[engine]:
        raise InvalidRequest(f"engine {engine} cannot serve format {model_format!r}")
    return engine


def check_installed(engine: str) -> None:
    """Cheap check (no import) so a launch fails with the fix instead of a runner traceback."""
    package, extra = REQUIRES[engine]
    if importlib.util.find_spec(package) is None:
        raise EngineMissing(f"engine {engine} needs the package {package}: pip install 'shoal[{extra}]'")


def load_class(engine: str) -> type:
    module_name, class_name = ENGINES[engine].split(":")
    return getattr(importlib.import_module(module_name), class_name)  # type: ignore[no-any-return]
