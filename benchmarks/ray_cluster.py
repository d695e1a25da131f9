"""What Ray mode costs, side by side in one run.

1. Requests: the same embedding model (all-MiniLM-L6-v2, CPU, same threads) launched through a Shoal
   gateway on one machine (runner on a Unix socket) and through a gateway joined to a one-node Ray
   cluster (runner spawned by the node agent, reached over TCP). One-sentence embedding latency.
2. Model files: a file of --copy-mib random bytes copied to a second Ray node the way Shoal copies a
   local-path model (32 MiB chunks through Ray's object store, written by the node's agent), against
   a plain local file copy of the same file on the same disk.

The phases run one after another, never at once. Prints one JSON document to stdout.

    .venv/bin/python benchmarks/ray_cluster.py [--runs 200] [--copy-mib 512]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from common import free_port, machine_info  # benchmarks/common.py
from overhead import (
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


async def copy_through_object_store(cluster: Any, tmp: Path, mib: int) -> dict[str, Any]:
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
    node = next(n for n in ray_cluster.nodes.values() if n.node_id != cluster.head_node.node_id)
    manifest = cluster_files.manifest(source)
    started = time.perf_counter()
    copied = await asyncio.to_thread(ray_cluster._copy, node, manifest)
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


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from ray.cluster_utils import Cluster

    report: dict[str, Any] = {"machine": machine_info(), "load_start": list(os.getloadavg())}
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
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main_async(args)), indent=2))


if __name__ == "__main__":
    main()
