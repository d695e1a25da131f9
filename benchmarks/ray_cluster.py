"""What Ray mode costs, side by side in one run.

1. Requests: the same embedding model (all-MiniLM-L6-v2, CPU, same threads) launched through a Shoal
   gateway on one machine (runner on a Unix socket) and through a gateway joined to a one-node Ray
   cluster (runner spawned by the node agent, reached over TCP). One-sentence embedding latency.
2. Model files: a file of --copy-mib random bytes copied to a second Ray node the way Shoal copies a
   local-path model (32 MiB chunks through Ray's object store, written by the node's agent), against
   a plain local file copy of the same file on the same disk.

3. Nodes with their own network stacks (tests/netns.py; needs root and `ip`): a head and a worker
   in network namespaces on a bridge, `ray start` in each on its own 10.x address, the gateway in the
   head's. The same embedding model on the head and on the worker (every request to the worker's
   runner crosses the veth link); a --copy-mib file copied to the worker, whose mount namespace
   hides the gateway's folder; then a partition (the worker's veth down) while a chat model serves
   there: time until the gateway calls the node unreachable, until the model answers again from the
   head, what requests got meanwhile; then the link back up: time until the runner left on the
   worker is stopped and the worker takes models again. Then the same cut while a replica is still
   starting on the worker (its runner made 5 s slow to start there, not on the head): time until
   it is ready on the head. Ray's health check at its defaults.

The phases run one after another, never at once. Prints one JSON document to stdout.

    .venv/bin/python benchmarks/ray_cluster.py [--runs 200] [--copy-mib 512] [--phases local,netns]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from common import free_port, machine_info  # benchmarks/common.py
from overhead import (
    CHAT_MODEL,
    EMBED_MODEL,
    SINGLE_SENTENCE,
    embed_body,
    latencies_ms,
    launched,
    shoal_server,
    wait_healthy,
)


def log(message: str) -> None:
    print(f"[ray_cluster {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


async def embed_latency(
    data_dir: Path, runs: int, threads: int, extra: tuple[str, ...] = ()
) -> dict[str, Any]:
    port = free_port()
    with shoal_server(port, data_dir, extra) as proc:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=httpx.Timeout(600), trust_env=False
        ) as client:
            await wait_healthy(client, proc, data_dir / "gateway.log")
            async with launched(client, EMBED_MODEL, threads) as uid:
                described = (await client.get(f"/v1/models/{uid}")).json()

                async def embed() -> None:
                    (await client.post("/v1/embeddings", json=embed_body(SINGLE_SENTENCE))).raise_for_status()

                result = await latencies_ms(embed, 20, runs)
                result["device"] = described["replicas"][0]["device"]
                return result


async def copy_through_object_store(
    cluster: Any, tmp: Path, mib: int, target_ip: str | None = None
) -> dict[str, Any]:
    from shoal.cluster import RayHost
    from shoal.cluster import files as cluster_files

    source = tmp / "model.bin"
    with open(source, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(2**20))
    started = time.perf_counter()
    shutil.copyfile(source, tmp / "plain-copy.bin")
    os.sync()
    plain = time.perf_counter() - started

    ray_cluster = RayHost(cluster.address)
    await ray_cluster.start()
    node = next(
        n
        for n in ray_cluster.nodes.values()
        if (n.ip == target_ip if target_ip else n.node_id != cluster.head_node.node_id)
    )
    manifest = cluster_files.manifest(source)
    started = time.perf_counter()
    progress = cluster_files.CopyProgress(node.name, str(source), source.stat().st_size)
    copied = await asyncio.to_thread(ray_cluster._copy, node, manifest, progress)
    os.sync()
    through_ray = time.perf_counter() - started
    assert Path(copied).stat().st_size == source.stat().st_size
    await ray_cluster.shutdown()
    return {
        "mib": mib,
        "plain_copy_s": round(plain, 3),
        "plain_copy_mib_s": round(mib / plain, 1),
        "object_store_s": round(through_ray, 3),
        "object_store_mib_s": round(mib / through_ray, 1),
    }


async def copy_only(address: str, target_ip: str, tmp: Path, mib: int) -> None:
    """--copy-to: run inside the head's namespace (a Ray driver must be on a node's address)."""
    cluster = type("Address", (), {"address": address})()
    print(json.dumps(await copy_through_object_store(cluster, tmp, mib, target_ip)))


sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, env={"LC_ALL": "C"}).stdout
    except OSError:
        return "unknown"
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")


async def netns_phase(args: argparse.Namespace) -> dict[str, Any]:
    import netns  # tests/netns.py

    if (why := netns.why_not()) is not None:
        return {"skipped": why}
    cluster = netns.NetnsCluster()
    cluster.up()
    report: dict[str, Any] = {}
    gateway: subprocess.Popen[bytes] | None = None
    try:
        hidden = cluster.tmp / "models"
        hidden.mkdir()
        env = {"TMPDIR": str(cluster.tmp)}
        cluster.ray_start(cluster.head_ns, {**env, "SHOAL_FAKE_GPUS": "1x16GiB"})
        cluster.ray_start(cluster.worker_ns, {**env, "SHOAL_FAKE_GPUS": "1x12GiB",
                          "SHOAL_MODEL_CACHE": str(cluster.tmp / "cache")}, mount=str(hidden))  # fmt: skip
        port = 8000
        gateway = cluster.popen(cluster.head_ns, [sys.executable, "-m", "shoal.cli", "serve", "--host",
                                cluster.head_ip, "--port", str(port), "--insecure", "--data-dir",
                                str(cluster.tmp / "data"), "--ray-address", cluster.ray_address],
                                "gateway.log")  # fmt: skip
        async with httpx.AsyncClient(
            base_url=f"http://{cluster.head_ip}:{port}", timeout=httpx.Timeout(600), trust_env=False
        ) as client:
            deadline = time.monotonic() + 120
            while True:
                assert gateway.poll() is None and time.monotonic() < deadline, (
                    cluster.tmp / "gateway.log"
                ).read_text()
                try:
                    nodes = {w["worker_ip"]: w["node"] for w in (await client.get("/v1/workers")).json()}
                    if len(nodes) == 2:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.2)
            head, worker = nodes[cluster.head_ip], nodes[cluster.worker_ip]

            async def launch(uid: str, **body: Any) -> None:
                r = await client.post("/v1/models", json={"model_uid": uid, **body})
                r.raise_for_status()

            # 1. the same embedding model on the head and on the worker, one after the other
            embeddings: dict[str, Any] = {}
            for uid, node_ip in (("emb-head", cluster.head_ip), ("emb-worker", cluster.worker_ip)):
                await launch(uid, model_name=EMBED_MODEL, n_threads=args.threads, worker_ip=node_ip)

                async def embed(uid: str = uid) -> None:
                    body = {**embed_body(SINGLE_SENTENCE), "model": uid}
                    (await client.post("/v1/embeddings", json=body)).raise_for_status()

                log(f"netns: {args.runs} one-sentence embeddings, replica on {uid[4:]}")
                embeddings[uid[4:]] = await latencies_ms(embed, 20, args.runs)
                await client.delete(f"/v1/models/{uid}")
            embeddings["delta_p50_ms"] = round(
                embeddings["worker"]["p50_ms"] - embeddings["head"]["p50_ms"], 3
            )
            report["embeddings_single"] = embeddings

            # 2. a model file to the worker, which cannot see the gateway's folder
            log(f"netns: copying {args.copy_mib} MiB to the worker")
            copy = subprocess.run(
                ["ip", "netns", "exec", cluster.head_ns, sys.executable, __file__, "--copy-to",
                 cluster.ray_address, cluster.worker_ip, str(hidden), "--copy-mib", str(args.copy_mib)],
                capture_output=True, text=True, env={**os.environ, "RAY_TMPDIR": str(cluster.tmp)},
            )  # fmt: skip
            if copy.returncode != 0:
                raise RuntimeError(copy.stderr[-3000:])
            report["model_file_copy"] = json.loads(copy.stdout.strip().splitlines()[-1])

            # 3. a partition while a chat model serves on the worker
            await launch("mover", model_name=CHAT_MODEL, gpu_memory="6GiB", **CHAT_SMALL)
            while (await client.get("/v1/models/mover")).json()["status"] != "ready":
                await asyncio.sleep(0.1)
            described = (await client.get("/v1/models/mover")).json()["replicas"][0]
            assert described["node"] == worker, described
            report["partition"] = await partition(client, cluster, head, worker, described["pid"])

            # 4. a cut while a replica starts on the worker (the head empty again: binpack picks the worker)
            await client.delete("/v1/models/mover")
            report["partition_while_starting"] = await partition_while_starting(client, cluster, head, worker)
    finally:
        if gateway is not None and gateway.poll() is None:
            gateway.send_signal(2)
            try:
                gateway.wait(30)
            except subprocess.TimeoutExpired:
                pass
        cluster.close()
    return report


CHAT_SMALL = {"n_parallel": 1, "n_ctx": 512, "n_threads": 1}


def pid_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def partition(
    client: httpx.AsyncClient, cluster: Any, head: str, worker: str, old_pid: int
) -> dict[str, Any]:
    body = {"model": "mover", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    chats: list[tuple[float, float, int]] = []  # (sent, took, status), seconds from the cut
    stop = asyncio.Event()
    cut = 0.0

    async def chatter() -> None:
        while not stop.is_set():
            sent = time.monotonic()
            status = (await client.post("/v1/chat/completions", json=body)).status_code
            chats.append((sent - cut, time.monotonic() - sent, status))
            await asyncio.sleep(0.1)

    async def until(check: Any, limit: float = 120) -> float | None:
        """Seconds from the cut until check() holds; None when it did not within `limit`."""
        while not await check():
            if time.monotonic() - cut > limit:
                return None
            await asyncio.sleep(0.05)
        return round(time.monotonic() - cut, 3)

    async def unreachable() -> bool:
        return any(
            w["node"] == worker and not w["reachable"] for w in (await client.get("/v1/workers")).json()
        )

    async def on_head() -> bool:
        replicas = (await client.get("/v1/models/mover")).json()["replicas"]
        return bool(replicas[0]["node"] == head and replicas[0]["state"] == "ready")

    log("netns: partition: the worker's link down")
    cut = time.monotonic()
    cluster.link(cluster.worker_ns, up=False)
    task = asyncio.create_task(chatter())
    detected = await until(unreachable)
    replaced = await until(on_head)

    async def answered() -> bool:
        return any(s == 200 and t > 0 for t, _, s in chats)

    served = await until(answered) or 0.0
    old_alive = pid_alive(old_pid)
    during = [c for c in chats if c[0] + c[1] <= served]
    log("netns: the link back up")
    cluster.link(cluster.worker_ns, up=True)
    up = time.monotonic() - cut

    async def stale_stopped() -> bool:
        return not pid_alive(old_pid)

    async def back() -> bool:
        return any(w["node"] == worker and w["alive"] for w in (await client.get("/v1/workers")).json())

    stopped = await until(stale_stopped, up + 120)
    rejoined = await until(back, up + 120)
    stop.set()
    await task
    statuses: dict[str, int] = {}
    for _, _, s in during:
        statuses[str(s)] = statuses.get(str(s), 0) + 1
    return {
        "unreachable_after_s": detected,
        "replaced_ready_on_head_s": replaced,
        "first_200_after_cut_s": served,
        "requests_meanwhile": statuses,
        "slowest_request_meanwhile_s": round(max((t for _, t, _ in during), default=0.0), 3),
        "old_runner_alive_while_cut_off": old_alive,
        "link_up_at_s": round(up, 3),
        "stale_runner_stopped_after_link_up_s": None if stopped is None else round(stopped - up, 3),
        "worker_usable_after_link_up_s": None if rejoined is None else round(rejoined - up, 3),
    }


async def partition_while_starting(
    client: httpx.AsyncClient, cluster: Any, head: str, worker: str
) -> dict[str, Any]:
    import netns  # tests/netns.py

    slow = cluster.tmp / "slow"
    slow.mkdir(exist_ok=True)
    (slow / "sitecustomize.py").write_text(netns.only_where(cluster.worker_ip, "time.sleep(5)"))
    body = {"model_name": CHAT_MODEL, "model_uid": "early", "gpu_memory": "6GiB", "queue_timeout": 90,
            "envs": {"PYTHONPATH": str(slow)}, **CHAT_SMALL}  # fmt: skip
    launch = asyncio.create_task(client.post("/v1/models", json=body))
    while True:
        described = await client.get("/v1/models/early")
        replicas = described.json().get("replicas", []) if described.status_code == 200 else []
        if replicas and replicas[0]["state"] == "starting" and replicas[0]["pid"]:
            break
        await asyncio.sleep(0.05)
    starting = replicas[0]
    assert starting["node"] == worker, starting
    log("netns: partition while a replica starts on the worker")
    cut = time.monotonic()
    cluster.link(cluster.worker_ns, up=False)
    unreachable = None
    while not launch.done():
        if unreachable is None and any(
            w["node"] == worker and not w["reachable"] for w in (await client.get("/v1/workers")).json()
        ):
            unreachable = round(time.monotonic() - cut, 3)
        await asyncio.sleep(0.05)
    launched_after = round(time.monotonic() - cut, 3)
    (await launch).raise_for_status()
    (replica,) = (await client.get("/v1/models/early")).json()["replicas"]
    assert replica["node"] == head and replica["state"] == "ready", replica
    cluster.link(cluster.worker_ns, up=True)
    up = time.monotonic()
    while pid_alive(starting["pid"]) and time.monotonic() - up < 120:
        await asyncio.sleep(0.05)
    await client.delete("/v1/models/early")
    return {
        "unreachable_after_s": unreachable,
        "ready_on_head_after_cut_s": launched_after,
        "stale_runner_stopped_after_link_up_s": round(time.monotonic() - up, 3),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from ray.cluster_utils import Cluster

    report: dict[str, Any] = {"machine": {**machine_info(), "lscpu_model_name": lscpu_model()},
                              "load_start": list(os.getloadavg())}  # fmt: skip
    phases = args.phases.split(",")
    if "netns" in phases:
        log("nodes in network namespaces")
        report["netns"] = await netns_phase(args)
    if "local" not in phases:
        report["load_end"] = list(os.getloadavg())
        return report
    tmp = Path(tempfile.mkdtemp(prefix="rb-", dir="/tmp"))  # Ray's socket paths must stay short
    os.environ["RAY_TMPDIR"] = str(tmp)
    try:
        (tmp / "local").mkdir()
        log(f"one machine: {args.runs} one-sentence embeddings")
        local = await embed_latency(tmp / "local", args.runs, args.threads)

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        try:
            (tmp / "gateway-ray").mkdir()
            log(f"Ray mode (one-node cluster): {args.runs} one-sentence embeddings")
            on_ray = await embed_latency(
                tmp / "ray", args.runs, args.threads, ("--ray-address", cluster.address)
            )
            report["embeddings_single"] = {
                "one_machine": local,
                "ray_node": on_ray,
                "delta_p50_ms": round(on_ray["p50_ms"] - local["p50_ms"], 3),
            }
            cluster.add_node(num_cpus=1, env_vars={"SHOAL_MODEL_CACHE": str(tmp / "node-cache")})
            log(f"copying {args.copy_mib} MiB to a second node through the object store")
            report["model_file_copy"] = await copy_through_object_store(cluster, tmp, args.copy_mib)
        finally:
            cluster.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["load_end"] = list(os.getloadavg())
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--copy-mib", type=int, default=512)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--phases", default="local,netns", help="local (one host), netns, or both")
    parser.add_argument(
        "--copy-to", nargs=3, metavar=("RAY_ADDRESS", "NODE_IP", "DIR"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.copy_to:
        asyncio.run(copy_only(args.copy_to[0], args.copy_to[1], Path(args.copy_to[2]), args.copy_mib))
        return
    print(json.dumps(asyncio.run(main_async(args)), indent=2))


if __name__ == "__main__":
    main()
