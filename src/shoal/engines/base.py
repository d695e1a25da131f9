"""The engine interface. An engine loads one model in a runner process and answers OpenAI-shaped
request bodies (already validated by the gateway) with OpenAI-shaped dicts (orjson-serialisable:
numpy arrays are allowed)."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.engines.options import check_launch_options
from shoal.errors import InvalidRequest

# Who sends another tokenizer's ids as an embedding input, and the fix: LangChain's OpenAIEmbeddings
# at its defaults tokenizes with tiktoken's cl100k_base for any model name.
FOREIGN_IDS = (
    "LangChain's OpenAIEmbeddings sends OpenAI's tiktoken ids unless it is created with "
    "check_embedding_ctx_length=False (then it sends the text)"
)


@dataclass(frozen=True)
class SpeechStream:
    sample_rate: int
    chunks: AsyncIterator[bytes]  # int16 little-endian mono PCM


@dataclass(frozen=True)
class EngineConfig:
    model_path: Path
    model_uid: str
    model_format: str
    context_length: int | None
    device: str = "cpu"  # "cpu" or "cuda" (CUDA_VISIBLE_DEVICES is set at spawn)
    n_threads: int | None = None
    options: dict[str, Any] = field(default_factory=dict)  # launch keyword arguments for this engine
    # the replica's GPU reservation per device: the torch cap is this share of what CUDA reports here
    memory_bytes: int | None = None


def cap_fraction(reserved_bytes: int, visible_total: int) -> float:
    """torch's per-process memory fraction (or vLLM's gpu_memory_utilization) that holds a runner to
    `reserved_bytes`, as a share of the total that the runner's own CUDA context reports
    (torch.cuda.mem_get_info()[1]), capped at 1.0. Without MPS that total is the GPU's, as NVML says;
    under CUDA_MPS_PINNED_DEVICE_MEM_LIMIT it may be the MPS cap, and a share of NVML's total would
    then hold the runner to reserved² / total instead of its reservation."""
    if visible_total <= 0 or reserved_bytes <= 0:
        raise ValueError(f"reservation {reserved_bytes} and CUDA total {visible_total} must be positive")
    return min(1.0, reserved_bytes / visible_total)


class Engine:
    """Base class: an engine overrides what its model kind can do; the rest answers 400."""

    name = "base"
    # Tool calling (engines/tools.py): whether the model's chat template renders a `tools` list, so
    # the model is told about tools natively; and whether the engine parses tool calls itself (vLLM
    # launched with a tool parser), so Shoal's tool layer passes the request through.
    template_tools: bool = False
    native_tools: bool = False
    # Park (docs/gpu-sharing.md, "Park and wake"): the weights go to host RAM and the GPU memory is
    # given back while the process stays; wake brings them back to the same device. An engine that
    # cannot park is stopped instead when its room is needed (registry.PARKS lists those that can).
    can_park: bool = False

    def __init__(self, config: EngineConfig) -> None:
        self.config = config

    def load(self) -> None:
        """Load the model (blocking, before the runner accepts requests). Raise with the reason."""
        raise NotImplementedError

    def close(self) -> None:
        """Free what load() took."""

    def park(self) -> None:
        """Move the weights to host RAM and release the GPU memory (blocking; no request in flight)."""
        raise NotImplementedError(f"{self.name} cannot park")

    def wake(self) -> None:
        """Bring parked weights back onto the device they left (blocking)."""
        raise NotImplementedError(f"{self.name} cannot park")

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

    async def rerank(self, body: dict[str, Any]) -> dict[str, Any]:
        """body: query, documents (list[str]), top_n, return_documents. Returns
        {"results": [{"index", "relevance_score", "document"?}] sorted best first, "usage"?}."""
        raise InvalidRequest(f"model {self.config.model_uid!r} ({self.name}) does not support rerank")

    async def transcribe(self, audio: bytes, body: dict[str, Any]) -> dict[str, Any]:
        """audio: the uploaded file's bytes, any common format. body: task ("transcribe" or
        "translate"), language, prompt, temperature, timestamp_granularities. Returns the verbose
        form {"task", "language", "duration", "text", "segments": [...], "words": [...]?}; the runner
        renders json/text/srt/vtt/verbose_json from it."""
        raise InvalidRequest(f"model {self.config.model_uid!r} ({self.name}) does not support transcription")

    async def speech(self, body: dict[str, Any]) -> SpeechStream:
        """body: input, voice, speed. Returns the sample rate and an async iterator of int16 mono PCM
        chunks (bytes), produced as synthesis goes; the runner encodes the response_format."""
        raise InvalidRequest(f"model {self.config.model_uid!r} ({self.name}) does not support speech")

    def voices(self) -> list[dict[str, Any]]:
        """[{"id", "name", "language"?}] for speech models."""
        raise InvalidRequest(f"model {self.config.model_uid!r} ({self.name}) has no voices")

    async def warm_up(self) -> str | None:
        """One real inference before the runner reports ready, so the first user request finds the
        model's lazy parts (kernels, allocator, caches) already set up. Returns the ability it used,
        None when it found none. By default the first of: one token of chat, one token of completion
        (a base model without a chat template), one sentence embedded, one pair reranked, one short
        sentence spoken; an ability that the model turns out not to have (a 400) is passed over.
        Engines of other kinds (speech-to-text, OCR, images) override this."""
        attempts = (
            ("chat", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0}),
            ("complete", {"prompt": "Hi", "max_tokens": 1, "temperature": 0}),
            ("embed", {"input": "Shoal warms the model up."}),
            (
                "rerank",
                {"query": "What warms a model up?", "documents": ["One inference before it is ready."]},
            ),
            ("speech", {"input": "Ready."}),
        )
        for ability, body in attempts:
            if getattr(type(self), ability) is getattr(Engine, ability):
                continue
            try:
                answer = await getattr(self, ability)(body)
            except InvalidRequest:
                continue
            if isinstance(answer, SpeechStream):  # synthesis runs as the chunks are read
                async for _ in answer.chunks:
                    pass
            return ability
        return None

    async def profile_run(self) -> None:
        """The warm-up at the launch's largest batch × context, so the runner's peak memory afterwards
        is what it will need at worst (what vLLM's own profile run does at load). By default the plain
        warm-up: engines that allocate their worst case at load (llama.cpp's KV cache and compute
        buffers for n_ctx × n_parallel, vLLM's profile run and KV pool, and engines without a KV cache)
        reach it already. Engines whose memory grows with the batch override this."""
        await self.warm_up()

    def cap_cuda_memory(self, opts: dict[str, Any]) -> float | None:
        """Cap torch to this replica's reservation before any weight is allocated, so that going past
        it raises OutOfMemoryError in this runner only. The cap is the reservation (`memory_bytes`) as
        a share of what this process's CUDA context reports as total (cap_fraction); a runner given
        only `memory_fraction` (of the GPU's NVML total) takes that as it is. Returns the fraction set,
        or None where nothing is capped (the CPU, no reservation)."""
        if self.config.device != "cuda":
            return None
        import torch

        if self.config.memory_bytes:
            fraction = cap_fraction(self.config.memory_bytes, int(torch.cuda.mem_get_info()[1]))
        elif opts.get("memory_fraction") is not None:
            fraction = float(opts["memory_fraction"])
            if not 0 < fraction <= 1:
                raise ValueError(f"memory_fraction must be in (0, 1], not {fraction}")
        else:
            return None
        torch.cuda.set_per_process_memory_fraction(fraction)
        return fraction

    def set_memory_cap(self, reserved_bytes: int | None, fraction: float) -> bool:
        """Move the torch cap after a profile set the reservation: `reserved_bytes` as a share of the
        CUDA total this process sees (cap_fraction), or `fraction` of the GPU when no bytes are given.
        False when this runner holds no torch CUDA context to cap."""
        if self.config.device != "cuda" or "torch" not in sys.modules:
            return False
        import torch

        if not torch.cuda.is_initialized():
            return False
        if reserved_bytes:
            fraction = cap_fraction(reserved_bytes, int(torch.cuda.mem_get_info()[1]))
        torch.cuda.set_per_process_memory_fraction(fraction)
        return True

    def metrics(self) -> dict[str, float]:
        """The engine's own counters (e.g. llama.cpp's tokens predicted), for diagnostics and tests."""
        return {}

    async def ocr(self, image: bytes, body: dict[str, Any]) -> dict[str, Any]:
        """image: PNG/JPEG/... bytes. Returns {"text", "lines": [{"text", "score", "box"}]}."""
        raise InvalidRequest(f"model {self.config.model_uid!r} ({self.name}) does not support OCR")

    async def generate_images(self, body: dict[str, Any]) -> dict[str, Any]:
        """body: prompt, n, size ("WxH"), response_format, seed, num_inference_steps, guidance_scale,
        negative_prompt. Returns OpenAI's {"created", "data": [{"b64_json"}]} (PNG images)."""
        raise InvalidRequest(f"model {self.config.model_uid!r} ({self.name}) does not generate images")

    def pop_options(self) -> dict[str, Any]:
        """This engine's launch options (its names in engines/options.py), checked against the table:
        an unknown name or a value out of bounds is refused, so typos and garbage do not pass silently.
        Values come back as their option's type ("512" as 512, "false" as False)."""
        try:
            return check_launch_options(self.name, self.config.options)
        except InvalidRequest as exc:
            raise ValueError(exc.message) from None


# What a launch means for memory when it names no options, per engine: the context each sequence
# may fill, how many sequences run at once, and the resident memory of an idle runner process on
# the CPU (interpreter and libraries; measured with RSS). The gateway's estimate reads this table;
# engines use the same numbers as their defaults.
ESTIMATE_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama.cpp": {
        "context_option": "n_ctx",
        "context": 4096,
        "parallel_option": "n_parallel",
        "parallel": 4,
        "cpu_runtime_bytes": 120 * 1024**2,
    },
    "sentence_transformers": {
        "context_option": None,
        "context": 512,
        "parallel_option": None,
        "parallel": 1,
        "cpu_runtime_bytes": 450 * 1024**2,
    },
    "transformers": {
        "context_option": "context_length",
        "context": 4096,
        "parallel_option": "max_batch_size",
        "parallel": 8,
        "cpu_runtime_bytes": 450 * 1024**2,
    },
}
ESTIMATE_DEFAULTS["llm_rerank"] = {**ESTIMATE_DEFAULTS["llama.cpp"], "context": 1024}
ESTIMATE_DEFAULTS["vllm"] = {
    **ESTIMATE_DEFAULTS["transformers"],
    "parallel_option": "max_num_seqs",
    "cpu_runtime_bytes": 0,
}
ESTIMATE_DEFAULTS["diffusers"] = {**ESTIMATE_DEFAULTS["sentence_transformers"], "context": 77}
for _engine in ("cross_encoder", "embedding_rerank"):
    ESTIMATE_DEFAULTS[_engine] = ESTIMATE_DEFAULTS["sentence_transformers"]
for _engine in ("faster_whisper", "piper", "hibari", "rapidocr"):  # no KV cache; CTranslate2 / ONNX Runtime
    ESTIMATE_DEFAULTS[_engine] = {**ESTIMATE_DEFAULTS["sentence_transformers"], "context": 448,
                                  "cpu_runtime_bytes": 200 * 1024**2}  # fmt: skip

# Engines that can cut an input at the model's own length instead of refusing it: the encoders (a
# rerank document always; an embedding input only when the request says truncate: true, else it is
# refused with its token count), and the LLM reranker, which shortens a document until it fits.
TRUNCATING_ENGINES = frozenset({"sentence_transformers", "cross_encoder", "embedding_rerank", "llm_rerank"})
# Engines that hand a chat's image, audio and file parts to the model: vLLM, for a checkpoint that
# reads them. llama.cpp would need the model's image projector (mmproj), which Shoal does not load;
# the transformers engine reads text.
MULTIMODAL_ENGINES = frozenset({"vllm"})


def abilities(model_ability: list[str], engine: str) -> list[str]:
    """What a model does as this engine runs it: the catalog's abilities, "vision" only on an engine
    that gives the model its images (Gemma 3's GGUF builds, on llama.cpp, answer text only)."""
    return [a for a in model_ability if a != "vision" or engine in MULTIMODAL_ENGINES]


def context_tokens(engine: str, options: dict[str, Any], model_context: int | None) -> int:
    """Tokens one request may fill on a running model, as the engine reads its launch: the context
    option when the launch named one (the engine takes it as given), else the engine's default
    capped by the model's own context."""
    defaults = ESTIMATE_DEFAULTS.get(engine, ESTIMATE_DEFAULTS["transformers"])
    option = defaults["context_option"]
    if option and options.get(option) is not None:
        try:
            return int(options[option])
        except (TypeError, ValueError):  # refused at launch; a model restored from an older state
            pass
    default = int(defaults["context"])
    return min(default, model_context) if model_context else default
