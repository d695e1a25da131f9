"""Placement by memory through the REST API, on declared fake GPUs with real runners on the CPU."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import CHAT_MODEL, EMBED_MODEL, ShoalServer, pids_of

GiB = 1024**3


@pytest.fixture(scope="module")
def gpu_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShoalServer]:
    root = tmp_path_factory.mktemp("fakegpu")
    srv = ShoalServer(root / "data", root / "server.log", extra_args=["--fake-gpus", "1x24GiB", "--autoload"])
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def clean(gpu_server: ShoalServer) -> Iterator[ShoalServer]:
    yield gpu_server
    for model in gpu_server.http.get("/v1/models").json()["data"]:
        gpu_server.http.delete(f"/v1/models/{model['id']}")


def launch(server: ShoalServer, name: str, uid: str, **extra: object):  # type: ignore[no-untyped-def]
    return server.http.post("/v1/models", json={"model_name": name, "model_uid": uid, **extra})


def devices_of(server: ShoalServer, uid: str) -> set[str]:
    return {r["device"] for r in server.http.get(f"/v1/models/{uid}").json()["replicas"]}


def gpu0(server: ShoalServer) -> dict:
    return next(d for d in server.http.get("/v1/cluster/devices").json() if d["id"] == "gpu:0")


@pytest.mark.parametrize("order", [("chat", "embed"), ("embed", "chat")])
def test_llm_and_embedding_share_the_gpu_in_either_order(clean: ShoalServer, order: tuple[str, str]) -> None:
    names = {"chat": CHAT_MODEL, "embed": EMBED_MODEL}
    for kind in order:
        assert launch(clean, names[kind], kind).status_code == 200
    assert devices_of(clean, "chat") == devices_of(clean, "embed") == {"gpu:0"}
    device = gpu0(clean)
    held = {m["model_uid"]: m for m in device["models"]}
    assert set(held) == {"chat", "embed"}
    estimate = held["chat"]["breakdown"]
    assert estimate["weights"] > 90 * 1024**2 and estimate["kv_cache"] > 0 and estimate["cuda_context"] > 0
    assert device["reserved_bytes"] == held["chat"]["reserved_bytes"] + held["embed"]["reserved_bytes"]
    assert device["free_bytes"] == device["total_bytes"] - device["reserved_bytes"] - device["headroom_bytes"]
    r = clean.http.post("/v1/embeddings", json={"model": "embed", "input": "hi"})
    assert r.status_code == 200


def test_two_llms_share_one_gpu(clean: ShoalServer) -> None:
    for uid in ("llm-a", "llm-b"):
        assert launch(clean, CHAT_MODEL, uid, gpu_memory="9GiB", n_parallel=1, n_ctx=512).status_code == 200
    assert devices_of(clean, "llm-a") == devices_of(clean, "llm-b") == {"gpu:0"}
    for uid in ("llm-a", "llm-b"):
        r = clean.http.post(
            "/v1/chat/completions",
            json={"model": uid, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        assert r.status_code == 200


def test_too_big_answers_507_with_the_numbers(clean: ShoalServer) -> None:
    r = launch(clean, CHAT_MODEL, "huge", gpu_memory="30GiB")
    assert r.status_code == 507, r.text
    error = r.json()["error"]
    assert "30.00 GiB" in error["message"] and "24.00 GiB" in error["message"]
    assert "larger than any device" in error["message"]
    assert error["details"]["needed_bytes"] == 30 * GiB
    assert error["details"]["devices"][0]["device"] == "gpu:0"
    assert clean.http.get("/v1/models/huge").status_code == 404


def test_idle_model_is_evicted_and_autoload_brings_it_back(clean: ShoalServer) -> None:
    assert launch(clean, CHAT_MODEL, "old", gpu_memory="14GiB", keep_alive=0, n_parallel=1).status_code == 200
    [old_pid] = pids_of(clean, "old")
    assert launch(clean, CHAT_MODEL, "new", gpu_memory="14GiB", keep_alive=0, n_parallel=1).status_code == 200
    assert clean.http.get("/v1/models/old").json()["status"] == "evicted"
    assert devices_of(clean, "new") == {"gpu:0"}
    assert [m["model_uid"] for m in gpu0(clean)["models"]] == ["new"]
    # --autoload: a request for the evicted model reloads it (evicting the now idle "new").
    r = clean.http.post(
        "/v1/chat/completions",
        json={"model": "old", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    assert r.status_code == 200, r.text
    assert pids_of(clean, "old") != [old_pid]
    assert clean.http.get("/v1/models/new").json()["status"] == "evicted"


def test_ollama_chat_for_a_catalog_name_loads_it_under_autoload(clean: ShoalServer) -> None:
    import ollama

    assert clean.http.get(f"/v1/models/{CHAT_MODEL}").status_code == 404  # not running: only in the catalog
    client = ollama.Client(host=clean.url)
    answer = client.chat(
        model=f"{CHAT_MODEL}:latest", messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 2}
    )
    assert answer.done and answer.message.role == "assistant" and answer.eval_count
    assert answer.load_duration and answer.load_duration > 0  # it waited for the load
    assert clean.http.get(f"/v1/models/{CHAT_MODEL}").json()["status"] == "ready"


def test_pinned_model_is_never_evicted(clean: ShoalServer) -> None:
    assert launch(clean, CHAT_MODEL, "keep", gpu_memory="14GiB", pinned=True, keep_alive=0).status_code == 200
    r = launch(clean, CHAT_MODEL, "other", gpu_memory="14GiB")
    assert r.status_code == 507
    assert "keep/0 (pinned)" in r.json()["error"]["message"]
    assert clean.http.get("/v1/models/keep").json()["status"] == "ready"


def test_a_queued_launch_waits_for_memory(clean: ShoalServer) -> None:
    assert launch(clean, CHAT_MODEL, "first", gpu_memory="14GiB", keep_alive=-1).status_code == 200
    result: dict[str, int] = {}

    def queued() -> None:
        result["status"] = launch(
            clean, CHAT_MODEL, "second", gpu_memory="14GiB", queue_timeout=60
        ).status_code

    thread = threading.Thread(target=queued)
    thread.start()
    deadline = time.monotonic() + 30
    while clean.http.get("/v1/models/second").status_code != 200:  # visible as loading while queued
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert clean.http.get("/v1/models/second").json()["status"] == "loading"
    assert clean.http.delete("/v1/models/first").status_code == 200
    thread.join(timeout=60)
    assert result["status"] == 200
    assert devices_of(clean, "second") == {"gpu:0"}


def test_cpu_models_get_their_own_cores(clean: ShoalServer) -> None:
    for uid in ("cpu-a", "cpu-b"):
        assert launch(clean, CHAT_MODEL, uid, n_gpu=None, n_parallel=1, n_ctx=512).status_code == 200
    described = [clean.http.get(f"/v1/models/{uid}").json()["replicas"][0] for uid in ("cpu-a", "cpu-b")]
    assert all(r["device"] == "cpu" for r in described)
    allowed = [
        Path(f"/proc/{r['pid']}/status").read_text().split("Cpus_allowed_list:")[1].split()[0]
        for r in described
    ]
    assert [r["cores"] for r in described] in ([[0], [1]], [[1], [0]])
    assert sorted(allowed) == ["0", "1"]


def test_estimate_route_and_cli(clean: ShoalServer) -> None:
    r = clean.http.post(
        "/v1/models/estimate", json={"model_name": CHAT_MODEL, "context_length": 2048, "parallel": 2}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["estimate"]["context_length"] == 2048 and body["estimate"]["parallel"] == 2
    assert body["placement"] == {"fits": True, "devices": ["gpu:0"], "evict": [], "cores": [0]}
    assert clean.http.get(f"/v1/models/{CHAT_MODEL}").status_code == 404  # nothing was launched
    import os
    import subprocess
    import sys

    env = {**os.environ, "SHOAL_ENDPOINT": clean.url, "COLUMNS": "200"}
    out = subprocess.run(
        [sys.executable, "-m", "shoal.cli", "estimate", CHAT_MODEL, "-c", "2048"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "kv_cache" in out.stdout and "fits" in out.stdout and "gpu:0" in out.stdout
    assert launch(clean, CHAT_MODEL, "shown", n_parallel=1).status_code == 200
    out = subprocess.run(
        [sys.executable, "-m", "shoal.cli", "gpus"], env=env, capture_output=True, text=True, timeout=60
    )
    assert (
        out.returncode == 0 and "gpu:0" in out.stdout and "shown/0" in out.stdout and "(fake)" in out.stdout
    )


def test_worker_ip_on_one_machine(clean: ShoalServer) -> None:
    """As Xinference's local worker: worker_ip may name this machine; any other node is refused."""
    for worker_ip in ("127.0.0.1", "local", socket.gethostname()):
        body = {"model_name": CHAT_MODEL, "worker_ip": worker_ip}
        assert clean.http.post("/v1/models/estimate", json=body).json()["placement"]["fits"], worker_ip
    r = clean.http.post("/v1/models", json={"model_name": CHAT_MODEL, "worker_ip": "10.9.9.9"})
    assert r.status_code == 507, r.text
    assert "no node matches worker_ip 10.9.9.9" in r.json()["error"]["message"]
    assert clean.http.get("/v1/models").json()["data"] == []


def test_two_gpus_three_replicas_spread_by_free_memory(tmp_path: Path) -> None:
    srv = ShoalServer(tmp_path / "data", tmp_path / "server.log", extra_args=["--fake-gpus", "2x24GiB"])
    srv.start()
    try:
        r = srv.http.post(
            "/v1/models",
            json={
                "model_name": CHAT_MODEL,
                "replica": 3,
                "gpu_memory": "10GiB",
                "n_parallel": 1,
                "n_ctx": 256,
            },
        )
        assert r.status_code == 200, r.text
        devices = {d["id"]: d for d in srv.http.get("/v1/cluster/devices").json()}
        counts = {gid: len(devices[gid]["models"]) for gid in ("gpu:0", "gpu:1")}
        assert sorted(counts.values()) == [1, 2]  # replicas go where memory is, one per GPU first
        assert all(devices[g]["free_bytes"] >= 0 for g in counts)
        r = srv.http.post(
            "/v1/models", json={"model_name": CHAT_MODEL, "model_uid": "x", "gpu_memory": "10GiB"}
        )
        assert r.status_code == 200 and devices_of(srv, "x") == {min(counts, key=lambda g: counts[g])}
    finally:
        srv.stop()
