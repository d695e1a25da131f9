"""Runners that stop answering: a SIGSTOPped runner is found by its liveness pings, killed and
restarted; requests in flight on it, and new ones, are answered within the deadlines, not 600 s."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx

from conftest import CHAT_MODEL, ShoalServer, alive, pids_of, wait_until_ready

MSG = [{"role": "user", "content": "Tell me a long story."}]


def test_a_stopped_runner_is_killed_restarted_and_its_requests_answered(tmp_path: Path) -> None:
    srv = ShoalServer(
        tmp_path / "data",
        tmp_path / "server.log",
        env={
            "SHOAL_LIVENESS_INTERVAL": "0.5",
            "SHOAL_LIVENESS_TIMEOUT": "5",
            "SHOAL_FIRST_BYTE_TIMEOUT": "2",
        },
    )
    srv.start()
    try:
        body = {"model_name": CHAT_MODEL, "model_uid": "sleepy", "n_parallel": 2, "n_ctx": 1024}
        assert srv.http.post("/v1/models", json=body).status_code == 200
        [pid] = pids_of(srv, "sleepy")
        streamed: dict[str, object] = {}
        started = threading.Event()

        def stream() -> None:
            long = {"model": "sleepy", "messages": MSG, "max_tokens": 500, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", srv.url + "/v1/chat/completions", json=long, timeout=60) as r:
                lines = []
                for line in r.iter_lines():
                    lines.append(line)
                    started.set()
                replica = r.headers["x-shoal-replica"]
                streamed.update(status=r.status_code, lines=lines, ended=time.monotonic(), replica=replica)

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(60)
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        late = srv.http.post(
            "/v1/chat/completions", json={"model": "sleepy", "messages": MSG, "max_tokens": 2}, timeout=60
        )
        # no first byte within SHOAL_FIRST_BYTE_TIMEOUT (or the runner is already killed): 504 or 503
        assert late.status_code in (503, 504), late.text
        assert late.json()["error"]["message"]
        assert late.headers["x-shoal-replica"] == "0"  # which replica failed it
        reader.join(60)
        assert not reader.is_alive(), "the stream in flight on the stopped runner hung"
        errors = [line for line in streamed["lines"] if '"error"' in line]  # type: ignore[union-attr]
        assert errors, "the stream ended without saying why"
        assert streamed["replica"] == "0"
        assert streamed["ended"] - stopped_at < 30  # type: ignore[operator]  # bounded, not 600 s
        deadline = time.monotonic() + 120
        while pids_of(srv, "sleepy") == [pid]:  # until the liveness pings find it hung
            assert time.monotonic() < deadline, "the stopped runner was never noticed"
            time.sleep(0.1)
        detected = time.monotonic() - stopped_at
        assert detected < 30, detected  # 5 s of unanswered pings, plus a tick and the kill
        [replica] = wait_until_ready(srv, "sleepy", timeout=120)["replicas"]
        assert replica["pid"] != pid and replica["restarts"] == 1
        assert "did not answer /health" in replica["last_error"]
        assert not alive(pid), "the hung runner was left behind"
        ok = srv.http.post("/v1/chat/completions", json={"model": "sleepy", "messages": MSG, "max_tokens": 2})
        assert ok.status_code == 200
        metrics = srv.http.get("/metrics").text
        assert 'shoal_runners_hung_total{model="sleepy"} 1.0' in metrics
        assert 'shoal_supervisor_seconds_since_success{step="memory_sampling"}' in metrics
        # /ready and the devices say when supervision and memory sampling last succeeded
        ready = srv.http.get("/ready")
        assert ready.status_code == 200, ready.text
        health = ready.json()["supervisor"]
        assert not health["supervision"]["stale"] and not health["memory_sampling"]["stale"]
        assert (
            health["supervision"]["seconds_ago"] is not None and health["memory_sampling"]["failing"] is None
        )
        [cpu] = [d for d in srv.http.get("/v1/cluster/devices").json() if d["kind"] == "cpu"]
        assert cpu["supervisor"]["memory_sampling"]["seconds_ago"] is not None
        assert cpu["models"][0]["measured_bytes"] > 0 and cpu["models"][0]["peak_bytes"] > 0
    finally:
        srv.stop()
        log = (tmp_path / "server.log").read_text()
        assert "Traceback" not in log, log[-3000:]
