"""The built-in catalog: every entry loads, names formats and engines that exist, estimates offline
through a real server (`shoal estimate NAME -s SIZE`), and its architecture numbers match the
published config.json values in tests/data/published_configs.json (each says where it was read)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import ShoalServer
from shoal.catalog import _builtin_families
from shoal.catalog.specs import KNOWN_ABILITIES, ModelFamily, ModelSpec, default_engine
from shoal.engines import registry

PUBLISHED = json.loads((Path(__file__).parent / "data" / "published_configs.json").read_text())["configs"]
FAMILIES = _builtin_families()
SPECS = [(f, s) for f in FAMILIES.values() for s in f.model_specs]
NEW_FAMILIES = {
    "qwen3", "llama-3.1-instruct", "llama-3.3-instruct", "gemma-3-1b-it", "gemma-3-it",
    "mistral-instruct-v0.3", "mistral-small-instruct", "phi-4", "phi-4-mini-instruct",
    "deepseek-r1-distill-qwen", "deepseek-r1-distill-llama", "Qwen3-Embedding-0.6B",
    "Qwen3-Embedding-4B", "Qwen3-Embedding-8B", "bge-reranker-v2-m3", "whisper-large-v3-turbo",
    "FLUX.1-schnell",
}  # fmt: skip


def _published(spec: ModelSpec) -> dict[str, Any] | None:
    assert spec.source is not None
    repo = spec.source.hf_repo
    for name, config in PUBLISHED.items():
        if repo == name or repo in config.get("gguf_repos", []):
            return dict(config)
    return None


def _params(cfg: dict[str, Any]) -> int:
    """Parameters of a decoder from its config (attention, gated MLP or experts, embeddings);
    norms and biases are left out (well under 1%)."""
    hidden, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    attn = 2 * hidden * heads * head_dim + 2 * hidden * kv * head_dim
    if cfg.get("encoder"):  # BERT-style: square attention, two-matrix MLP, no lm head
        attn, mlp = 4 * hidden * hidden, 2 * hidden * cfg["intermediate_size"]
    elif cfg.get("num_experts"):
        mlp = cfg["num_experts"] * 3 * hidden * cfg["moe_intermediate_size"]
    else:
        mlp = 3 * hidden * cfg["intermediate_size"]
    untied = not cfg["tie_word_embeddings"] and not cfg.get("no_lm_head")
    total = cfg["num_hidden_layers"] * (attn + mlp) + cfg["vocab_size"] * hidden * (2 if untied else 1)
    if cfg.get("encoder"):  # learned position embeddings and the pooler
        total += cfg["max_position_embeddings"] * hidden + hidden * hidden
    return total


def test_the_families_people_run_are_there() -> None:
    assert NEW_FAMILIES <= set(FAMILIES)
    sizes = {str(s.model_size_in_billions) for s in FAMILIES["qwen3"].model_specs}
    assert {"0.6", "1.7", "4.0", "8.0", "14.0", "32.0", "30B-A3B"} <= sizes


@pytest.mark.parametrize(
    "family", sorted(FAMILIES.values(), key=lambda f: f.model_name), ids=lambda f: f.model_name
)
def test_every_entry_names_abilities_a_licence_and_formats_engines_serve(family: ModelFamily) -> None:
    assert family.license and family.model_family, family.model_name
    assert set(family.model_ability) <= set(KNOWN_ABILITIES)
    for spec in family.model_specs:
        engine = default_engine(family.model_type, spec.model_format)
        assert engine is not None and registry.canonical(engine, spec.model_format) == engine
        if family.model_type == "LLM" and spec.model_format == "pytorch":
            assert registry.canonical("vllm", spec.model_format) == "vllm"  # safetensors: vLLM too
        if spec.source and spec.source.hf_file:
            assert spec.source.hf_file.endswith(".gguf") and spec.model_format == "ggufv2"
            assert spec.quantization.lower() in spec.source.hf_file.lower()
    by_size: dict[str, set[str]] = {}
    for spec in family.model_specs:  # one shape per size, whatever the format
        shape = spec.architecture.model_dump_json() if spec.architecture else ""
        by_size.setdefault(str(spec.model_size_in_billions), set()).add(shape)
    assert all(len(shapes) == 1 for shapes in by_size.values()), by_size


@pytest.mark.parametrize(
    ("family", "spec"),
    [(f, s) for f, s in SPECS if s.architecture is not None],
    ids=[f"{f.model_name}-{s.model_size_in_billions}-{s.quantization}" for f, s in SPECS if s.architecture],
)
def test_architecture_matches_the_published_config(family: ModelFamily, spec: ModelSpec) -> None:
    cfg = _published(spec)
    assert cfg is not None, f"no published config for {spec.source}"
    arch = spec.architecture
    assert arch is not None
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    assert (arch.n_layers, arch.n_kv_heads, arch.head_dim, arch.hidden_size, arch.vocab_size) == (
        cfg["num_hidden_layers"],
        cfg["num_key_value_heads"],
        head_dim,
        cfg["hidden_size"],
        cfg["vocab_size"],
    )
    assert family.context_length is not None and family.context_length <= cfg["max_position_embeddings"]
    counted = _params(cfg)
    if family.model_name == "gemma-3-it":  # the checkpoint holds a SigLIP vision tower too
        assert counted < arch.n_params < counted * 1.12
    else:
        assert abs(arch.n_params - counted) / counted < 0.015, (arch.n_params, counted)
    if "published_params" in cfg:  # the config's numbers give the parameter count published for them
        assert abs(counted - cfg["published_params"]) / cfg["published_params"] < 0.01


@pytest.fixture(scope="module")
def offline_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShoalServer]:
    root = tmp_path_factory.mktemp("catalog")
    srv = ShoalServer(
        root / "data",
        root / "server.log",
        env={"HF_HUB_OFFLINE": "1", "SHOAL_MODEL_CACHE": str(root / "cache")},
    )
    srv.start()
    yield srv
    srv.stop()


def test_every_spec_estimates_offline_from_the_catalog(offline_server: ShoalServer) -> None:
    """No hub and nothing downloaded: the catalog's architecture gives the KV cache exactly."""
    for family, spec in SPECS:
        body = {
            "model_name": family.model_name,
            "model_format": spec.model_format,
            "quantization": spec.quantization,
            "model_size_in_billions": spec.model_size_in_billions,
            "n_gpu": "auto",
        }
        response = offline_server.http.post("/v1/models/estimate", json=body)
        assert response.status_code == 200, (body, response.text)
        est = response.json()["estimate"]
        assert est["weights"] > 0 and est["total"] > est["weights"]
        arch = spec.architecture
        if arch is not None and family.model_type == "LLM":
            assert est["kv_bytes_per_token"] == 2 * arch.n_layers * arch.n_kv_heads * arch.head_dim * 2
            assert not any("guessed" in note for note in est["notes"]), est["notes"]


def _cli(server: ShoalServer, *args: str) -> str:
    env = {**os.environ, "COLUMNS": "250"}
    done = subprocess.run(
        [sys.executable, "-m", "shoal.cli", *args, "--endpoint", server.url],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_shoal_estimate_by_name_and_size(offline_server: ShoalServer) -> None:
    out = _cli(offline_server, "estimate", "qwen3", "-s", "8", "-c", "8192", "-p", "1")
    # Qwen3-8B: 36 layers × 8 KV heads × 128 × 2 (K and V) × 2 bytes = 144 KiB a token; 8192 tokens.
    assert "kv_cache     │ 1.12" in out and "Q4_K_M" in out


def test_models_search_filters_by_name_family_ability_and_description(offline_server: ShoalServer) -> None:
    def names(**query: str) -> set[str]:
        response = offline_server.http.get(
            "/v1/model_registrations/LLM", params={"detailed": "true", **query}
        )
        assert response.status_code == 200, response.text
        return {f["model_name"] for f in response.json()}

    assert names(search="reasoning") >= {"qwen3", "deepseek-r1-distill-qwen", "deepseek-r1-distill-llama"}
    assert "llama-3.1-instruct" not in names(search="reasoning")
    assert names(search="gemma3 vision") == {"gemma-3-it"}  # every word must match
    assert names(search="MICROSOFT") == {"phi-4", "phi-4-mini-instruct"}  # description, any case
    assert names(search="no-such-model") == set()
    too_long = offline_server.http.get("/v1/model_registrations/LLM", params={"search": "x" * 201})
    assert too_long.status_code == 400 and "search" in too_long.json()["error"]["message"]
    all_types = offline_server.http.get("/v1/model_registrations/all", params={"search": "qwen3"}).json()
    assert {f["model_name"] for f in all_types} >= {"qwen3", "Qwen3-Embedding-0.6B"}
    out = _cli(offline_server, "models", "--search", "tools", "--type", "all")
    assert "mistral-small-instruct" in out and "Apache-2.0" in out and "phi-4 " not in out


def test_shoal_launch_picks_the_spec_by_size(offline_server: ShoalServer) -> None:
    """Offline and not cached, so the launch fails, naming the spec -s 8 picked."""
    argv = ["launch", "qwen3", "-s", "8", "-q", "Q8_0", "--endpoint", offline_server.url]
    done = subprocess.run(
        [sys.executable, "-m", "shoal.cli", *argv],
        capture_output=True, text=True, env={**os.environ, "COLUMNS": "250"}, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert "Qwen3-8B-Q8_0.gguf" in done.stdout + done.stderr, done.stdout + done.stderr
