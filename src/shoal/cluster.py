"""Several machines: the gateway joins an existing Ray cluster (`shoal serve --ray-address`).

One `NodeAgent` actor per Ray node (pinned with a hard node affinity, no CPUs reserved) reports the
node's devices (its own SHOAL_FAKE_GPUS, or NVML, and the CPU) and spawns and stops runner processes
there. Runners on agents listen on TCP; the gateway proxies to them. Device ids are prefixed with
the node ("node-ab12cd34/gpu:0") so the one scheduler sees every node's devices.

`RayCluster` lives in the gateway: it starts an agent on every alive node, polls `ray.nodes()`
every second (a node that joins gets an agent; a node that leaves has its runners marked lost), and
hands out `RemoteRunner`s with the methods of a local `RunnerProcess`.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from shoal.devices import Device, all_devices
from shoal.errors import LaunchFailed
from shoal.runners.config import RunnerConfig
from shoal.runners.process import wait_healthy

log = logging.getLogger("shoal.cluster")

POLL_NODES = 1.0  # seconds between looks at ray.nodes()
POLL_RUNNERS = 0.5  # seconds between asking each agent which of its runners exited
_PR_SET_PDEATHSIG = 1


def node_name(node_id: str) -> str:
    return f"node-{node_id[:8]}"


def split_device(device_id: str) -> tuple[str | None, str]:
    """ "node-ab12cd34/gpu:0" → ("node-ab12cd34", "gpu:0"); "gpu:0" → (None, "gpu:0")."""
    node, sep, local = device_id.rpartition("/")
    return (node, local) if sep else (None, device_id)


def _pdeathsig() -> None:  # in the child between fork and exec
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class NodeAgent:
    """The Ray actor on one node (created as a Ray actor by RayCluster; plain class for tests).

    Runners are spawned from one long-lived thread: PR_SET_PDEATHSIG fires when the *thread* that
    forked exits, so a short-lived thread would kill its runners."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.dir = Path(tempfile.mkdtemp(prefix="shoal-agent-"))
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shoal-spawner")
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._status: dict[int, str] = {}
        self._logs: dict[int, Path] = {}
        self._lock = threading.Lock()
        self._n = 0

    def devices(self) -> list[dict[str, Any]]:
        return [d.to_dict() for d in all_devices(os.environ.get("SHOAL_FAKE_GPUS", ""))]

    def spawn(self, config_json: str, env: dict[str, str], log_name: str) -> tuple[int, str]:
        """Start a runner; returns (pid, "host:port" it will listen on)."""
        with self._lock:
            self._n += 1
            n = self._n
        config = RunnerConfig.model_validate_json(config_json)
        listen = f"{self.host}:{_free_port(self.host)}"
        status = self.dir / f"r{n}.status"
        config = config.model_copy(update={"listen": listen, "socket": "", "status_file": str(status)})
        path = self.dir / f"r{n}.json"
        path.write_text(config.model_dump_json())
        log_path = self.dir / log_name

        def start() -> subprocess.Popen[bytes]:
            with open(log_path, "ab") as out:
                return subprocess.Popen(
                    [sys.executable, "-m", "shoal.runners.main", str(path)],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **env},
                    preexec_fn=_pdeathsig,
                    close_fds=True,
                )

        proc = self._spawner.submit(start).result()
        self._procs[proc.pid] = proc
        self._status[proc.pid] = str(status)
        self._logs[proc.pid] = log_path
        return proc.pid, listen

    def exited(self) -> dict[int, int | None]:
        return {pid: proc.poll() for pid, proc in self._procs.items()}

    def failure_reason(self, pid: int) -> str:
        status = Path(self._status.get(pid, "/nonexistent"))
        proc = self._procs.get(pid)
        reason = (
            status.read_text().strip()
            if status.exists()
            else (f"runner exited with code {proc.poll() if proc else None}")
        )
        try:
            lines = self._logs[pid].read_text(errors="replace").splitlines()[-200:]
        except (OSError, KeyError):
            lines = []
        hints = [ln.strip() for ln in lines if any(k in ln.lower() for k in ("error", "failed", "exception"))]
        hints = [h for h in hints if h not in reason][-3:]
        return reason + (" | " + " | ".join(hints) if hints else "")

    def stop(self, pid: int, grace: float = 5.0) -> None:
        proc = self._procs.pop(pid, None)
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass
class Node:
    node_id: str
    name: str
    ip: str
    agent: Any  # the Ray actor handle
    devices: list[Device] = field(default_factory=list)
    alive: bool = True
    runners: dict[int, RemoteRunner] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "node": self.name,
            "node_id": self.node_id,
            "worker_ip": self.ip,
            "alive": self.alive,
            "devices": [d.id for d in self.devices],
            "runners": len(self.runners),
        }


class RemoteRunner:
    """A runner on a node agent, with the methods ModelService uses on a local RunnerProcess."""

    def __init__(self, cluster: RayCluster, node: Node, config: RunnerConfig, env: dict[str, str],
                 log_name: str) -> None:  # fmt: skip
        self.cluster, self.node, self.config = cluster, node, config
        self._env, self._log_name = env, log_name
        self.pid: int | None = None
        self.listen: str | None = None
        self._exit: int | None = None
        self._lost: str | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                f"http://{self.listen}", connector=aiohttp.TCPConnector(limit=0)
            )
        return self._session

    async def start(self) -> None:
        import ray

        ref = self.node.agent.spawn.remote(self.config.model_dump_json(), self._env, self._log_name)
        try:
            self.pid, self.listen = await asyncio.to_thread(ray.get, ref, timeout=60)
        except Exception as exc:  # the node died or the actor is gone
            self.lost(f"could not spawn on {self.node.name}: {type(exc).__name__}")
            raise LaunchFailed(self._lost or "node lost") from exc
        self.node.runners[self.pid] = self

    def lost(self, reason: str) -> None:
        """The node (or its agent) is gone: the runner is gone with it (PDEATHSIG)."""
        self._lost = reason
        self._exit = -1

    @property
    def node_lost(self) -> bool:
        return self._lost is not None

    def exited(self) -> int | None:
        return self._exit

    async def wait_ready(self, timeout: float) -> None:
        await wait_healthy(self, timeout, self.failure_reason_async)

    async def failure_reason_async(self) -> str:
        if self._lost:
            return self._lost
        import ray

        try:
            ref = self.node.agent.failure_reason.remote(self.pid)
            return str(await asyncio.to_thread(ray.get, ref, timeout=10))
        except Exception:
            return f"runner exited with code {self._exit} on {self.node.name}"

    def failure_reason(self) -> str:
        return self._lost or f"runner on {self.node.name} exited with code {self._exit}"

    async def stop(self, grace: float = 5.0) -> None:
        if self.pid is not None and self._lost is None and self._exit is None:
            import ray

            try:
                ref = self.node.agent.stop.remote(self.pid, grace)
                await asyncio.to_thread(ray.get, ref, timeout=grace + 10)
            except Exception as exc:  # the node went away meanwhile: its runners went with it
                log.info("stop of runner %s on %s: %s", self.pid, self.node.name, type(exc).__name__)
        if self.pid is not None:
            self.node.runners.pop(self.pid, None)
        if self._exit is None:
            self._exit = 0
        if self._session is not None:
            await self._session.close()


class RayCluster:
    """The gateway's view of the Ray cluster: nodes, their agents and their devices."""

    def __init__(self, address: str, on_change: Callable[[], None] | None = None) -> None:
        self.address = address
        self.nodes: dict[str, Node] = {}  # by node name
        self._on_change = on_change
        self._actor_cls: Any = None

    async def start(self) -> None:
        import ray

        address = None if self.address == "auto" and "RAY_ADDRESS" in os.environ else self.address
        await asyncio.to_thread(ray.init, address=address, logging_level=logging.WARNING, log_to_driver=False)
        self._actor_cls = ray.remote(num_cpus=0, max_restarts=0)(NodeAgent)
        await self.refresh()

    async def refresh(self) -> None:
        """Start agents on new alive nodes; mark the runners of nodes that left as lost."""
        import ray

        seen = await asyncio.to_thread(ray.nodes)
        alive = {n["NodeID"]: n for n in seen if n.get("Alive")}
        changed = False
        for node in list(self.nodes.values()):
            if node.alive and node.node_id not in alive:
                self._mark_dead(node, "left the cluster")
                changed = True
        for node_id, info in alive.items():
            name = node_name(node_id)
            if name in self.nodes and self.nodes[name].alive:
                continue
            try:
                await self._add(node_id, name, info.get("NodeManagerAddress", "127.0.0.1"))
                changed = True
            except Exception as exc:  # the node may be going away again; next poll retries
                log.warning("could not start a Shoal agent on %s: %s", name, exc)
        if changed and self._on_change:
            self._on_change()

    async def _add(self, node_id: str, name: str, ip: str) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        old = self.nodes.get(name)
        if old is not None:
            ray.kill(old.agent)
        agent = self._actor_cls.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        ).remote(ip)
        raw = await asyncio.to_thread(ray.get, agent.devices.remote(), timeout=60)
        devices = [Device(**{**d, "id": f"{name}/{d['id']}"}) for d in raw]
        self.nodes[name] = Node(node_id, name, ip, agent, devices)
        log.info("node %s (%s) joined: %s", name, ip, ", ".join(d.id for d in devices))

    def _mark_dead(self, node: Node, why: str) -> None:
        import ray

        node.alive = False
        log.warning("node %s %s; %d runner(s) lost", node.name, why, len(node.runners))
        for runner in list(node.runners.values()):
            runner.lost(f"node {node.name} {why}")
        node.runners.clear()
        try:
            ray.kill(node.agent)  # frees the handle; the actor is gone anyway
        except Exception:
            pass

    async def watch(self) -> None:
        """Runs for the life of the gateway."""
        import ray

        last_nodes = 0.0
        while True:
            if time.monotonic() - last_nodes >= POLL_NODES:
                last_nodes = time.monotonic()
                try:
                    await self.refresh()
                except Exception as exc:
                    log.warning("could not read the Ray nodes: %s", exc)
            for node in [n for n in self.nodes.values() if n.alive and n.runners]:
                try:
                    codes: dict[int, int | None] = await asyncio.to_thread(
                        ray.get, node.agent.exited.remote(), timeout=5
                    )
                except ray.exceptions.RayActorError:
                    self._mark_dead(node, "lost its agent")
                    continue
                except Exception:
                    continue
                for pid, code in codes.items():
                    runner = node.runners.get(pid)
                    if runner is not None and code is not None:
                        runner._exit = code
            await asyncio.sleep(POLL_RUNNERS)

    def devices(self) -> list[Device]:
        return [d for n in self.nodes.values() if n.alive for d in n.devices]

    def node_of(self, device_id: str) -> Node:
        name, _ = split_device(device_id)
        node = self.nodes.get(name or "")
        if node is None or not node.alive:
            raise LaunchFailed(f"node {name} is not in the cluster")
        return node

    def matches(self, node_name_: str | None, worker_ip: str) -> bool:
        node = self.nodes.get(node_name_ or "")
        return node is not None and worker_ip in (node.ip, node.name, node.node_id)

    def runner(
        self, device_id: str, config: RunnerConfig, env: dict[str, str], log_name: str
    ) -> RemoteRunner:
        return RemoteRunner(self, self.node_of(device_id), config, env, log_name)

    def workers(self) -> list[dict[str, Any]]:
        return [n.describe() for n in self.nodes.values()]

    async def shutdown(self) -> None:
        import ray

        for node in self.nodes.values():
            try:
                ray.kill(node.agent)
            except Exception:
                pass
        await asyncio.to_thread(ray.shutdown)
