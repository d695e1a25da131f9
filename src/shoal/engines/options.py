"""Launch options: which engine takes which, with each option's type and bounds.

One table, read by the gateway to refuse a bad launch (POST /v1/models, /v1/models/estimate) with a
400 before anything is planned or spawned, and by every engine again at load (`Engine.pop_options`).
Engines may check finer rules of their own (a dtype name, a file that must exist). This module imports
nothing but the error tree, so the gateway reads it with no engine installed.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from shoal.errors import InvalidRequest

MAX_CONTEXT = 1 << 24  # tokens per sequence: past any model's context (16,777,216)
MIN_CONTEXT = 16  # tokens: a context shorter than this holds no prompt and reply
MAX_SEQUENCES = 4096  # sequences decoded at once (slots, batch size)
MAX_THREADS = 1024
MAX_TEXT = 100_000  # characters of a text option (a chat template, a prompt)


@dataclass(frozen=True)
class Option:
    kind: Literal["int", "float", "bool", "str"]
    low: float | None = None  # inclusive
    high: float | None = None  # inclusive
    low_open: bool = False  # low itself is refused (a positive fraction)
    choices: tuple[str, ...] = ()
    help: str = ""
    pattern: str = ""  # a str option's whole value must match it (re.fullmatch)
    shown: str = ""  # what describe() says of a patterned value

    def describe(self) -> str:
        if self.shown:
            return self.shown
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.kind == "bool":
            return "true or false"
        if self.kind == "str":
            return f"a string of at most {MAX_TEXT:,} characters"
        noun = "an integer" if self.kind == "int" else "a number"
        if self.low is None:
            return noun
        low = f"over {_number(self.low)}" if self.low_open else f"from {_number(self.low)}"
        return f"{noun} {low} to {_number(self.high)}" if self.high is not None else f"{noun} {low}"


def _number(value: float | None) -> str:
    return f"{int(value):,}" if value is not None and float(value).is_integer() else f"{value:g}"


def _int(low: int, high: int, help: str) -> Option:
    return Option("int", low, high, help=help)


OPTIONS: dict[str, Option] = {
    # context and batching (what the memory estimate reads)
    "n_ctx": _int(MIN_CONTEXT, MAX_CONTEXT, "llama.cpp: tokens of context per slot"),
    "context_length": _int(MIN_CONTEXT, MAX_CONTEXT, "transformers, vLLM: tokens per sequence"),
    "n_parallel": _int(1, MAX_SEQUENCES, "llama.cpp: slots (sequences decoded at once)"),
    "max_batch_size": _int(
        1,
        MAX_SEQUENCES,
        "transformers: requests decoded together; encoders: inputs per dynamic batch; "
        "faster-whisper: decoder calls per dynamic batch",
    ),
    "max_batch_tokens": _int(
        1, MAX_CONTEXT, "encoders, faster-whisper: tokens per dynamic batch (inputs' or prompts' lengths)"
    ),
    "batch_wait_ms": Option(
        "float", 0, 1000, help="encoders, faster-whisper: wait for a dynamic batch to fill (ms)"
    ),
    "max_num_seqs": _int(1, MAX_SEQUENCES, "vLLM: sequences decoded together"),
    "n_batch": _int(1, MAX_CONTEXT, "llama.cpp: tokens per prompt-processing batch"),
    "n_gpu_layers": _int(-1, 100_000, "llama.cpp: layers on the GPU; -1 all"),
    "n_threads": _int(1, MAX_THREADS, "CPU threads of the runner"),
    "tensor_parallel_size": _int(1, 64, "vLLM: GPUs one replica spans"),
    "batch_size": _int(1, 65_536, "sentence-transformers: inputs per forward pass"),
    "max_length": _int(1, MAX_CONTEXT, "cross-encoder: tokens per (query, document) pair"),
    "memory_fraction": Option("float", 0, 1, low_open=True, help="share of the GPU (set by the scheduler)"),
    # model loading
    "dtype": Option("str", help="weights' dtype (the engine checks the name)"),
    "torch_dtype": Option("str", help="transformers: same as dtype"),
    "trust_remote_code": Option("bool", help="run the model repository's own Python code"),
    "enforce_eager": Option("bool", help="vLLM: no CUDA graphs"),
    "quantization": Option("str", help="vLLM: quantization method"),
    "start_timeout": Option("float", 0, 86_400, low_open=True, help="vLLM: seconds to wait for its start"),
    "chat_template": Option("str", help="llama.cpp, vLLM: a Jinja chat template instead of the model's"),
    "tool_call_parser": Option("str", help="vLLM: its tool-call parser (hermes, llama3_json, ...)"),
    # rerank
    "instruction": Option("str", help="LLM rerank: the task instruction"),
    "system_prompt": Option("str", help="LLM rerank: the system prompt"),
    "query_prompt": Option("str", help="embedding rerank: prefix of the query"),
    "document_prompt": Option("str", help="embedding rerank: prefix of each document"),
    "score": Option("str", choices=("unit", "cosine"), help="embedding rerank: the score's scale"),
    # speech
    "compute_type": Option("str", help="faster-whisper: CTranslate2 compute type"),
    "beam_size": _int(1, 64, "faster-whisper: beam width"),
    "noise_scale": Option("float", 0, 10, help="piper: phoneme noise"),
    "noise_w_scale": Option("float", 0, 10, help="piper: phoneme width noise"),
    "normalize_audio": Option("bool", help="piper: normalise the volume"),
    "volume": Option("float", 0, 10, help="piper: volume multiplier"),
    "voice": Option("str", help="hibari: the one voice to load"),
    "seed": _int(0, 2**63 - 1, "hibari: random seed"),
    # OCR
    "text_score": Option("float", 0, 1, help="rapidocr: lowest text score kept"),
    "box_thresh": Option("float", 0, 1, help="rapidocr: lowest box score kept"),
    "unclip_ratio": Option("float", 0.5, 5, help="rapidocr: box growth"),
    "use_cls": Option("bool", help="rapidocr: detect rotated text"),
    "max_pixels": _int(1, 1 << 30, "rapidocr: largest image accepted"),
    "max_side_len": _int(32, 1 << 16, "rapidocr: longest side the detector sees"),
    # image generation
    "num_inference_steps": _int(1, 100, "diffusers: default denoising steps"),
    "guidance_scale": Option("float", 0, 50, help="diffusers: default guidance"),
    "variant": Option(
        "str",
        pattern=r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}",
        shown="a variant name: up to 32 letters, digits, '_' or '-' (e.g. fp16)",
        help="diffusers: the weights' variant (fp16: each component's *.fp16.safetensors)",
    ),
}

_LLAMA = ("n_ctx", "n_parallel", "n_gpu_layers", "n_batch", "chat_template")
# Encoders batch across requests (engines/batching.py); batch_size cuts each forward pass.
_TORCH = (
    "batch_size",
    "trust_remote_code",
    "memory_fraction",
    "max_batch_size",
    "max_batch_tokens",
    "batch_wait_ms",
)
ENGINE_OPTIONS: dict[str, tuple[str, ...]] = {
    "llama.cpp": _LLAMA,
    "llm_rerank": (*_LLAMA, "instruction", "system_prompt"),
    "transformers": (
        "context_length", "max_batch_size", "dtype", "torch_dtype", "memory_fraction", "trust_remote_code",
    ),
    "vllm": (
        "memory_fraction", "context_length", "max_num_seqs", "dtype", "tensor_parallel_size",
        "enforce_eager", "quantization", "trust_remote_code", "start_timeout", "chat_template",
        "tool_call_parser",
    ),
    "sentence_transformers": _TORCH,
    "embedding_rerank": (*_TORCH, "query_prompt", "document_prompt", "score"),
    "cross_encoder": (*_TORCH, "max_length"),
    "faster_whisper": ("compute_type", "beam_size", "max_batch_size", "max_batch_tokens", "batch_wait_ms"),
    "piper": ("noise_scale", "noise_w_scale", "normalize_audio", "volume"),
    "hibari": ("voice", "seed"),
    "rapidocr": ("text_score", "box_thresh", "unclip_ratio", "use_cls", "max_pixels", "max_side_len"),
    "diffusers": ("memory_fraction", "dtype", "num_inference_steps", "guidance_scale", "variant"),
}  # fmt: skip
SHOAL_OPTIONS = ("n_threads",)  # every engine: Shoal reads them, the engine never sees them

_INT_TEXT = re.compile(r"^\s*[-+]?\d+\s*$")
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


class _Bad(Exception):
    pass


def _coerce(option: Option, value: Any) -> Any:
    """The value as the option's type (launch options may arrive as text: "512", "true"), or _Bad."""
    if option.kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in (*_TRUE, *_FALSE):
            return value.strip().lower() in _TRUE
        raise _Bad
    if option.kind == "str":
        if (
            not isinstance(value, str)
            or len(value) > MAX_TEXT
            or (option.choices and value not in option.choices)
            or (option.pattern and re.fullmatch(option.pattern, value) is None)
        ):
            raise _Bad
        return value
    if isinstance(value, bool):
        raise _Bad
    if option.kind == "int":
        if isinstance(value, str) and _INT_TEXT.match(value):
            value = int(value)
        if not isinstance(value, int):
            raise _Bad
    else:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise _Bad from None
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise _Bad
    too_low = option.low is not None and (value <= option.low if option.low_open else value < option.low)
    if too_low or (option.high is not None and value > option.high):
        raise _Bad
    return value


def check_launch_options(engine: str | None, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options with each value as its option's type, or InvalidRequest naming every bad one.
    With an engine (its canonical name), an option it does not take is refused too; without one,
    only the values of the options in the table are checked (an estimate, or a launch whose engine
    is not known yet) and other names pass as they are."""
    known = ENGINE_OPTIONS.get(engine) if engine else None
    if known is not None:
        unknown = sorted(set(options) - set(known) - set(SHOAL_OPTIONS))
        if unknown:
            raise InvalidRequest(
                f"unknown option(s) for engine {engine}: {', '.join(unknown)}; "
                f"known: {', '.join((*known, *SHOAL_OPTIONS))}"
            )
    checked: dict[str, Any] = {}
    problems: list[str] = []
    for name, value in options.items():
        option = OPTIONS.get(name)
        if option is None:
            checked[name] = value
            continue
        try:
            checked[name] = _coerce(option, value)
        except _Bad:
            shown = json.dumps(value, default=str)
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            problems.append(f"{name} must be {option.describe()}, not {shown}")
    if problems:
        raise InvalidRequest("invalid launch option: " + "; ".join(problems))
    return checked
