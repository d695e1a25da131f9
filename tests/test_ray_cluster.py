"""Shoal on a Ray cluster: a local `ray.cluster_utils.Cluster` (head + one worker node, each with its
own fake GPU through its environment) and a real `shoal serve --ray-address` process on it.

The tests run in order and share the cluster: placement on both nodes, pinning to a node with
worker_ip, losing that node (its models are placed again on the head), a new node taking a model.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import CHAT_MODEL, ShoalServer, wait_until_ready

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

FAST_HEALTH_CHECK = {
    "health_check_period_ms": 200,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 3,
    "health_check_initial_delay_ms": 0,
}
SMALL = {"n_parallel": 1, "n_ctx": 512, "n_threads": 1}


def node_env(tmp: str) -> dict[str, str]:
    """Each node's own fake GPU; its agent's files under the test's directory."""
    return {"SHOAL_FAKE_GPUS": "1x24GiB", "TMPDIR": tmp}


class RayShoal:
    def __init__(self, cluster: Cluster, server: ShoalServer) -> None:
        self.cluster, self.server = cluster, server
        self.head = f"node-{cluster.head_node.node_id[:8]}"
        self.worker = cluster.list_all_nodes()[1]
        self.second = f"node-{self.worker.node_id[:8]}"

    def launch(self, uid: str, gpu_memory: str, **extra: Any) -> dict:
        body = {"model_name": CHAT_MODEL, "model_uid": uid, "gpu_memory": gpu_memory, **SMALL, **extra}
        r = self.server.http.post("/v1/models", json=body)
        assert r.status_code == 200, r.text
        return wait_until_ready(self.server, uid)

    def nodes_of(self, uid: str) -> list[str]:
        described = self.server.http.get(f"/v1/models/{uid}").json()
        return [r["node"] for r in described["replicas"]]

    def chat(self, uid: str) -> Any:
        return self.server.http.post(
            "/v1/chat/completions",
            json={"model": uid, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        )


@pytest.fixture(scope="module")
def ray_shoal() -> Iterator[RayShoal]:
    tmp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # Unix socket paths: RAY_TMPDIR must be short
    old_tmp = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmp
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "include_dashboard": False,
            "_system_config": FAST_HEALTH_CHECK,
            "env_vars": node_env(tmp),
        },
    )
    cluster.add_node(num_cpus=1, env_vars=node_env(tmp))
    data = Path(tmp) / "shoal"
    data.mkdir()
    server = ShoalServer(data / "data", data / "server.log", ["--ray-address", cluster.address])
    try:
        server.start()
        yield RayShoal(cluster, server)
    finally:
        if server.proc is not None:
            server.stop()
        cluster.shutdown()
        if old_tmp is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = old_tmp
        shutil.rmtree(tmp, ignore_errors=True)


def test_workers_and_devices_show_both_nodes(ray_shoal: RayShoal) -> None:
    workers = ray_shoal.server.http.get("/v1/workers").json()
    assert {w["node"] for w in workers} == {ray_shoal.head, ray_shoal.second}
    devices = ray_shoal.server.http.get("/v1/cluster/devices").json()
    gpus = {d["id"] for d in devices if d["kind"] == "gpu"}
    assert gpus == {f"{ray_shoal.head}/gpu:0", f"{ray_shoal.second}/gpu:0"}
    assert all(d["node"] in (ray_shoal.head, ray_shoal.second) for d in devices)


def test_replicas_spread_over_nodes_and_answer(ray_shoal: RayShoal) -> None:
    ray_shoal.launch("spread", "6GiB", replica=2)
    assert sorted(ray_shoal.nodes_of("spread")) == sorted([ray_shoal.head, ray_shoal.second])
    for _ in range(2):  # least busy, round robin: both replicas answer
        r = ray_shoal.chat("spread")
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] is not None


def test_a_killed_runner_on_a_node_restarts_there(ray_shoal: RayShoal) -> None:
    described = ray_shoal.server.http.get("/v1/models/spread").json()
    victim = next(r for r in described["replicas"] if r["node"] == ray_shoal.second)
    os.kill(victim["pid"], signal.SIGKILL)  # every node of this cluster is on this host
    deadline = time.monotonic() + 30
    while True:
        replica = ray_shoal.server.http.get("/v1/models/spread").json()["replicas"][victim["index"]]
        if replica["state"] == "ready" and replica["pid"] != victim["pid"]:
            break
        assert time.monotonic() < deadline, replica
        time.sleep(0.1)
    assert replica["node"] == ray_shoal.second and replica["restarts"] == 1
    assert ray_shoal.chat("spread").status_code == 200


def test_worker_ip_pins_to_the_second_node(ray_shoal: RayShoal) -> None:
    ray_shoal.launch("pinned", "6GiB", worker_ip=ray_shoal.second)
    assert ray_shoal.nodes_of("pinned") == [ray_shoal.second]
    assert ray_shoal.chat("pinned").status_code == 200
    # binpack: the fuller GPU (the second node's) takes the next model too
    ray_shoal.launch("mover", "6GiB")
    assert ray_shoal.nodes_of("mover") == [ray_shoal.second]
    r = ray_shoal.server.http.post(
        "/v1/models",
        json={"model_name": CHAT_MODEL, "model_uid": "nowhere", "worker_ip": "10.9.9.9", **SMALL},
    )
    assert r.status_code == 507, r.text
    # a replica's GPUs are on one node: two GPUs on two nodes are not two GPUs for one replica
    body = {"model_name": CHAT_MODEL, "model_uid": "split", "n_gpu": 2, "gpu_memory": "1GiB", **SMALL}
    r = ray_shoal.server.http.post("/v1/models", json=body)
    assert r.status_code == 507, r.text
    assert "no single node has 2 devices" in r.text


def test_node_loss_replaces_its_models_on_the_head(ray_shoal: RayShoal) -> None:
    server = ray_shoal.server
    started = time.monotonic()
    ray_shoal.cluster.remove_node(ray_shoal.worker)
    statuses = set()
    while time.monotonic() - started < 60:
        r = ray_shoal.chat("mover")
        statuses.add(r.status_code)
        if r.status_code == 200 and ray_shoal.nodes_of("mover") == [ray_shoal.head]:
            break
        assert r.status_code == 503, r.text
        assert "retry-after" in r.headers
        time.sleep(0.2)
    else:
        raise AssertionError(f"mover not back on the head: {server.http.get('/v1/models/mover').json()}")
    assert 503 in statuses  # meanwhile: 503 + Retry-After, never a hang or a 500
    assert ray_shoal.nodes_of("spread") == [ray_shoal.head, ray_shoal.head]
    assert ray_shoal.chat("spread").status_code == 200
    # pinned to the node that left: nowhere else to go, and it says why
    pinned = server.http.get("/v1/models/pinned").json()
    assert pinned["status"] == "failed", pinned
    assert ray_shoal.second in pinned["replicas"][0]["last_error"]
    workers = {w["node"]: w["alive"] for w in server.http.get("/v1/workers").json()}
    assert workers == {ray_shoal.head: True, ray_shoal.second: False}


def test_a_new_node_takes_new_models(ray_shoal: RayShoal) -> None:
    server = ray_shoal.server
    node = ray_shoal.cluster.add_node(num_cpus=1, env_vars=node_env(os.environ["RAY_TMPDIR"]))
    name = f"node-{node.node_id[:8]}"
    deadline = time.monotonic() + 30
    while not any(w["node"] == name and w["alive"] for w in server.http.get("/v1/workers").json()):
        assert time.monotonic() < deadline, server.http.get("/v1/workers").json()
        time.sleep(0.2)
    # the head holds 3 x 6 GiB of its 22.8 usable: 10 GiB only fits on the new node
    ray_shoal.launch("newcomer", "10GiB")
    assert ray_shoal.nodes_of("newcomer") == [name]
    assert ray_shoal.chat("newcomer").status_code == 200

    # A crash of that node (its raylet SIGKILLed, as when the machine dies) once the head has room.
    assert server.http.delete("/v1/models/spread").status_code == 200
    node.kill_raylet()
    deadline = time.monotonic() + 30
    while not (
        ray_shoal.chat("newcomer").status_code == 200 and ray_shoal.nodes_of("newcomer") == [ray_shoal.head]
    ):
        assert time.monotonic() < deadline, server.http.get("/v1/models/newcomer").json()
        time.sleep(0.2)


def test_eviction_works_on_a_cluster_node(ray_shoal: RayShoal) -> None:
    # The head now holds mover (6 GiB) and newcomer (10 GiB) of its 22.8 usable.
    ray_shoal.launch("idle", "4GiB", keep_alive=0)
    assert ray_shoal.nodes_of("idle") == [ray_shoal.head]
    ray_shoal.launch("needs-room", "6GiB")
    assert ray_shoal.nodes_of("needs-room") == [ray_shoal.head]
    assert ray_shoal.server.http.get("/v1/models/idle").json()["status"] == "evicted"
    assert ray_shoal.chat("needs-room").status_code == 200
