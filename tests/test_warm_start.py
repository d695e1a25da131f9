"""Warm start: launches served by warm spare runners (hosts/spares.py, runners/spare.py), and a
runner of every engine kind that reports ready only after one real inference (Engine.warm_up)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import CHAT_MODEL, EMBED_MODEL, ShoalServer, alive, pids_of, wait_until_ready


def children(pid: int) -> dict[int, str]:
    """The live child processes of `pid`, with their command lines."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and alive(int(entry.name)):
            found[int(entry.name)] = cmdline
    return found


def replica_pids(server: ShoalServer) -> set[int]:
    models = server.http.get("/v1/models").json()["data"]
    return {pid for m in models for pid in pids_of(server, m["id"]) if pid}


def spares(server: ShoalServer) -> dict[str, int]:
    """Waiting spares by family: children running shoal.runners.spare that are no model's runner."""
    assert server.proc is not None
    runners = replica_pids(server)
    return {
        cmd.split("shoal.runners.spare", 1)[1].split()[0]: pid
        for pid, cmd in children(server.proc.pid).items()
        if "shoal.runners.spare" in cmd and pid not in runners
    }


def wait_for_spare(server: ShoalServer, family: str, not_pid: int | None = None, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = spares(server).get(family)
        if pid is not None and pid != not_pid:
            return pid
        time.sleep(0.1)
    raise AssertionError(f"no {family} spare (other than {not_pid}) within {timeout} s: {spares(server)}")


def threads_cpus(pid: int) -> set[str]:
    """The Cpus_allowed_list of every thread of the process."""
    lists = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            lists.add((task / "status").read_text().split("Cpus_allowed_list:")[1].split()[0])
        except (OSError, IndexError):
            continue
    return lists


@pytest.fixture(scope="module")
def spare_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShoalServer]:
    root = tmp_path_factory.mktemp("spares")
    # CUDA_VISIBLE_DEVICES=7 in the gateway's (and so the spares') environment: a CPU launch must
    # see "" after the handoff, as a cold runner would.
    srv = ShoalServer(
        root / "data", root / "server.log", env={"SHOAL_WARM_SPARES": "all", "CUDA_VISIBLE_DEVICES": "7"}
    )
    srv.start()
    yield srv
    srv.stop()


def test_a_launch_is_served_by_a_spare_with_the_launch_s_cores_threads_and_env(
    spare_server: ShoalServer,
) -> None:
    server = spare_server
    spare = wait_for_spare(server, "torch")
    uid = "spare-minilm"
    r = server.http.post("/v1/models", json={"model_name": EMBED_MODEL, "model_uid": uid, "n_threads": 1})
    assert r.status_code == 200, r.text
    try:
        [replica] = server.http.get(f"/v1/models/{uid}").json()["replicas"]
        assert replica["pid"] == spare, (replica, spare)
        metrics = server.http.get(f"/v1/models/{uid}/engine_metrics").json()
        assert metrics["runner_prewarmed"] == 1 and metrics["runner_warm_ups"] == 1, metrics
        assert metrics["runner_torch_threads"] == 1 and metrics["runner_cpus"] == 1, metrics
        cores = replica["cores"]
        assert len(cores) == 1
        usable = sorted(os.sched_getaffinity(0))
        assert threads_cpus(spare) == {str(usable[cores[0] % len(usable)])}
        answer = server.http.post("/v1/embeddings", json={"model": uid, "input": "warm"})
        assert answer.status_code == 200 and len(answer.json()["data"][0]["embedding"]) == 384
        # the runner's own log has its output; a spare is no model
        assert (server.data_dir / "logs" / f"{uid}-0.log").exists()
        assert [m["id"] for m in server.http.get("/v1/models").json()["data"]] == [uid]
        # a new spare takes the old one's place once the launch is over
        assert wait_for_spare(server, "torch", not_pid=spare) != spare
    finally:
        server.http.delete(f"/v1/models/{uid}")


def test_the_runner_sees_the_launch_s_cuda_visible_devices(spare_server: ShoalServer) -> None:
    server = spare_server
    spare = wait_for_spare(server, "llama.cpp")
    uid = "spare-chat"
    r = server.http.post("/v1/models", json={"model_name": CHAT_MODEL, "model_uid": uid, "n_gpu": None})
    assert r.status_code == 200, r.text
    try:
        assert pids_of(server, uid) == [spare]
        assert "CUDA_VISIBLE_DEVICES=7" in Path(f"/proc/{spare}/environ").read_text()  # as it started
        metrics = server.http.get(f"/v1/models/{uid}/engine_metrics").json()
        assert metrics["runner_prewarmed"] == 1 and metrics["runner_warm_ups"] == 1, metrics
        # what the runner's process sees now (os.environ, getenv), through its own /health
        transport = httpx.HTTPTransport(uds=socket_of(server, uid))
        with httpx.Client(transport=transport, base_url="http://runner") as runner:
            health = runner.get("/health").json()
        assert health["prewarmed"] is True and health["cuda_visible_devices"] == "", health
    finally:
        server.http.delete(f"/v1/models/{uid}")


def socket_of(server: ShoalServer, uid: str) -> str:
    """The Unix socket the model's runner listens on (in /proc/net/unix, by the inode of its fd)."""
    [pid] = pids_of(server, uid)
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            inodes.add(os.readlink(fd))
        except OSError:
            continue
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        parts = line.split()
        if len(parts) == 8 and parts[7].endswith(".sock") and f"socket:[{parts[6]}]" in inodes:
            return parts[7]
    raise AssertionError(f"no listening socket found for {uid}")


def test_a_launch_with_its_own_envs_starts_cold_in_the_spare(spare_server: ShoalServer) -> None:
    server = spare_server
    spare = wait_for_spare(server, "llama.cpp")
    uid = "cold-chat"
    launch = {"model_name": CHAT_MODEL, "model_uid": uid, "n_gpu": None, "envs": {"SHOAL_TEST_MARK": "on"}}
    r = server.http.post("/v1/models", json=launch)
    assert r.status_code == 200, r.text
    try:
        assert pids_of(server, uid) == [spare]  # the spare exec'd a cold runner in its own process
        assert "SHOAL_TEST_MARK=on" in Path(f"/proc/{spare}/environ").read_text()
        metrics = server.http.get(f"/v1/models/{uid}/engine_metrics").json()
        assert metrics["runner_prewarmed"] == 0 and metrics["runner_warm_ups"] == 1, metrics
        log = (server.data_dir / "logs" / f"{uid}-0.log").read_text()
        assert "starting cold: the launch sets its own environment (SHOAL_TEST_MARK)" in log
    finally:
        server.http.delete(f"/v1/models/{uid}")


def test_a_killed_spare_is_replaced(spare_server: ShoalServer) -> None:
    server = spare_server
    spare = wait_for_spare(server, "onnx")
    os.kill(spare, signal.SIGKILL)
    assert wait_for_spare(server, "onnx", not_pid=spare) != spare
    assert f"warm spare onnx (pid {spare}) exited with code -9" in server.log_path.read_text()


def test_a_spare_born_runner_that_crashes_is_restarted(spare_server: ShoalServer) -> None:
    server = spare_server
    spare = wait_for_spare(server, "torch")
    uid = "crash-minilm"
    r = server.http.post("/v1/models", json={"model_name": EMBED_MODEL, "model_uid": uid})
    assert r.status_code == 200, r.text
    try:
        assert pids_of(server, uid) == [spare]
        os.kill(spare, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while (described := wait_until_ready(server, uid))["replicas"][0]["pid"] == spare:
            assert time.monotonic() < deadline, "the runner was not restarted"
            time.sleep(0.1)
        assert described["replicas"][0]["restarts"] == 1
        answer = server.http.post("/v1/embeddings", json={"model": uid, "input": "back again"})
        assert answer.status_code == 200, answer.text
    finally:
        server.http.delete(f"/v1/models/{uid}")


def test_shutdown_leaves_no_spare_behind(tmp_path: Path) -> None:
    for how in (signal.SIGINT, signal.SIGKILL):
        srv = ShoalServer(tmp_path / how.name / "data", tmp_path / f"{how.name}.log",
                          env={"SHOAL_WARM_SPARES": "llama.cpp,onnx"})  # fmt: skip
        srv.start()
        try:
            left = {wait_for_spare(srv, "llama.cpp"), wait_for_spare(srv, "onnx")}
            assert "torch" not in spares(srv)
        finally:
            assert srv.proc is not None
            srv.proc.send_signal(how)
            srv.proc.wait(timeout=30)
        deadline = time.monotonic() + 10  # SIGKILL: PR_SET_PDEATHSIG ends them as the kernel reaps
        while any(alive(pid) for pid in left) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in left if alive(pid)], f"spares left after {how.name}"


def test_warm_spares_setting() -> None:
    bad = subprocess.run(
        [sys.executable, "-m", "shoal.cli", "serve", "--port", "1", "--warm-spares", "torch,jax"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "unknown warm spare families ['jax']" in bad.stderr, bad.stderr


def test_no_spares_when_turned_off(tmp_path: Path) -> None:
    srv = ShoalServer(tmp_path / "data", tmp_path / "server.log", env={"SHOAL_WARM_SPARES": "none"})
    srv.start()
    try:
        assert srv.proc is not None
        assert not children(srv.proc.pid)
    finally:
        srv.stop()


# --- every engine kind warms up before it reports ready ---------------------------------------

WARM_UP_MODELS = [
    (CHAT_MODEL, {}),  # llama.cpp chat
    ("gemma-3-270m", {}),  # llama.cpp, a base model without a chat template: one token of completion
    ("smollm2-135m-rerank", {}),  # llm_rerank
    ("minilm-rerank", {}),  # embedding_rerank
    ("piper-en-us-joe", {}),
    ("hibari", {}),
    ("whisper-tiny.en", {}),
    ("rapidocr", {}),
]


@pytest.mark.parametrize(("name", "options"), WARM_UP_MODELS, ids=[m[0] for m in WARM_UP_MODELS])
def test_every_engine_kind_runs_one_real_inference_before_ready(
    server: ShoalServer, name: str, options: dict[str, object]
) -> None:
    uid = f"warm-{name}"
    r = server.http.post("/v1/models", json={"model_name": name, "model_uid": uid, "n_gpu": None, **options})
    assert r.status_code == 200, r.text
    try:
        metrics = server.http.get(f"/v1/models/{uid}/engine_metrics").json()
        assert metrics.get("runner_warm_ups") == 1, metrics
        assert "runner_warm_up_failed" not in metrics and "runner_warm_up_skipped" not in metrics, metrics
    finally:
        server.http.delete(f"/v1/models/{uid}")
