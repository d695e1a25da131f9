"""The gateway's own CPU per proxied request, with a load generator that costs as little as possible.

Starts `shoal serve` (a temporary data dir), launches all-MiniLM-L6-v2 on the CPU, and sends
one-sentence embeddings from 1 and 16 concurrent clients, --requests per phase, over keep-alive
HTTP/1.1 connections made with Shoal's own lean client (runners/client.py: one write per request,
no task per request), so on a 2-core machine the load generator takes less of the cores than
httpx (benchmarks/overhead.py) does. Per phase: requests/s, p50/p99, and the gateway process's
user + system CPU (/proc) per request, raw and less what the gateway spends idle over the same time
(its supervisor and server loops, measured first), and the CPU the gateway, its runners and
the load generator each used per second of the phase. Last, GET /health (answered by the gateway
alone) from one client back to back and 15 ms apart (about one embedding's time): what the same
request costs the gateway when each one wakes it from idle. With --profile DIR, py-spy records the
gateway (--native, raw collapsed stacks, one file per phase).

Prints one JSON document to stdout.

    PYTHONPATH=src .venv/bin/python benchmarks/gateway_cpu.py [--requests 1500] [--clients 1,16]
        [--threads 2] [--shoal-src OTHER/src] [--profile DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from common import cpu_seconds, descendants, free_port, machine_info, settle  # benchmarks/common.py
from overhead import EMBED_MODEL, SINGLE_SENTENCE, launched, percentile, profiled, shoal_server, wait_healthy
from shoal.runners.client import RunnerClient

IDLE_SECONDS = 5.0
WARMUPS = 20


class Load:
    """Clients on one pool of keep-alive connections to the gateway."""

    def __init__(self, port: int) -> None:
        self.client = RunnerClient(host="127.0.0.1", port=port)
        self.body = orjson.dumps({"model": EMBED_MODEL, "input": SINGLE_SENTENCE, "encoding_format": "float"})

    async def send(self) -> tuple[int, bytes]:
        headers = {"content-type": "application/json"}
        answer = await self.client.request("POST", "/v1/embeddings", self.body, headers, timeout=120)
        try:
            return answer.status, await answer.read()
        finally:
            answer.close()

    async def health(self, pid: int, requests: int, gap: float) -> dict[str, Any]:
        """GET /health (no runner behind it) from one client, back to back or `gap` seconds apart:
        the gateway's CPU per request when it is woken from idle for each, against when it is not."""
        for _ in range(WARMUPS):
            await self.client.call("GET", "/health")
        before = cpu_seconds(pid)
        for _ in range(requests):
            status, content = await self.client.call("GET", "/health")
            if status != 200:
                raise RuntimeError(f"{status}: {content[:300]!r}")
            if gap:
                await asyncio.sleep(gap)
        cpu = cpu_seconds(pid) - before
        return {"path": "/health", "gap_ms": gap * 1000, "requests": requests,
                "gateway_cpu_ms_per_request": round(cpu / requests * 1000, 3)}  # fmt: skip

    async def phase(self, pid: int, clients: int, requests: int) -> dict[str, Any]:
        latencies: list[float] = []

        async def client(count: int) -> None:
            for _ in range(count):
                start = time.perf_counter()
                status, content = await self.send()
                latencies.append((time.perf_counter() - start) * 1000)
                if status != 200:
                    raise RuntimeError(f"{status}: {content[:300]!r}")

        await asyncio.gather(*(client(WARMUPS // clients + 1) for _ in range(clients)))
        latencies.clear()
        per_client = max(1, requests // clients)
        runners = descendants(pid)  # its runners and spares
        cpu_before, own_before = cpu_seconds(pid), time.process_time()
        runners_before = sum(cpu_seconds(p) for p in runners)
        start = time.perf_counter()
        await asyncio.gather(*(client(per_client) for _ in range(clients)))
        elapsed, cpu = time.perf_counter() - start, cpu_seconds(pid) - cpu_before
        runners_cpu = sum(cpu_seconds(p) for p in runners) - runners_before
        own_cpu = time.process_time() - own_before
        return {
            "clients": clients,
            "requests": len(latencies),
            "seconds": round(elapsed, 2),
            "requests_per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": round(percentile(latencies, 50), 2),
            "p99_ms": round(percentile(latencies, 99), 2),
            "gateway_cpu_ms_per_request": round(cpu / len(latencies) * 1000, 3),
            "gateway_cpu_s": round(cpu, 3),
            # where the cores went over the phase (CPU seconds per wall second)
            "cores_used": {
                "gateway": round(cpu / elapsed, 2),
                "runners": round(runners_cpu / elapsed, 2),
                "load_generator": round(own_cpu / elapsed, 2),
            },
        }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    results: dict[str, Any] = {"machine": machine_info(), "model": EMBED_MODEL, "threads": args.threads}
    with tempfile.TemporaryDirectory(prefix="shoal-gwcpu-") as tmp:
        data_dir = Path(tmp)
        with shoal_server(port, data_dir, src=args.shoal_src) as proc:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as admin:
                await wait_healthy(admin, proc, data_dir / "gateway.log")
                async with launched(admin, EMBED_MODEL, args.threads):
                    results["settled_s"] = await settle(proc.pid)  # the spare refilling after the launch
                    before = cpu_seconds(proc.pid)
                    await asyncio.sleep(IDLE_SECONDS)
                    idle_per_s = (cpu_seconds(proc.pid) - before) / IDLE_SECONDS
                    results["gateway_idle_cpu_ms_per_s"] = round(idle_per_s * 1000, 2)
                    load = Load(port)
                    phases = []
                    for clients in args.clients:
                        with profiled(proc.pid, args.profile, f"c{clients}"):
                            phase = await load.phase(proc.pid, clients, args.requests)
                        busy = phase["gateway_cpu_s"] - idle_per_s * phase["seconds"]
                        less_idle = round(busy / phase["requests"] * 1000, 3)
                        phase["gateway_cpu_ms_per_request_less_idle"] = less_idle
                        phases.append(phase)
                        print(json.dumps(phase), file=sys.stderr)
                    results["phases"] = phases
                    # the same gateway woken for each request or not, with no runner involved
                    results["health"] = [
                        await load.health(proc.pid, args.requests // 3, gap) for gap in (0, 0.015)
                    ]
                    await load.client.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1500, help="requests per phase")
    parser.add_argument("--clients", type=lambda s: [int(c) for c in s.split(",")], default=[1, 16])
    parser.add_argument("--threads", type=int, default=2, help="the model's n_threads")
    parser.add_argument("--shoal-src", help="run the gateway from another tree's src/ folder")
    parser.add_argument("--profile", help="a folder for py-spy's raw stacks, one file per phase")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args)), indent=2))


if __name__ == "__main__":
    main()
