"""The gateway's side of the cluster: nodes, their agents, and runners on them.

`RayHost` is the Host (shoal.hosts) of a Ray cluster: it starts an agent on every alive node and
polls them (a node that joins gets an agent; a node that leaves has its runners marked lost; each
poll refreshes the node's devices and its runners' measured memory). It hands out `RemoteRunner`s,
the RunnerHandle of a runner on a node.

A node whose agent does not answer for UNREACHABLE_AFTER seconds (a partition: the node and its
runners may be alive, but cut off) is treated as lost before Ray says so: its runners are marked
lost, its replicas placed elsewhere, and nothing new goes there. When its agent answers again, the
runners it still has that the gateway gave up on are stopped, and the node takes models again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from shoal.catalog.specs import Source
from shoal.cluster import files
from shoal.cluster.agent import NodeAgent
from shoal.devices import Device, Snapshot
from shoal.errors import LaunchFailed, NodeLost
from shoal.hub.download import HubLaunch
from shoal.runners.client import RunnerClient
from shoal.runners.config import RunnerConfig
from shoal.runners.process import ping, wait_healthy
from shoal.scheduler import Demand, DeviceState

log = logging.getLogger("shoal.cluster")

POLL_NODES = 1.0  # seconds between looks at ray.nodes()
POLL_AGENTS = 0.5  # seconds between polls of each agent (runner exits, devices, memory use)
COPY_IN_FLIGHT = 4  # object-store chunks on their way to a node at once
DOWNLOADS_PER_NODE = 4  # hub downloads a node's agent runs at once (apart from its other calls)
DOWNLOAD_TIMEOUT = 24 * 3600.0  # seconds a node's hub download may take (a lost node ends it sooner)
DOWNLOAD_PROGRESS = 0.25  # seconds between looks at a node's download progress (its agent's polls)
AGENT_RESTART_TIMEOUT = 5.0  # seconds to start a new agent on a node whose agent died
POLL_WAIT = 1.0  # seconds one round of polls waits for the agents' answers
# seconds without an answer from a node's agent before its runners are treated as lost
UNREACHABLE_AFTER = float(os.environ.get("SHOAL_RAY_UNREACHABLE_AFTER", "5"))
STALE_GRACE = 2.0  # seconds a stale runner on a node that answers again gets to stop


def node_name(node_id: str) -> str:
    return f"node-{node_id[:8]}"


def split_device(device_id: str) -> tuple[str | None, str]:
    """ "node-ab12cd34/gpu:0" → ("node-ab12cd34", "gpu:0"); "gpu:0" → (None, "gpu:0")."""
    node, sep, local = device_id.rpartition("/")
    return (node, local) if sep else (None, device_id)


@dataclass
class Node:
    node_id: str
    name: str
    ip: str
    agent: Any  # the Ray actor handle
    devices: list[Device] = field(default_factory=list)
    alive: bool = True  # in Ray's view
    reachable: bool = True  # its agent answered within UNREACHABLE_AFTER
    recovering: bool = False  # its agent died; a new one is being started
    runners: dict[int, RemoteRunner] = field(default_factory=dict)
    gpu_usage: dict[tuple[str, int], int] = field(default_factory=dict)  # (device id, pid) → bytes
    rss: dict[int, int] = field(default_factory=dict)  # runner pid → bytes
    last_seen: float = field(default_factory=time.monotonic)  # its agent's last answer
    pending: Any = None  # the poll on its way (one at a time: polls do not pile up while it is cut off)
    spawning: set[str] = field(default_factory=set)  # tags of runners being spawned there
    stopping: set[int] = field(default_factory=set)  # stale runners asked to stop
    cache: list[dict[str, Any]] = field(default_factory=list)  # model copies there (files.listing)
    hub_cache: list[dict[str, Any]] = field(default_factory=list)  # hub models in its own cache
    downloads: dict[str, int] = field(default_factory=dict)  # hub downloads there: key → bytes in

    @property
    def usable(self) -> bool:
        return self.alive and self.reachable

    def update(self, polled: dict[str, Any]) -> None:
        self.devices = [Device(**{**d, "id": f"{self.name}/{d['id']}"}) for d in polled["devices"]]
        self.gpu_usage = {(f"{self.name}/{dev}", pid): used for dev, pid, used in polled["gpu"]}
        self.rss = dict(polled["rss"])
        self.downloads = dict(polled.get("downloads", {}))
        for pid, code in polled["exited"].items():
            runner = self.runners.get(pid)
            if runner is not None and code is not None:
                runner._exit = code

    def describe(self) -> dict[str, Any]:
        return {
            "node": self.name,
            "node_id": self.node_id,
            "worker_ip": self.ip,
            "alive": self.usable,
            "reachable": self.reachable,
            "devices": [d.id for d in self.devices] if self.usable else [],
            "runners": len(self.runners),
            "model_cache": self.cache,
            "hub_cache": self.hub_cache,
        }


def _ray_error(exc: BaseException, node: Node) -> LaunchFailed:
    """A failed launch step on a node: its agent is gone (NodeLost: place the replica elsewhere), or
    anything else, such as the agent raising or a model file the gateway cannot read (LaunchFailed:
    placing it elsewhere would fail the same way)."""
    import ray

    if isinstance(exc, ray.exceptions.RayActorError):
        return NodeLost(f"node {node.name} is unreachable: {type(exc).__name__}")
    if isinstance(exc, ray.exceptions.RayTaskError):
        return LaunchFailed(f"on {node.name}: {exc.cause if exc.cause else exc}")
    return LaunchFailed(f"on {node.name}: {type(exc).__name__}: {exc}")


class RemoteRunner:
    """A runner on a node agent, with the methods ModelService uses on a local RunnerProcess."""

    def __init__(self, cluster: RayHost, node: Node, config: RunnerConfig, env: dict[str, str],
                 log_name: str, cores: tuple[int, ...], hub: HubLaunch | None = None) -> None:  # fmt: skip
        self.cluster, self.node, self.config = cluster, node, config
        self._env, self._log_name, self._cores, self._hub = env, log_name, cores, hub
        self.tag = uuid.uuid4().hex[:12]  # the agent reports it with the pid (stale runners)
        self.pid: int | None = None
        self.listen: str | None = None
        self._exit: int | None = None
        self._lost: str | None = None
        self._http: RunnerClient | None = None
        self.copy: files.CopyProgress | None = None  # its model's files on their way to the node

    def _seen_copy(self, progress: files.CopyProgress) -> None:
        self.copy = progress

    def files_progress(self) -> dict[str, Any] | None:
        return self.copy.progress() if self.copy is not None else None

    @property
    def http(self) -> RunnerClient:
        if self._http is None:
            assert self.listen is not None, "the runner is not spawned yet"
            host, _, port = self.listen.rpartition(":")
            self._http = RunnerClient(host=host.strip("[]"), port=int(port))
        return self._http

    async def start(self) -> None:
        """Bring the model's files to the node when it lacks them, then spawn the runner there."""

        node = self.node
        node.spawning.add(self.tag)
        try:
            path = None
            if self._hub is not None:
                path = await self.cluster.fetch_hub(node, self._hub, self.config.source.path, self._seen_copy)
            elif self.config.source.path:
                path = await self.cluster.stage(node, Path(self.config.source.path), self._seen_copy)
            if path is not None:
                self.config = self.config.model_copy(update={"source": Source(path=path)})
            ref = node.agent.spawn.remote(
                self.config.model_dump_json(), self._env, self._log_name, list(self._cores), self.tag
            )
            self.pid, self.listen = await self.cluster.call(node, ref, timeout=60)
        except Exception as exc:  # the node died or is cut off, or the agent could not do it
            node.spawning.discard(self.tag)  # spawned after all (a partition): stopped as stale
            error = exc if isinstance(exc, LaunchFailed) else _ray_error(exc, node)
            if not node.usable and not isinstance(error, NodeLost):
                error = NodeLost(f"node {node.name} is unreachable: {error.message}")
            if isinstance(error, NodeLost):
                self.lost(error.message)
            raise error from exc
        node.runners[self.pid] = self
        node.spawning.discard(self.tag)

    def lost(self, reason: str) -> None:
        """The node (or its agent) is gone, or cut off: the runner is gone with it (PDEATHSIG), or
        stopped once the node answers again. Requests on their way to it fail now (503), not when
        their timeouts run out."""
        self._lost = reason
        self._exit = -1
        if self._http is not None and not self._http.closed:
            self.cluster.spawn(self._http.close())

    @property
    def node_lost(self) -> bool:
        return self._lost is not None

    def exited(self) -> int | None:
        return self._exit

    async def wait_ready(self, timeout: float) -> None:
        try:
            await wait_healthy(self, timeout, self.failure_reason_async)
        except LaunchFailed as exc:
            raise NodeLost(exc.message) if self.node_lost else exc from None

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

    async def ping(self, timeout: float) -> bool:
        return self.listen is not None and await ping(self, timeout)

    async def kill(self) -> None:
        await self.stop(grace=0)

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
        if self._http is not None:
            await self._http.close()


class RayHost:
    """The gateway's view of the Ray cluster: nodes, their agents and their devices."""

    fetches_hub_files = True  # each node gets a hub model's files itself (fetch_hub)
    one_machine = False

    def __init__(self, address: str, on_change: Callable[[], None] | None = None) -> None:
        self.address = address
        self.on_change = on_change  # called when nodes come or go (queued launches look again)
        self.nodes: dict[str, Node] = {}  # by node name
        self.on_change = on_change
        self._actor_cls: Any = None
        self._copies: dict[tuple[str, str], asyncio.Lock] = {}  # (node, manifest key): one copy at a time
        self._copying: dict[tuple[str, str], files.CopyProgress] = {}  # the copies under way
        self._fetching: dict[tuple[str, str], files.CopyProgress] = {}  # the hub downloads under way
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def wait(self, node: Node, ref: Any, timeout: float) -> Any:
        """ray.get, in slices: gives up with NodeLost as soon as the node is lost or cut off (a call
        to a partitioned node would otherwise wait out its whole timeout). Runs in a thread."""
        import ray

        deadline = time.monotonic() + timeout
        while True:
            ready, _ = ray.wait([ref], timeout=min(0.5, max(0.0, deadline - time.monotonic())))
            if ready:
                return ray.get(ref)
            if not node.usable:
                raise NodeLost(f"node {node.name} is unreachable")
            if time.monotonic() >= deadline:
                raise LaunchFailed(f"on {node.name}: no answer from its agent within {timeout:.0f} s")

    async def call(self, node: Node, ref: Any, timeout: float) -> Any:
        return await asyncio.to_thread(self.wait, node, ref, timeout)

    async def start(self) -> None:
        import ray

        address = None if self.address == "auto" and "RAY_ADDRESS" in os.environ else self.address
        try:
            await asyncio.to_thread(
                ray.init, address=address, logging_level=logging.WARNING, log_to_driver=False
            )
        except ConnectionError as exc:
            raise RuntimeError(
                f"cannot join the Ray cluster at {self.address}: {exc}. Is `ray start` running there "
                "(docs/ray.md)?"
            ) from None
        # polls have their own thread on the agent: a runner's stop (up to its grace) or a file copy
        # there does not delay them, so a missing answer means the node is cut off, not busy
        ray.method(concurrency_group="poll")(NodeAgent.poll)
        ray.method(concurrency_group="download")(NodeAgent.fetch_hub)  # (a download takes minutes)
        groups = {"poll": 1, "download": DOWNLOADS_PER_NODE}
        options: dict[str, Any] = {"num_cpus": 0, "max_restarts": 0, "concurrency_groups": groups}
        self._actor_cls = ray.remote(**options)(NodeAgent)
        await self.refresh_nodes()
        self.spawn(self.watch())

    async def refresh(self) -> None:
        """Fresh per-pid use from every node (an eviction waits for its memory to show as free)."""
        await self.poll_agents()

    async def refresh_nodes(self) -> None:
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
        if changed and self.on_change:
            self.on_change()

    async def _add(self, node_id: str, name: str, ip: str) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        old = self.nodes.get(name)
        if old is not None:
            ray.kill(old.agent)
        agent = self._actor_cls.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        ).remote(ip)
        node = Node(node_id, name, ip, agent)
        node.update(await asyncio.to_thread(ray.get, agent.poll.remote(), timeout=60))
        cached: dict[str, Any] = await asyncio.to_thread(ray.get, agent.cached.remote(), timeout=60)
        node.cache, node.hub_cache = cached["copies"], cached["hub"]
        self.nodes[name] = node
        log.info("node %s (%s) joined: %s", name, ip, ", ".join(d.id for d in node.devices))

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

    async def poll_agents(self) -> None:
        """Ask every alive node's agent for its devices, memory use and runners (all at once; a node
        that does not answer within POLL_WAIT keeps its poll on its way and holds no one back)."""
        import ray

        nodes = [n for n in self.nodes.values() if n.alive and not n.recovering]
        for node in nodes:
            if node.pending is None:
                node.pending = node.agent.poll.remote()
        if not nodes:
            return
        refs = [n.pending for n in nodes]
        ready = set((await asyncio.to_thread(ray.wait, refs, num_returns=len(refs), timeout=POLL_WAIT))[0])
        now = time.monotonic()
        for node in nodes:
            ref = node.pending
            if ref is None or ref not in ready:
                if node.reachable and now - node.last_seen > UNREACHABLE_AFTER:
                    self._mark_unreachable(node, now - node.last_seen)
                continue
            node.pending = None
            try:
                polled = ray.get(ref, timeout=0)
            except ray.exceptions.ActorDiedError:
                if node.recovering:  # another poll (an eviction's) saw it first
                    continue
                node.recovering = True
                self.spawn(self._agent_lost(node))
                continue
            except Exception as exc:  # unavailable for now (cut off?): ask again next time
                log.debug("poll of %s: %s", node.name, type(exc).__name__)
                continue
            node.last_seen = now
            node.update(polled)
            if not node.reachable:
                node.reachable = True
                log.warning("node %s answers again: it takes models again", node.name)
                if self.on_change:
                    self.on_change()
            self._stop_stale(node, polled.get("live", {}))

    def _mark_unreachable(self, node: Node, silent: float) -> None:
        """No answer from the node's agent: its runners are lost to the gateway (placed elsewhere),
        though they may still run there; they are stopped once it answers again."""
        node.reachable = False
        log.warning("node %s unreachable: no answer from its agent for %.1f s; %d runner(s) lost",
                    node.name, silent, len(node.runners))  # fmt: skip
        for runner in list(node.runners.values()):
            runner.lost(f"node {node.name} is unreachable (no answer for {silent:.0f} s)")
        node.runners.clear()
        if self.on_change:
            self.on_change()

    def _stop_stale(self, node: Node, live: dict[int, str]) -> None:
        """Stop the runners a node still has that the gateway gave up on (it was cut off, or their
        spawn came through after the launch had gone elsewhere): no model served twice, no memory
        held by runners nobody uses."""
        known = {r.tag for r in node.runners.values()} | node.spawning
        node.stopping &= set(live)
        for pid, tag in live.items():
            if tag not in known and pid not in node.stopping:
                node.stopping.add(pid)
                log.warning("stopping stale runner %s on %s (given up while the node was cut off)",
                            pid, node.name)  # fmt: skip
                node.agent.stop.remote(pid, STALE_GRACE)

    async def _agent_lost(self, node: Node) -> None:
        """The node's agent died, and its runners with it. While Ray still lists the node, a new agent
        is started there first, so that the lost replicas can be placed on that node again (a
        replica pinned to it with worker_ip, too); then the runners are marked lost."""
        import ray

        try:
            alive = {n["NodeID"] for n in await asyncio.to_thread(ray.nodes) if n.get("Alive")}
            if node.node_id in alive:
                await asyncio.wait_for(self._add(node.node_id, node.name, node.ip), AGENT_RESTART_TIMEOUT)
        except Exception as exc:  # the node is going away too: the next look at ray.nodes() retries
            log.warning("could not start a new agent on %s: %s", node.name, type(exc).__name__)
        self._mark_dead(node, "lost its agent")
        if self.on_change:
            self.on_change()

    async def watch(self) -> None:
        """Runs for the life of the gateway; a failed look is logged and the next one goes on."""
        last_nodes = 0.0
        while True:
            try:
                if time.monotonic() - last_nodes >= POLL_NODES:
                    last_nodes = time.monotonic()
                    await self.refresh_nodes()
                await self.poll_agents()
            except Exception as exc:
                log.warning("could not read the Ray nodes: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(POLL_AGENTS)

    def snapshot(self) -> Snapshot:
        """Every alive node's devices and its runners' use, as of the last poll."""
        alive = [n for n in self.nodes.values() if n.usable]
        return Snapshot(
            [d for n in alive for d in n.devices],
            {key: used for n in alive for key, used in n.gpu_usage.items()},
            {(f"{n.name}/cpu", pid): rss for n in alive for pid, rss in n.rss.items()},
            taken=time.monotonic(),
        )

    async def stage(
        self, node: Node, path: Path, seen: Callable[[files.CopyProgress], None] = lambda _: None
    ) -> str:
        """The path `node` loads a local-path model from; copies the files there when it lacks them.
        `seen` is handed the copy's progress (also when another launch's copy of the same files to
        the same node is under way: this one waits for it)."""
        m = await asyncio.to_thread(files.manifest, path)
        key = (node.name, m.key)
        if key in self._copying:
            seen(self._copying[key])
        async with self._copies.setdefault(key, asyncio.Lock()):
            found = await self.call(node, node.agent.find_files.remote(m), timeout=60)
            if found is not None:
                return str(found)
            copying = files.CopyProgress(node.name, m.root, m.total_bytes)
            with files.tracked(self._copying, key, copying) as progress:
                seen(progress)
                log.info("copying %s (%d bytes) to %s", m.root, m.total_bytes, node.name)
                copied = await asyncio.to_thread(self._copy, node, m, progress)
            assert progress.ended is not None
            took = progress.ended - progress.started
            log.info("copied %s to %s in %.1f s (%.0f MiB/s)", m.root, node.name, took,
                     m.total_bytes / 2**20 / max(took, 1e-6))  # fmt: skip
            progress.path = copied
            await self._relist(node)
            return copied

    async def _relist(self, node: Node) -> None:
        """Read the node's model cache again (GET /v1/workers shows it)."""
        try:
            cached = await self.call(node, node.agent.cached.remote(), timeout=30)
            node.cache, node.hub_cache = cached["copies"], cached["hub"]
        except Exception as exc:  # the listing is for show; the files are there
            log.info("listing the model cache on %s: %s", node.name, type(exc).__name__)

    async def fetch_hub(
        self,
        node: Node,
        hub: HubLaunch,
        gateway_path: str | None,
        seen: Callable[[files.CopyProgress], None] = lambda _: None,
    ) -> str:
        """The path `node` loads a hub model from: its own cache, the gateway's files seen in place
        there (`gateway_path`, when the gateway has them), or the hub, downloaded by the node itself;
        only a node that cannot reach the hub gets the gateway's copy (stage). `seen` is handed the
        progress, as stage's."""
        want = hub.files
        key = (node.name, f"hub:{want.key}")
        if key in self._fetching:
            seen(self._fetching[key])
        async with self._copies.setdefault(key, asyncio.Lock()):
            m = await asyncio.to_thread(files.manifest, Path(gateway_path)) if gateway_path else None
            fetching = files.CopyProgress(node.name, want.name, want.total, "hub")
            with files.tracked(self._fetching, key, fetching) as progress:
                seen(progress)
                ref = node.agent.fetch_hub.remote(want, m)
                call = asyncio.ensure_future(self.call(node, ref, DOWNLOAD_TIMEOUT))
                while not call.done():
                    await asyncio.wait({call}, timeout=DOWNLOAD_PROGRESS)
                    progress.done = node.downloads.get(want.key, progress.done)
                path, how, why = call.result()
            assert progress.ended is not None
            if path is not None:
                progress.via = "hub" if how == "hub" else "cache"
                progress.done, progress.path = want.total, path
                if how == "hub":
                    took = progress.ended - progress.started
                    log.info("%s downloaded %s from the hub in %.1f s", node.name, want.name, took)
                    await self._relist(node)
                return str(path)
            if how != "unreachable":
                progress.error = why
                raise LaunchFailed(f"on {node.name}: {why}")
        log.warning("%s cannot reach the hub (%s): it gets the gateway's copy of %s",
                    node.name, why, want.name)  # fmt: skip
        # shown while the gateway downloads the files first, when it lacks them (the model's `download`)
        waiting = files.CopyProgress(node.name, want.name, want.total, "gateway")
        seen(waiting)
        path = await self.stage(node, Path(gateway_path or await hub.gateway_path()), seen)
        if waiting.ended is None:  # no copy after all: the node sees the gateway's files in place
            waiting.via, waiting.done, waiting.path = "cache", want.total, path
            waiting.ended = time.monotonic()
        return path

    def _copy(self, node: Node, m: files.Manifest, progress: files.CopyProgress) -> str:
        """Chunk by chunk through Ray's object store, a few chunks in flight (runs in a thread);
        `progress` counts the bytes the node has written."""
        import ray

        pending: list[tuple[Any, int]] = []
        for rel, offset, data in files.chunks(m):
            pending.append((node.agent.write_chunk.remote(m, rel, offset, ray.put(data)), len(data)))
            if len(pending) >= COPY_IN_FLIGHT:
                ref, size = pending.pop(0)
                self.wait(node, ref, timeout=300)
                progress.done += size
        for ref, size in pending:
            self.wait(node, ref, timeout=300)
            progress.done += size
        return str(self.wait(node, node.agent.finish_files.remote(m), timeout=300))

    def node_of(self, device_id: str) -> Node:
        name, _ = split_device(device_id)
        node = self.nodes.get(name or "")
        if node is None or not node.alive:
            raise NodeLost(f"node {name} is not in the cluster")
        if not node.reachable:
            raise NodeLost(f"node {name} is unreachable")
        return node

    def matches(self, node_name_: str | None, worker_ip: str) -> bool:
        node = self.nodes.get(node_name_ or "")
        return node is not None and worker_ip in (node.ip, node.name, node.node_id)

    def runner(
        self,
        device_id: str,
        config: RunnerConfig,
        env: dict[str, str],
        log_name: str,
        cores: tuple[int, ...],
        hub: HubLaunch | None = None,
    ) -> RemoteRunner:
        return RemoteRunner(self, self.node_of(device_id), config, env, log_name, cores, hub)

    def restrict(self, demand: Demand, worker_ip: str | None, states: list[DeviceState]) -> Demand:
        """gpu_idx means that index on any node (or on the worker_ip node); other replicas of the
        model steer this one to other nodes."""
        allowed = demand.allowed
        if worker_ip is not None or allowed is not None:
            allowed = tuple(
                s.id
                for s in states
                if (worker_ip is None or self.matches(split_device(s.id)[0], worker_ip))
                and (demand.allowed is None or split_device(s.id)[1] in demand.allowed)
            )
            if not allowed:
                allowed = (f"(no node matches worker_ip {worker_ip})",)
        nodes = {split_device(d)[0] for d in demand.avoid}
        avoid = frozenset(s.id for s in states if split_device(s.id)[0] in nodes)
        return replace(demand, allowed=allowed, avoid=avoid)

    def workers(self, runners: int = 0) -> list[dict[str, Any]]:
        copying: dict[str, list[dict[str, Any]]] = {}
        downloading: dict[str, list[dict[str, Any]]] = {}
        for (name, _), progress in self._copying.items():
            copying.setdefault(name, []).append(progress.progress())
        for (name, _), progress in self._fetching.items():
            downloading.setdefault(name, []).append(progress.progress())
        return [
            {**n.describe(), "copying": copying.get(n.name, []), "downloading": downloading.get(n.name, [])}
            for n in self.nodes.values()
        ]

    async def remove_hub(
        self, hub: str, repo: str, copies_of: str, dry_run: bool = False
    ) -> list[dict[str, Any]]:
        """Each node's report (NodeAgent.remove_hub), its runners named by uid where the gateway
        knows them; a node cut off or gone keeps its files ("unreachable")."""

        async def one(node: Node) -> dict[str, Any]:
            shown: dict[str, Any] = {"node": node.name}
            if not node.usable:
                return {**shown, "status": "unreachable"}
            try:
                ref = node.agent.remove_hub.remote(hub, repo, copies_of, dry_run)
                report: dict[str, Any] = await self.call(node, ref, timeout=120)
            except Exception as exc:
                return {**shown, "status": "unreachable", "error": f"{type(exc).__name__}: {exc}"}
            if report["status"] == "removed":
                await self._relist(node)
            uids = [node.runners[pid].config.model_uid for pid in report["pids"] if pid in node.runners]
            return {**shown, **report, "model_uids": uids}

        return list(await asyncio.gather(*(one(n) for n in self.nodes.values() if n.alive)))

    async def shutdown(self) -> None:
        """Each agent stops its runners and removes its folder, then goes."""
        import ray

        for task in list(self._tasks):
            task.cancel()
        alive = [n for n in self.nodes.values() if n.alive]
        refs = [n.agent.close.remote() for n in alive]
        try:
            await asyncio.to_thread(ray.wait, refs, num_returns=len(refs), timeout=15)
        except Exception as exc:
            log.warning("closing the node agents: %s", exc)
        for node in self.nodes.values():
            try:
                ray.kill(node.agent)
            except Exception:
                pass
        await asyncio.to_thread(ray.shutdown)
