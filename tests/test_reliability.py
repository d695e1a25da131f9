"""Never lose a model, never hang a request: restart, graceful shutdown, auth, limits, metrics."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import CHAT_MODEL, EMBED_MODEL, ShoalServer, alive, pids_of, wait_until_ready

MSG = [{"role": "user", "content": "hi"}]


def test_restart_brings_the_same_models_back(tmp_path: Path) -> None:
    srv = ShoalServer(tmp_path / "data", tmp_path / "server.log")
    srv.start()
    for body in (
        {"model_name": CHAT_MODEL, "model_uid": "kept-chat", "n_parallel": 1, "n_ctx": 512},
        {"model_name": EMBED_MODEL, "model_uid": "kept-embed"},
    ):
        assert srv.http.post("/v1/models", json=body).status_code == 200
    old_pids = pids_of(srv, "kept-chat") + pids_of(srv, "kept-embed")
    assert srv.stop() == 0  # graceful: exit 0
    assert not any(alive(p) for p in old_pids), "a runner outlived the server"

    again = ShoalServer(tmp_path / "data", tmp_path / "server2.log")
    again.start()
    try:
        for uid in ("kept-chat", "kept-embed"):
            described = wait_until_ready(again, uid)
            assert described["replica"] == 1
        assert again.http.get("/v1/models/kept-chat").json()["model_name"] == CHAT_MODEL
        r = again.http.post(
            "/v1/chat/completions", json={"model": "kept-chat", "messages": MSG, "max_tokens": 2}
        )
        assert r.status_code == 200
        assert again.http.get("/ready").status_code == 200
        # A terminated model stays terminated across the next restart.
        assert again.http.delete("/v1/models/kept-embed").status_code == 200
    finally:
        assert again.stop() == 0
    third = ShoalServer(tmp_path / "data", tmp_path / "server3.log")
    third.start()
    try:
        wait_until_ready(third, "kept-chat")
        assert third.http.get("/v1/models/kept-embed").status_code == 404
    finally:
        third.stop()


def test_ready_waits_for_every_model(server: ShoalServer) -> None:
    r = server.http.post(
        "/v1/models",
        params={"wait_ready": "false"},
        json={"model_name": CHAT_MODEL, "model_uid": "slow-start", "n_parallel": 1},
    )
    assert r.status_code == 200
    not_ready = server.http.get("/ready")
    assert not_ready.status_code == 503 and "slow-start" in not_ready.json()["models"]
    wait_until_ready(server, "slow-start")
    server.http.delete("/v1/models/slow-start")


def test_queue_overflow_answers_503_with_retry_after(server: ShoalServer) -> None:
    body = {
        "model_name": CHAT_MODEL,
        "model_uid": "limited",
        "request_limits": 1,
        "max_queue": 1,
        "n_parallel": 1,
        "n_ctx": 1024,
    }
    assert server.http.post("/v1/models", json=body).status_code == 200
    long = {"model": "limited", "messages": MSG, "max_tokens": 400, "ignore_eos": True, "stream": True}
    try:
        with server.http.stream("POST", "/v1/chat/completions", json=long) as first:
            lines = first.iter_lines()  # kept: a dropped iterator closes the stream (httpx)
            next(lines)  # it holds the only slot now
            queued: dict[str, int] = {}
            thread = threading.Thread(
                target=lambda: queued.update(
                    status=httpx.post(  # its own connection: one httpx.Client is not shared across threads
                        server.url + "/v1/chat/completions",
                        json={"model": "limited", "messages": MSG, "max_tokens": 2},
                        timeout=120,
                    ).status_code
                )
            )
            thread.start()
            deadline = time.monotonic() + 30
            while server.http.get("/v1/models/limited").json()["waiting"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            overflow = server.http.post("/v1/chat/completions", json={"model": "limited", "messages": MSG})
            assert overflow.status_code == 503
            assert overflow.headers["retry-after"] == "1"
            assert "max_queue" in overflow.json()["error"]["message"]
        thread.join(timeout=60)
        assert queued["status"] == 200  # the queued one ran once the slot was free
    finally:
        server.http.delete("/v1/models/limited")


def test_request_id_and_metrics(chat_server: ShoalServer) -> None:
    r = chat_server.http.post(
        "/v1/chat/completions",
        json={"model": CHAT_MODEL, "messages": MSG, "max_tokens": 3},
        headers={"x-request-id": "trace-me-42"},
    )
    assert r.headers["x-request-id"] == "trace-me-42"
    assert len(chat_server.http.get("/health").headers["x-request-id"]) == 32
    with chat_server.http.stream(
        "POST",
        "/v1/chat/completions",
        json={"model": CHAT_MODEL, "messages": MSG, "max_tokens": 3, "stream": True},
    ) as s:
        list(s.iter_lines())
    chat_server.http.post("/v1/chat/completions", json={"model": "ghost", "messages": MSG})
    text = chat_server.http.get("/metrics").text
    assert f'shoal_requests_total{{model="{CHAT_MODEL}",route="/v1/chat/completions",status="200"}}' in text
    # an unknown model is no label value (a client could send any number of names)
    assert 'shoal_request_errors_total{model="",route="/v1/chat/completions",status="404"}' in text
    assert 'model="ghost"' not in text
    assert f'shoal_tokens_generated_total{{model="{CHAT_MODEL}"}}' in text
    assert f'shoal_time_to_first_token_seconds_count{{model="{CHAT_MODEL}"}}' in text
    assert 'shoal_device_memory_bytes{device="cpu",part="total"}' in text
    assert (
        f'shoal_replica_memory_bytes{{device="cpu",kind="reserved",model="{CHAT_MODEL}",replica="0"}}' in text
    )
    assert "shoal_launches_total" in text and "shoal_queue_depth" in text


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("auth")
    env_key = "admin-secret-123"
    made = subprocess.run(
        [
            sys.executable,
            "-m",
            "shoal.cli",
            "keys",
            "create",
            "--scope",
            "inference",
            "--data-dir",
            str(root / "data"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    inference_key = made.stdout.strip().split()[-1]
    srv = ShoalServer(
        root / "data", root / "server.log", extra_args=["--api-key", env_key], env={"SHOAL_MAX_BODY": "64KiB"}
    )
    srv.start()
    yield srv, env_key, inference_key
    srv.stop()


def test_auth_scopes(secured) -> None:  # type: ignore[no-untyped-def]
    srv, admin, inference = secured
    url = srv.url

    def call(method: str, path: str, key: str | None, **kw: object) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.request(method, url + path, headers=headers, timeout=120, **kw)  # type: ignore[arg-type]

    assert call("GET", "/health", None).status_code == 200
    assert call("GET", "/v1/cluster/auth", None).json() == {"auth": True}
    missing = call("GET", "/v1/models", None)
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    assert call("GET", "/v1/models", "wrong").status_code == 401
    assert call("GET", "/v1/models", inference).status_code == 200
    launch = {"model_name": CHAT_MODEL, "model_uid": "guarded", "n_parallel": 1, "n_ctx": 512}
    denied = call("POST", "/v1/models", inference, json=launch)
    assert denied.status_code == 403 and denied.json()["error"]["type"] == "permission_error"
    assert call("POST", "/v1/models", admin, json=launch).status_code == 200
    chat = {"model": "guarded", "messages": MSG, "max_tokens": 2}
    assert call("POST", "/v1/chat/completions", None, json=chat).status_code == 401
    assert call("POST", "/v1/chat/completions", inference, json=chat).status_code == 200
    assert call("DELETE", "/v1/models/guarded", inference).status_code == 403
    assert call("DELETE", "/v1/models/guarded", admin).status_code == 200
    too_big = call("POST", "/v1/embeddings", admin, json={"model": "x", "input": "a" * 100_000})
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "body_too_large"

    from xinference_client import RESTfulClient

    assert RESTfulClient(url, api_key=admin).list_models() == {}


def test_non_loopback_needs_auth(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "shoal.cli",
            "serve",
            "--host",
            "0.0.0.0",
            "--port",
            "0",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "refusing" in result.stdout


def test_a_launch_that_could_not_be_placed_leaves_its_uid_free(server: ShoalServer) -> None:
    huge = {"model_name": EMBED_MODEL, "model_uid": "too-big", "gpu_memory": "100000GiB"}
    r = server.http.post("/v1/models", params={"wait_ready": "false"}, json=huge)
    assert r.status_code == 200
    deadline = time.monotonic() + 30
    while (described := server.http.get("/v1/models/too-big").json())["status"] != "failed":
        assert time.monotonic() < deadline, described
        time.sleep(0.05)
    assert "cannot place" in described["replicas"][0]["last_error"]
    ps = subprocess.run(
        [sys.executable, "-m", "shoal.cli", "ps", "--endpoint", server.url], capture_output=True, text=True
    )
    assert ps.returncode == 0 and "too-big" in ps.stdout and "failed" in ps.stdout, ps.stderr
    again = server.http.post("/v1/models", json={"model_name": EMBED_MODEL, "model_uid": "too-big"})
    assert again.status_code == 200, again.text  # not 409: the failed entry gave its uid up
    assert server.http.get("/v1/models/too-big").json()["status"] == "ready"
    server.http.delete("/v1/models/too-big")


def test_a_stream_cut_by_terminate_says_so(server: ShoalServer) -> None:
    body = {"model_name": CHAT_MODEL, "model_uid": "going", "n_parallel": 1, "n_ctx": 1024}
    assert server.http.post("/v1/models", json=body).status_code == 200
    long = {"model": "going", "messages": MSG, "max_tokens": 500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=long, timeout=60) as stream:
        lines = stream.iter_lines()
        next(lines)
        assert server.http.delete("/v1/models/going").status_code == 200
        rest = list(lines)
    errors = [line for line in rest if '"error"' in line]
    assert errors and "terminated" in errors[0] and "restarted" not in errors[0], rest[-3:]
