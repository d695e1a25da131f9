"""Estimate a model's memory before loading it: weights, KV cache, activation workspace, CUDA context.

Placement reserves this much on a device before a runner starts (DESIGN.md, "GPU memory"), so every
term comes from the model's own files where they are local (GGUF header, config.json, safetensors
headers) and from the catalog's parameter count otherwise, with a note saying what was guessed.
Only headers are read: estimating a 70B model must not touch its tensors.
"""

from __future__ import annotations

import json
import math
import mmap
import re
import struct
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

GiB = 1024**3
CUDA_CONTEXT_BYTES = int(0.6 * GiB)  # per process, measured on an H100 (GPU-FACTS.md)


@dataclass(frozen=True)
class ModelShape:
    """The numbers the estimate needs; None where the files do not say."""

    n_layers: int | None
    n_kv_heads: int | None
    head_dim: int | None
    hidden_size: int | None
    vocab_size: int | None
    n_params: int | None
    context_length: int | None
    source: str  # "gguf header", "config.json", "catalog size", "weights size"


@dataclass(frozen=True)
class Estimate:
    """Bytes per term; `notes` says which terms were guessed rather than read."""

    weights: int
    kv_cache: int
    activations: int
    cuda_context: int
    context_length: int
    parallel: int
    dtype: str
    kv_bytes_per_token: int
    notes: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.cuda_context

    def to_dict(self) -> dict[str, Any]:
        out = {**asdict(self), "notes": list(self.notes), "total": self.total}
        for key in ("weights", "kv_cache", "activations", "cuda_context", "total"):
            out[f"{key}_gib"] = round(out[key] / GiB, 3)
        return out


# ---- dtypes and quantizations -------------------------------------------------------------------

_DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
_DTYPE_ALIASES = {
    "f64": "float64", "fp64": "float64", "double": "float64", "f32": "float32", "fp32": "float32",
    "float": "float32", "f16": "float16", "fp16": "float16", "half": "float16", "bf16": "bfloat16",
}  # fmt: skip

# Bytes per parameter for size-only estimates. GGUF rows: llama.cpp's quantize table for LLaMA-7B
# (file size / 6.74e9 parameters, so mixed tensor types and block scales are included). Other
# N-bit names use N/8 + 0.06 (group scales, unquantized embeddings): gptq/awq/int4/4-bit ~0.56,
# int8/8-bit ~1.06. "none" and plain dtypes use _DTYPE_BYTES.
_QUANT_BYTES = {
    "q8_0": 1.07, "q6_k": 0.82, "q5_k_m": 0.71, "q5_k_s": 0.69, "q5_1": 0.75, "q5_0": 0.69,
    "q4_k_m": 0.61, "q4_k_s": 0.57, "q4_1": 0.63, "q4_0": 0.57, "iq4_xs": 0.55, "iq4_nl": 0.57,
    "q3_k_l": 0.53, "q3_k_m": 0.49, "q3_k_s": 0.44, "iq3_m": 0.46, "iq3_xxs": 0.40, "q2_k": 0.42,
    "iq2_xs": 0.31, "iq2_xxs": 0.28, "gptq": 0.56, "awq": 0.56, "fp8": 1.03, "nf4": 0.56,
}  # fmt: skip
_BITS = re.compile(r"(?:int|^q|^w)(\d{1,2})|(\d{1,2})[-_ ]?bit")

# KV cache bytes per element. llama.cpp's q8_0 is 34 bytes per block of 32, q4_0 18, q4_1 20.
_KV_BYTES = {
    "f16": 2.0, "fp16": 2.0, "float16": 2.0, "bf16": 2.0, "bfloat16": 2.0, "auto": 2.0,
    "f32": 4.0, "fp32": 4.0, "float32": 4.0,
    "q8_0": 1.0625, "int8": 1.0, "8": 1.0, "fp8": 1.0, "fp8_e4m3": 1.0, "fp8_e5m2": 1.0,
    "q5_1": 0.75, "q5_0": 0.6875, "q4_1": 0.625, "q4_0": 0.5625, "iq4_nl": 0.5625,
}  # fmt: skip


def _canon_dtype(name: str | None) -> str | None:
    key = _DTYPE_ALIASES.get(k := (name or "").lower().removeprefix("torch."), k)
    return key if key in _DTYPE_BYTES else None


def _bytes_per_param(quant: str, dtype: str | None, embedding: bool) -> tuple[float, str, bool]:
    """(bytes per parameter, label, known) for a quantization name or, when it is "none", the dtype."""
    q = quant.lower()
    if q in _QUANT_BYTES:
        return _QUANT_BYTES[q], quant, True
    if q in ("none", "") or _canon_dtype(q):
        # Embedding checkpoints mostly ship float32, current LLM checkpoints bfloat16.
        label = _canon_dtype(q) or _canon_dtype(dtype) or ("float32" if embedding else "bfloat16")
        return float(_DTYPE_BYTES[label]), label, True
    if m := _BITS.search(q):
        return int(m.group(1) or m.group(2)) / 8 + 0.06, quant, True
    return 2.0, quant, False


# ---- GGUF header --------------------------------------------------------------------------------

_GGUF_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_KEEP_ARRAY = 4096  # per-layer arrays are kept; vocabularies and merges are only counted


class _Skipped(NamedTuple):
    """A long array (vocabulary, merges) walked over; only its length is kept."""

    length: int


class _GGUFCursor:
    """Walks a memory-mapped GGUF header without touching the tensor data after it."""

    def __init__(self, buf: Any) -> None:
        self.buf, self.pos, self.size = buf, 4, "Q"

    def take(self, fmt: str) -> Any:
        try:
            (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        except struct.error as exc:
            raise ValueError("truncated GGUF header") from exc
        self.pos += struct.calcsize("<" + fmt)
        return value

    def string(self, keep: bool = True) -> str:
        n = self.take(self.size)
        if self.pos + n > len(self.buf):
            raise ValueError("truncated GGUF header")
        self.pos += n
        return bytes(self.buf[self.pos - n : self.pos]).decode("utf-8", "replace") if keep else ""

    def value(self, vtype: int) -> Any:
        if vtype == _GGUF_STRING:
            return self.string()
        if vtype == _GGUF_ARRAY:
            etype, count = self.take("I"), self.take(self.size)
            fmt = _GGUF_SCALAR.get(etype)
            if fmt and count <= _KEEP_ARRAY:
                return [self.take(fmt) for _ in range(count)]
            if fmt:
                self.pos += count * struct.calcsize("<" + fmt)
                if self.pos > len(self.buf):
                    raise ValueError("truncated GGUF header")
            elif etype == _GGUF_STRING:
                for _ in range(count):
                    self.string(keep=False)
            else:
                for _ in range(count):
                    self.value(etype)
            return _Skipped(count)
        if vtype not in _GGUF_SCALAR:
            raise ValueError(f"unknown GGUF value type {vtype}")
        return self.take(_GGUF_SCALAR[vtype])


def _as_int(value: Any) -> int | None:
    """A scalar, or a per-layer array as its rounded-up mean (so layers × value covers the sum)."""
    if isinstance(value, list) and value and all(isinstance(v, int | float) for v in value):
        return math.ceil(sum(value) / len(value))
    if isinstance(value, int | float) and not isinstance(value, bool):
        return int(value)
    return None


def read_gguf_shape(path: Path) -> ModelShape:
    """The shape from a GGUF file's key-value metadata (and parameter count from its tensor index)."""
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        return gguf_shape(buf)


def gguf_shape(buf: Any) -> ModelShape:
    """The shape from a GGUF header in `buf` (a memory map, or the first bytes of a remote file read
    with range requests: a ValueError "truncated GGUF header" means more bytes are needed)."""
    if bytes(buf[:4]) != b"GGUF":
        raise ValueError("not a GGUF file (it does not start with 'GGUF')")
    cur = _GGUFCursor(buf)
    if cur.take("I") == 1:
        cur.size = "I"  # GGUF v1 used 32-bit counts and lengths
    n_tensors, n_kv = cur.take(cur.size), cur.take(cur.size)
    kv: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        kv[key] = cur.value(cur.take("I"))
    n_params = 0
    for _ in range(n_tensors):  # name, dims, type, offset
        cur.string(keep=False)
        n_params += math.prod(cur.take(cur.size) for _ in range(cur.take("I")))
        cur.take("I"), cur.take("Q")
    arch = kv.get("general.architecture", "")

    def arch_int(key: str) -> int | None:
        return _as_int(kv.get(f"{arch}.{key}"))

    heads, hidden = arch_int("attention.head_count"), arch_int("embedding_length")
    tokens = kv.get("tokenizer.ggml.tokens")
    vocab = arch_int("vocab_size") or (
        tokens.length if isinstance(tokens, _Skipped) else len(tokens) if isinstance(tokens, list) else None
    )
    return ModelShape(
        n_layers=arch_int("block_count"),
        n_kv_heads=arch_int("attention.head_count_kv") or heads,  # llama.cpp's default: no GQA
        head_dim=arch_int("attention.key_length") or (hidden // heads if hidden and heads else None),
        hidden_size=hidden,
        vocab_size=vocab,
        n_params=n_params or None,
        context_length=arch_int("context_length"),
        source="gguf header",
    )


# ---- Hugging Face folders -----------------------------------------------------------------------

_HF_MODEL_KEYS = {"hidden_size", "n_embd", "d_model", "text_config"}
_SKIP_PARTS = {"onnx", "openvino", ".git", ".cache"}
_SKIP_NAMES = re.compile(r"^(optimizer|scheduler|training_args|rng_state)")


def _weight_files(folder: Path) -> list[Path]:
    """*.safetensors if any, else *.bin / *.pt / *.pth; exported copies (onnx/, openvino/) are not loaded."""

    def found(*suffixes: str) -> list[Path]:
        return sorted(
            p
            for p in folder.rglob("*")
            if p.suffix in suffixes
            and p.is_file()
            and not _SKIP_PARTS & set(p.relative_to(folder).parts)
            and not _SKIP_NAMES.match(p.name)
        )

    # ONNX Runtime models (Piper voices, RapidOCR) are loaded from their .onnx files.
    return found(".safetensors") or found(".bin", ".pt", ".pth") or found(".onnx")


def _safetensors_tensors(files: list[Path]) -> list[tuple[str, int, int]]:
    """(dtype, elements, bytes) per tensor, from the JSON header at the front of each file."""
    out: list[tuple[str, int, int]] = []
    for file in files:
        try:
            with file.open("rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > 100_000_000:
                    raise ValueError(f"header of {n} bytes")
                header = json.loads(f.read(n))
            for name, t in header.items():
                if name != "__metadata__":
                    start, end = t["data_offsets"]
                    out.append((str(t["dtype"]), math.prod(t["shape"]), end - start))
        except (struct.error, AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{file} has no readable safetensors header ({exc})") from exc
    return out


def _load_config(folder: Path) -> dict[str, Any]:
    """config.json at the top, or in a sentence-transformers module folder (old 0_Transformer/ layout)."""
    for candidate in [folder / "config.json", *sorted(folder.glob("*/config.json"))]:
        if candidate.is_file():
            config = json.loads(candidate.read_text())
            if isinstance(config, dict) and _HF_MODEL_KEYS & set(config):
                return config
    raise FileNotFoundError(f"no model config.json in {folder}")


def read_hf_shape(folder: Path) -> ModelShape:
    """The shape from config.json (the text part of multimodal configs); parameters from safetensors."""
    files = [p for p in _weight_files(folder) if p.suffix == ".safetensors"]
    return hf_shape(_load_config(folder), _safetensors_tensors(files))


def hf_shape(config: dict[str, Any], tensors: list[tuple[str, int, int]]) -> ModelShape:
    """The shape from a config.json and the safetensors tensors (dtype, elements, bytes)."""
    cfg = config["text_config"] if isinstance(config.get("text_config"), dict) else config

    def first(*keys: str) -> int | None:
        values = (_as_int(cfg.get(key, config.get(key))) for key in keys)
        return next((v for v in values if v is not None), None)

    heads, hidden = (
        first("num_attention_heads", "n_head", "n_heads"),
        first("hidden_size", "n_embd", "d_model"),
    )
    return ModelShape(
        n_layers=first("num_hidden_layers", "n_layer", "n_layers", "num_layers"),
        n_kv_heads=first("num_key_value_heads", "num_kv_heads", "n_head_kv")
        or (1 if cfg.get("multi_query") else heads),
        head_dim=first("head_dim") or (hidden // heads if hidden and heads else None),
        hidden_size=hidden,
        vocab_size=first("vocab_size"),
        n_params=sum(numel for _, numel, _ in tensors) or None,
        context_length=first("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"),
        source="config.json",
    )


@dataclass(frozen=True)
class RemoteWeights:
    """What a hub's metadata says of weights not downloaded yet: their bytes (the file list), and
    the GGUF header's shape, or config.json and the safetensors headers (read with range requests)."""

    weights: int
    gguf: ModelShape | None = None
    config: dict[str, Any] | None = None
    tensors: tuple[tuple[str, int, int], ...] = ()


# ---- the estimate -------------------------------------------------------------------------------

_LLAMACPP = {"llama.cpp", "llama_cpp", "llamacpp", "xllamacpp"}
_LLAMACPP_UBATCH = 512
_ST_BATCH, _ST_MAX_SEQ = 32, 512  # the sentence-transformers engine's batch; longer inputs are rare
_VLLM_MAX_BATCHED_TOKENS = 8192  # vLLM's default prefill chunk on large GPUs
_VLLM_CUDA_GRAPHS = int(0.5 * GiB)  # a typical "graph capturing took" figure; not calibrated here
# Torch engines: peak activations plus the caching allocator's reserve, per token in flight, per
# hidden unit, per byte of dtype, and a fixed cuBLAS/library workspace. Fitted to GPU-FACTS.md:
# (torch peak - weights - KV) / (tokens × hidden) was 23.5, 23.7 and 25.6 bytes in bf16/fp16 for the
# 1.1B, 3B and BERT rows; reserved - peak was 50%, 53% and 50% of those activations (not 10% of the
# weights, which would be 16%, 8% and 75%); NVML - reserved - context was ~0.07 GiB. So 12 × 1.5 = 18.
# Totals against NVML: 1.1B 16×1088 bf16 4.28 vs 4.27 GiB; 3B 8×2080 bf16 9.79 vs 9.80; BERT-base
# 64×256 fp16 1.30 vs 1.32. Full-context fp32 logits + 10% of weights+KV instead gave 3.39 and 9.74
# (0.79, 0.99 of NVML): generate() keeps only last-token logits, so logits do not grow with the prompt,
# while activations grow with batch × prompt. Three points, one run each: treat as ±10%.
_TORCH_ACT_PER_HIDDEN = 18
_TORCH_WORKSPACE = int(0.07 * GiB)


def _torch_activations(tokens: int, hidden: int, act_bytes: int) -> int:
    return tokens * hidden * _TORCH_ACT_PER_HIDDEN * act_bytes + _TORCH_WORKSPACE


def _guess_shape(n_params: int, source: str) -> ModelShape:
    """A typical dense decoder of this size, fitted to SmolLM2, Qwen2.5 and Llama 2/3 (0.1B to 70B):
    layers × hidden ≈ 131072 × (P / 7.5e9)^0.58, hidden ≈ 4096 × (P / 7.5e9)^0.42, 4 query heads per
    KV head, a 128k vocabulary."""
    r = max(n_params, 10**6) / 7.5e9
    hidden = max(256, round(4096 * r**0.42 / 64) * 64)
    head_dim = 64 if hidden < 2048 else 128
    layers = max(1, round(131072 * r**0.58 / hidden))
    return ModelShape(
        layers, max(1, hidden // head_dim // 4), head_dim, hidden, 128256, n_params, None, source
    )


def _gguf_files(path: Path) -> list[Path]:
    """The GGUF file, all shards of a split GGUF (model-00001-of-00003.gguf), or the GGUFs in a folder."""
    if path.is_dir():
        return sorted(path.glob("*.gguf"))
    if re.search(r"-\d{5}-of-\d{5}\.gguf$", path.name):
        return sorted(path.parent.glob(re.sub(r"-\d{5}-of-", "-?????-of-", path.name)))
    return [path]


def _folder_weights(
    path: Path, engine: str, dtype: str | None, notes: list[str]
) -> tuple[int, str | None, ModelShape | None]:
    """(bytes, dtype) of a folder's weights in the dtype they will be loaded in; 0 when there are none."""
    folder = path if path.is_dir() else path.parent
    files = _weight_files(folder) if path.is_dir() else [path]
    config: dict[str, Any] = {}
    tensors: list[tuple[str, int, int]] = []
    try:
        config = _load_config(folder)
    except (OSError, ValueError) as exc:
        notes.append(f"could not read the model's config ({exc})")
    try:
        tensors = _safetensors_tensors([p for p in files if p.suffix == ".safetensors"])
    except (OSError, ValueError) as exc:
        notes.append(str(exc))
    stored_bytes = sum(p.stat().st_size for p in files)
    return _cast_weights(stored_bytes, config, tensors, engine, dtype, notes)


def _cast_weights(
    weights: int,
    config: dict[str, Any],
    tensors: list[tuple[str, int, int]],
    engine: str,
    dtype: str | None,
    notes: list[str],
) -> tuple[int, str | None, ModelShape | None]:
    """Stored weight bytes as loaded in the engine's dtype, the dtype, and the shape."""
    shape = hf_shape(config, tensors) if config else None
    by_dtype: dict[str, int] = {}
    for dt, _, nbytes in tensors:
        if canon := _canon_dtype(dt):
            by_dtype[canon] = by_dtype.get(canon, 0) + nbytes
    # Pickled .bin files do not say their dtype without torch; config.json's torch_dtype does.
    stored = max(by_dtype, key=by_dtype.__getitem__) if by_dtype else None
    stored = stored or _canon_dtype(str(config.get("torch_dtype") or config.get("dtype") or ""))
    target = _canon_dtype(dtype)
    if dtype and not target and dtype.lower() != "auto":
        notes.append(f"dtype {dtype!r} not recognised: weights counted as stored")
    if target is None and engine == "vllm" and stored == "float32":
        target = "float16"  # vLLM's dtype="auto" runs float32 checkpoints in float16
    if weights and target and stored and target != stored:
        if tensors:  # only floating-point tensors are cast; packed integer weights stay as they are
            weights = sum(n * _DTYPE_BYTES[target] if _canon_dtype(dt) else b for dt, n, b in tensors)
        else:
            weights = weights * _DTYPE_BYTES[target] // _DTYPE_BYTES[stored]
        notes.append(f"weights stored as {stored}, counted as loaded in {target}")
    elif weights and target and not stored:
        notes.append("the files' dtype is unknown: weights counted as stored")
    return weights, target or stored, shape


NO_KV_CACHE = frozenset(
    {
        "sentence_transformers",
        "cross_encoder",
        "embedding_rerank",
        "faster_whisper",
        "piper",
        "hibari",
        "rapidocr",
        "diffusers",
    }
)


def estimate(
    *,
    model_format: str,
    engine: str,
    path: Path | None,
    size_in_billions: float | None,
    quantization: str | None,
    context_length: int,
    parallel: int,
    dtype: str | None = None,
    kv_cache_dtype: str | None = None,
    on_gpu: bool = True,
    remote: RemoteWeights | None = None,
    catalog_shape: ModelShape | None = None,
) -> Estimate:
    """Bytes one replica needs: from its files when local, from the hub's metadata (`remote`) when
    not downloaded yet, else from the catalog: its architecture (`catalog_shape`, the published
    config.json's numbers) or, without one, its size (noted).

    Raises ValueError when there are neither local weights nor a size: placement must not see 0.
    """
    notes: list[str] = []
    quant = (quantization or "none").strip()
    embedding = engine in NO_KV_CACHE  # encoders and audio/OCR models keep no cache between requests
    if engine == "transformers" and dtype is None:
        dtype = "bfloat16" if on_gpu else "float32"  # what Shoal's transformers engine loads by default
    shape: ModelShape | None = None
    weights, label = 0, None
    if path is not None and (model_format.lower() in ("gguf", "ggufv2") or path.suffix == ".gguf"):
        files = _gguf_files(path)
        weights = sum(p.stat().st_size for p in files)
        label = quant if quant.lower() != "none" else "gguf"
        try:
            shape = read_gguf_shape(files[0])
        except (OSError, ValueError, IndexError) as exc:
            notes.append(f"could not read the GGUF header ({exc})")
    elif path is not None:
        weights, label, shape = _folder_weights(path, engine, dtype, notes)
    elif remote is not None and remote.gguf is not None:
        weights, shape = remote.weights, remote.gguf
        label = quant if quant.lower() != "none" else "gguf"
        notes.append("read from the hub before download: file sizes and the GGUF header")
    elif remote is not None:
        weights, label, shape = _cast_weights(
            remote.weights, remote.config or {}, list(remote.tensors), engine, dtype, notes
        )
        notes.append("read from the hub before download: file sizes, config.json, safetensors headers")
    if not weights and shape is None and catalog_shape is not None:
        shape = catalog_shape
        notes.append("shape from the catalog (the published config.json), not read from the files")
    if not weights:
        counted = shape.n_params / 1e9 if shape is not None and shape.n_params else size_in_billions
        if not counted:
            raise ValueError("cannot estimate memory: no local weights and no model_size_in_billions")
        bpp, label, known = _bytes_per_param(quant, dtype, embedding)
        weights = int(counted * 1e9 * bpp)
        notes.append(
            f"weights not on disk: {counted:.4g}B parameters × {bpp:g} bytes ({label})"
            + ("" if known else f"; quantization {quant!r} unknown, assumed 16-bit")
        )

    if shape is not None and shape.n_params:
        n_params, source = shape.n_params, "weights size"
    elif size_in_billions:
        n_params, source = int(size_in_billions * 1e9), "catalog size"
    else:
        n_params, source = int(weights / _bytes_per_param(quant, dtype, embedding)[0]), "weights size"
    guess = _guess_shape(n_params, source)
    missing = {f.name for f in fields(guess) if shape is None or getattr(shape, f.name) is None}
    full = replace(shape, **{k: getattr(guess, k) for k in missing}) if shape is not None else guess
    assert full.n_layers and full.n_kv_heads and full.head_dim and full.hidden_size and full.vocab_size

    kv_key = (kv_cache_dtype or "f16").lower()
    if kv_key not in _KV_BYTES:
        notes.append(f"KV cache dtype {kv_cache_dtype!r} not recognised: counted as 16-bit")
    kv_bytes_per_token = 0
    if not embedding:  # encoders keep no cache between requests
        per_element = _KV_BYTES.get(kv_key, 2.0)
        kv_bytes_per_token = int(2 * full.n_layers * full.n_kv_heads * full.head_dim * per_element)
        if {"n_layers", "n_kv_heads", "head_dim"} & missing:
            notes.append(
                f"KV cache guessed from {n_params / 1e9:.3g}B parameters ({source}), not read from the "
                f"model: assumes {full.n_layers} layers, {full.n_kv_heads} KV heads of {full.head_dim}; "
                "models without grouped-query attention (e.g. Llama 2) need up to 4x more"
            )
    if {"hidden_size", "vocab_size"} & missing:
        notes.append(f"activations assume hidden size {full.hidden_size}, vocabulary {full.vocab_size}")
    if full.context_length and context_length > full.context_length:
        notes.append(f"context {context_length} is beyond the model's own {full.context_length}")

    if engine in _LLAMACPP:
        # llama.cpp's compute buffer: one micro-batch of logits and FFN activations in fp32. It assumes
        # flash attention (llama.cpp's default on CUDA); without it add n_ubatch × context × heads × 4.
        activations = _LLAMACPP_UBATCH * (full.vocab_size + 4 * full.hidden_size) * 4
    else:
        act_bytes = _DTYPE_BYTES.get(label or "", 2)  # quantized torch models compute in 16-bit
        if embedding:
            tokens = _ST_BATCH * min(context_length, _ST_MAX_SEQ)
        elif engine == "vllm":
            tokens = min(context_length * parallel, _VLLM_MAX_BATCHED_TOKENS)
        else:
            tokens = context_length * parallel  # transformers prefills every sequence's prompt at once
        activations = _torch_activations(tokens, full.hidden_size, act_bytes)
        if not embedding:
            activations += parallel * full.vocab_size * 4  # last-token logits in fp32
        if engine == "vllm":
            activations += _VLLM_CUDA_GRAPHS
            notes.append("vLLM activations and CUDA graphs are not calibrated yet")
    return Estimate(
        weights=weights,
        kv_cache=kv_bytes_per_token * context_length * parallel,
        activations=activations,
        cuda_context=CUDA_CONTEXT_BYTES if on_gpu else 0,
        context_length=context_length,
        parallel=parallel,
        dtype=label or "unknown",
        kv_bytes_per_token=kv_bytes_per_token,
        notes=tuple(notes),
    )
