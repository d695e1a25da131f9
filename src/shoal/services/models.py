"""The model service: launch, describe, terminate, route to a ready replica, and supervise runners.

It owns all mutable state about running models. Launches reserve memory through the pure
scheduler (one placement at a time, under a lock, so two launches never take the same bytes);
one supervisor loop watches runner processes (restarting crashed replicas with capped backoff)
and samples each runner's real memory use into the ledger.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from shoal import metrics
from shoal.catalog import Catalog, ModelFamily, ModelSpec, Source, default_engine
from shoal.catalog.resolve import local_path
from shoal.cluster import NodeLost, RayCluster, RemoteRunner, split_device
from shoal.engines import registry
from shoal.errors import (
    Conflict,
    InsufficientMemory,
    InvalidRequest,
    LaunchFailed,
    ModelNotFound,
    ModelUnavailable,
    ShoalError,
)
from shoal.protocol.admin import EstimateRequest, LaunchRequest
from shoal.runners.config import RunnerConfig
from shoal.runners.process import ReplicaState, RunnerProcess
from shoal.scheduler import (
    Decision,
    Demand,
    DeviceState,
    Evict,
    Holding,
    NoFit,
    Place,
    Policy,
    node_of,
    place,
)
from shoal.services import memory
from shoal.services.memory import Reservation, Snapshot
from shoal.services.plan import LaunchPlan, keep_alive_seconds, plan_launch
from shoal.settings import ServerSettings
from shoal.state import StateStore

log = logging.getLogger("shoal.models")

SUPERVISOR_TICK = 0.2  # seconds between checks of runner processes
MEASURE_EVERY = 10  # ticks between samples of each runner's memory use
FAST_CRASH = 60.0  # a replica that dies sooner than this after becoming ready counts as a fast crash
MAX_BACKOFF = 30.0
MEMORY_BACK_TIMEOUT = 30.0  # seconds to wait for an evicted runner's GPU memory to show as free
HOLDS_MEMORY = (ReplicaState.STARTING, ReplicaState.READY, ReplicaState.RESTARTING, ReplicaState.STOPPING)
# Engines that take the reservation as a fraction of the GPU (torch's per-process cap; vLLM's
# gpu_memory_utilization).
FRACTION_ENGINES = (
    "sentence_transformers",
    "transformers",
    "cross_encoder",
    "embedding_rerank",
    "diffusers",
    "vllm",
)


@dataclass
class Replica:
    index: int
    runner: RunnerProcess | RemoteRunner | None = None
    state: ReplicaState = ReplicaState.STARTING
    reservation: Reservation | None = None
    in_flight: int = 0
    crashes: int = 0  # consecutive fast crashes
    last_error: str | None = None
    ready_since: float | None = None
    last_used: float = field(default_factory=time.monotonic)

    def describe(self) -> dict[str, Any]:
        r = self.reservation
        return {
            "index": self.index,
            "state": self.state.value,
            "pid": self.runner.pid if self.runner else None,
            "node": split_device(r.devices[0])[0] if r and r.devices else None,
            "device": ",".join(r.devices) if r else None,
            "cores": list(r.cores) if r else [],
            "estimate_bytes": r.estimate if r else None,
            "measured_bytes": r.measured if r else None,
            "reserved_bytes": r.reserved if r else None,
            "over_reservation": r.over if r else False,
            "in_flight": self.in_flight,
            "idle_seconds": round(time.monotonic() - self.last_used, 1),
            "restarts": self.crashes,
            "last_error": self.last_error,
        }


@dataclass
class RunningModel:
    uid: str
    family: ModelFamily
    spec: ModelSpec
    engine: str
    source: Source
    request: LaunchRequest
    plan: LaunchPlan
    keep_alive: float
    replicas: list[Replica]
    created: int = field(default_factory=lambda: int(time.time()))
    preferred: list[list[str]] = field(default_factory=list)  # per replica: where it ran before a restart
    waiting: int = 0  # requests queued for a free slot under request_limits
    _limiter: asyncio.Semaphore | None = None
    _turn: Iterator[int] = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        if self.request.request_limits:
            self._limiter = asyncio.Semaphore(self.request.request_limits)

    @property
    def status(self) -> str:
        states = {r.state for r in self.replicas}
        if ReplicaState.READY in states:
            return "ready"
        if states & {ReplicaState.STARTING, ReplicaState.RESTARTING}:
            return "loading"
        if ReplicaState.FAILED in states:
            return "failed"
        if ReplicaState.EVICTED in states:
            return "evicted"
        return "stopped"

    def describe(self) -> dict[str, Any]:
        return {
            "model_uid": self.uid,
            "id": self.uid,
            "model_name": self.family.model_name,
            "model_type": self.family.model_type,
            "model_ability": self.family.model_ability,
            "model_engine": self.engine,
            "model_format": self.spec.model_format,
            "model_size_in_billions": self.spec.model_size_in_billions,
            "quantization": self.spec.quantization,
            "context_length": self.family.context_length,
            "dimensions": self.family.dimensions,
            "replica": len(self.replicas),
            "status": self.status,
            "created": self.created,
            "pinned": self.request.pinned,
            "request_limits": self.request.request_limits,
            "waiting": self.waiting,
            "keep_alive": self.keep_alive,
            "estimate": self.plan.breakdown,
            "replicas": [r.describe() for r in self.replicas],
        }


@functools.cache
def local_names() -> frozenset[str]:
    """What worker_ip may say on one machine (as Xinference's local worker): "local", loopback, the
    host's name, or one of its addresses."""
    names = {"local", "localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn()}
    try:
        names.update(str(info[4][0]) for info in socket.getaddrinfo(socket.gethostname(), None))
    except OSError:
        pass
    return frozenset(str(name) for name in names)


class ModelService:
    def __init__(self, catalog: Catalog, settings: ServerSettings, store: StateStore) -> None:
        self.catalog = catalog
        self.store = store
        self.settings = settings
        self.policy = Policy(settings.placement, settings.headroom)  # type: ignore[arg-type]
        self._models: dict[str, RunningModel] = {}
        self._logs = settings.data_dir / "logs"
        self._logs.mkdir(parents=True, exist_ok=True)
        # Unix socket paths are limited to 107 bytes, so sockets live in a short temp dir.
        self._run_dir = Path(tempfile.mkdtemp(prefix="shoal-"))
        self._spawned = itertools.count()
        self._tasks: set[asyncio.Task[None]] = set()
        self._placing = asyncio.Lock()  # one placement decision at a time
        self._freed = asyncio.Event()  # set whenever memory is given back (for queued launches)
        # Ray mode: devices, runners and node membership come from the cluster's node agents.
        self.cluster = RayCluster(settings.ray_address, self._freed.set) if settings.ray_address else None

    async def start(self) -> None:
        """Join the Ray cluster (Ray mode); on one machine there is nothing to start."""
        if self.cluster is not None:
            await self.cluster.start()
            self._spawn_task(self.cluster.watch())

    def _read(self) -> Snapshot:
        """Devices now (reads NVML: call it off the event loop). Ray mode: every alive node's."""
        if self.cluster is not None:
            return self.cluster.snapshot()
        return memory.read(self.settings.fake_gpus)

    def workers(self) -> list[dict[str, Any]]:
        """GET /v1/workers: the nodes (one, "local", on a single machine)."""
        if self.cluster is not None:
            return self.cluster.workers()
        devices = [d.id for d in memory.read(self.settings.fake_gpus).devices]
        runners = sum(len(m.replicas) for m in self._models.values())
        local = {"node": "local", "node_id": None, "worker_ip": "127.0.0.1", "alive": True}
        return [{**local, "devices": devices, "runners": runners}]

    # ---- queries ---------------------------------------------------------------------------
    def get(self, uid: str) -> RunningModel:
        model = self._models.get(uid)
        if model is None:
            raise ModelNotFound(f"model {uid!r} is not running (see GET /v1/models)")
        return model

    def running(self) -> list[RunningModel]:
        return list(self._models.values())

    async def checkout(self, uid: str) -> Replica:
        """A ready replica for one request: the least busy, round-robin among equals. Under the
        model's request_limits, waits for a slot in a queue of at most max_queue; past it, 503.
        Every checkout is paired with release() when the request ends."""
        model = self.get(uid)
        self._ready_replicas(model)  # fail fast, before queueing, when none is ready
        if model._limiter is not None:
            if model._limiter.locked() and model.waiting >= model.request.max_queue:
                raise ModelUnavailable(
                    f"model {uid!r} is at its limit of {model.request.request_limits} requests at once "
                    f"with {model.waiting} queued (max_queue {model.request.max_queue}); retry shortly",
                    retry_after=1,
                )
            model.waiting += 1
            try:
                await model._limiter.acquire()
            finally:
                model.waiting -= 1
        try:
            ready = self._ready_replicas(model)
        except ModelUnavailable:
            if model._limiter is not None:
                model._limiter.release()
            raise
        turn = next(model._turn)
        replica = min(ready, key=lambda r: (r.in_flight, (r.index - turn) % len(model.replicas)))
        replica.in_flight += 1
        replica.last_used = time.monotonic()
        return replica

    def release(self, uid: str, replica: Replica) -> None:
        replica.in_flight -= 1
        replica.last_used = time.monotonic()
        model = self._models.get(uid)
        if model is not None and model._limiter is not None:
            model._limiter.release()

    def queue_depth(self) -> dict[str, int]:
        return {uid: m.waiting for uid, m in self._models.items()}

    def _ready_replicas(self, model: RunningModel) -> list[Replica]:
        uid = model.uid
        ready = [r for r in model.replicas if r.state is ReplicaState.READY]
        if not ready:
            if model.status == "failed":
                errors = "; ".join(r.last_error or "unknown" for r in model.replicas)
                raise ModelUnavailable(f"model {uid!r} failed: {errors}", retry_after=30)
            if model.status == "evicted":
                raise ModelUnavailable(
                    f"model {uid!r} was evicted to make room for another model; launch it again "
                    "(or run the server with --autoload to reload it on demand)",
                    retry_after=30,
                )
            raise ModelUnavailable(f"model {uid!r} is loading or restarting; retry shortly", retry_after=2)
        return ready

    # ---- launch / terminate ----------------------------------------------------------------
    def _resolve(
        self,
        name: str,
        model_type: str | None,
        model_format: str | None,
        quantization: str | None,
        size: Any,
        model_engine: str | None,
        model_path: str | None,
    ) -> tuple[ModelFamily, ModelSpec, str, Source]:
        family = self.catalog.get(name, model_type)
        try:
            spec = family.pick_spec(model_format, quantization, size)
        except LookupError as exc:
            raise InvalidRequest(str(exc)) from exc
        engine_name = model_engine or default_engine(family.model_type, spec.model_format)
        if engine_name is None:
            raise InvalidRequest(f"no engine serves format {spec.model_format!r}; name one in model_engine")
        engine = registry.canonical(engine_name, spec.model_format)
        registry.check_installed(engine)
        assert spec.source is not None
        source = Source(path=model_path) if model_path else spec.source
        local_path(source)  # a missing package or path fails here, with the fix, before any spawn
        return family, spec, engine, source

    async def _plan(
        self,
        request: LaunchRequest | EstimateRequest,
        engine: str,
        family: ModelFamily,
        spec: ModelSpec,
        source: Source,
    ) -> LaunchPlan:
        snapshot = await asyncio.to_thread(self._read)
        options = (
            request.engine_options()
            if isinstance(request, LaunchRequest)
            else dict(request.model_extra or {})
        )
        return await asyncio.to_thread(
            plan_launch,
            request,
            engine,
            family,
            spec,
            source,
            snapshot.devices,
            self.settings.cpu_cores_per_model,
            options,
        )

    async def launch(
        self, request: LaunchRequest, wait: bool = True, preferred: list[list[str]] | None = None
    ) -> RunningModel:
        family, spec, engine, source = self._resolve(
            request.model_name,
            request.model_type,
            request.model_format,
            request.quantization,
            request.model_size_in_billions,
            request.model_engine,
            request.model_path,
        )
        uid = request.model_uid or family.model_name
        if uid in self._models:
            raise Conflict(f"model uid {uid!r} is already in use; terminate it or pick another model_uid")
        keep_alive = keep_alive_seconds(request.keep_alive, self.settings.keep_alive)
        plan = await self._plan(request, engine, family, spec, source)
        if uid in self._models:  # taken while the estimate was read
            raise Conflict(f"model uid {uid!r} is already in use; terminate it or pick another model_uid")
        replicas = [Replica(i) for i in range(request.replica)]
        model = RunningModel(uid, family, spec, engine, source, request, plan, keep_alive, replicas,
                             preferred=preferred or [])  # fmt: skip
        self._models[uid] = model
        # Desired state first: a server that restarts mid-launch brings the model back.
        self.store.save_model(uid, request.model_dump(mode="json", exclude_none=True) | {"model_uid": uid})
        if not wait:  # the caller polls GET /v1/models/{uid}; a failure stays visible there
            self._spawn_task(self._bring_up(model, model.replicas, forget_on_failure=False))
            return model
        await self._bring_up(model, model.replicas, forget_on_failure=True)
        return model

    async def restore(self) -> None:
        """After a restart: launch every model of the desired state again, same uid and settings,
        on the devices it had where it still fits."""
        for saved in self.store.models():
            if saved.uid in self._models:
                continue
            try:
                request = LaunchRequest.model_validate(saved.request)
                # Registered at once (status loading, so /ready waits), loaded in the background.
                await self.launch(request, wait=False, preferred=saved.devices)
                log.info("restoring %s", saved.uid)
            except ShoalError as exc:
                log.error("could not restore %s: %s", saved.uid, exc.message)

    async def _bring_up(self, model: RunningModel, replicas: list[Replica], forget_on_failure: bool) -> None:
        """Reserve memory for each replica (evicting or queueing as needed), then start them all."""
        try:
            for replica in replicas:
                replica.state = ReplicaState.STARTING
                await self._reserve(model, replica)
        except ShoalError as exc:
            await self._fail(model, exc.message, forget_on_failure)
            raise
        await asyncio.gather(*(self._start(model, r) for r in replicas))
        failed = [r for r in replicas if r.state is ReplicaState.FAILED]
        if failed:
            reason = f"could not launch {model.uid!r}: {failed[0].last_error}"
            await self._fail(model, reason, forget_on_failure)
            raise LaunchFailed(reason)

    async def _fail(self, model: RunningModel, reason: str, forget: bool) -> None:
        await self._stop_model(model)
        for replica in model.replicas:
            replica.state, replica.last_error = ReplicaState.FAILED, replica.last_error or reason
        if forget and self._models.get(model.uid) is model:
            del self._models[model.uid]
            self.store.delete_model(model.uid)

    # ---- memory ------------------------------------------------------------------------------
    def _holdings(self) -> list[Holding]:
        holdings = []
        for model in self._models.values():
            for replica in model.replicas:
                r = replica.reservation
                if r is None or replica.state not in HOLDS_MEMORY:
                    continue
                idle_since = (
                    replica.last_used
                    if replica.in_flight == 0 and replica.state is ReplicaState.READY
                    else None
                )
                for i, device in enumerate(r.devices):
                    holdings.append(
                        Holding(
                            f"{model.uid}/{replica.index}",
                            device,
                            r.reserved,
                            replica.last_used,
                            idle_since,
                            model.keep_alive,
                            model.request.pinned,
                            r.cores if i == 0 else (),
                        )
                    )
        return holdings

    def _shoal_use(self, snapshot: Snapshot) -> dict[str, int]:
        """Per device, what Shoal's own runners are measured to use (so it is not counted as others')."""
        use: dict[str, int] = {}
        by_id = {d.id: d for d in snapshot.devices}
        for model in self._models.values():
            for replica in model.replicas:
                pid = replica.runner.pid if replica.runner else None
                for device_id in replica.reservation.devices if replica.reservation else ():
                    measured = snapshot.measure(by_id[device_id], pid) if device_id in by_id else None
                    use[device_id] = use.get(device_id, 0) + (measured or 0)
        return use

    def _blocked_reasons(self) -> dict[str, str]:
        reasons = {}
        for model in self._models.values():
            for replica in model.replicas:
                key = f"{model.uid}/{replica.index}"
                if model.request.pinned:
                    reasons[key] = "pinned"
                elif replica.in_flight or replica.state is not ReplicaState.READY:
                    reasons[key] = "busy" if replica.in_flight else replica.state.value
                elif model.keep_alive < 0:
                    reasons[key] = "keep_alive -1"
                else:
                    idle = time.monotonic() - replica.last_used
                    reasons[key] = f"idle {idle:.0f} s of keep_alive {model.keep_alive:.0f} s"
        return reasons

    async def _decide(self, model: RunningModel, replica: Replica) -> tuple[Decision, Snapshot]:
        snapshot = await asyncio.to_thread(self._read)
        states = memory.device_states(snapshot, self._shoal_use(snapshot))
        others = frozenset(
            d for r in model.replicas if r is not replica and r.reservation for d in r.reservation.devices
        )
        plan = model.plan
        demand = Demand(plan.per_device, plan.kind, plan.n_devices, plan.allowed, plan.cores, others)
        if self.cluster is not None:
            demand = self._cluster_demand(demand, model, states)
        elif model.request.worker_ip is not None and model.request.worker_ip not in local_names():
            demand = replace(demand, allowed=(f"(no node matches worker_ip {model.request.worker_ip})",))
        holdings, now = self._holdings(), time.monotonic()
        if self.cluster is not None and plan.n_devices > 1:
            return self._place_on_one_node(demand, states, holdings, now), snapshot
        before = model.preferred[replica.index] if replica.index < len(model.preferred) else []
        if before and len(before) == plan.n_devices and demand.allowed is None:
            # Restored after a restart: where it ran before, if it still fits there without evicting.
            again = place(replace(demand, allowed=tuple(before)), states, holdings, self.policy, now)
            if isinstance(again, Place):
                return again, snapshot
        return place(demand, states, holdings, self.policy, now), snapshot

    def _cluster_demand(self, demand: Demand, model: RunningModel, states: list[DeviceState]) -> Demand:
        """Ray mode: gpu_idx means that index on any node (or on the worker_ip node); other replicas
        of the model steer this one to other nodes."""
        assert self.cluster is not None
        worker_ip = model.request.worker_ip
        allowed = demand.allowed
        if worker_ip is not None or allowed is not None:
            allowed = tuple(
                s.id
                for s in states
                if (worker_ip is None or self.cluster.matches(split_device(s.id)[0], worker_ip))
                and (demand.allowed is None or split_device(s.id)[1] in demand.allowed)
            )
            if not allowed:
                allowed = (f"(no node matches worker_ip {worker_ip})",)
        nodes = {split_device(d)[0] for d in demand.avoid}
        avoid = frozenset(s.id for s in states if split_device(s.id)[0] in nodes)
        return replace(demand, allowed=allowed, avoid=avoid)

    def _place_on_one_node(
        self, demand: Demand, states: list[DeviceState], holdings: list[Holding], now: float
    ) -> Decision:
        """A replica that spans several GPUs keeps them on one node."""
        by_node: dict[str | None, list[str]] = {}
        for s in states:
            by_node.setdefault(split_device(s.id)[0], []).append(s.id)
        fallback: Decision | None = None
        for ids in by_node.values():
            allowed = tuple(i for i in ids if demand.allowed is None or i in demand.allowed)
            decision = place(replace(demand, allowed=allowed), states, holdings, self.policy, now)
            if isinstance(decision, Place):
                return decision
            if isinstance(decision, Evict) and fallback is None:
                fallback = decision
        if fallback is not None:
            return fallback
        anywhere = place(demand, states, holdings, self.policy, now)
        if isinstance(anywhere, NoFit):
            return anywhere
        reason = f"no single node has {demand.n_devices} devices with room"
        return NoFit(demand.per_device, demand.n_devices, (), reason)

    async def _reserve(self, model: RunningModel, replica: Replica) -> None:
        deadline = time.monotonic() + model.request.queue_timeout
        while True:
            async with self._placing:
                decision, snapshot = await self._decide(model, replica)
                if isinstance(decision, Evict):
                    await self._evict(decision.victims, for_uid=model.uid)
                    continue
                if isinstance(decision, Place):
                    totals = [d.total_bytes for d in snapshot.devices if d.id in decision.devices]
                    replica.reservation = Reservation(
                        decision.devices,
                        model.plan.per_device,
                        model.plan.breakdown,
                        decision.cores,
                        device_total=min(totals, default=0),
                    )
                    self.store.save_devices(
                        model.uid,
                        [list(r.reservation.devices) if r.reservation else [] for r in model.replicas],
                    )
                    return
                assert isinstance(decision, NoFit)
                if time.monotonic() >= deadline:
                    message = memory.explain(model.uid, decision, self._holdings(), self._blocked_reasons())
                    raise InsufficientMemory(message, memory.nofit_details(decision))
                self._freed.clear()
            try:  # queued: try again when memory is given back, or at least every second
                await asyncio.wait_for(self._freed.wait(), timeout=min(1.0, deadline - time.monotonic()))
            except TimeoutError:
                pass

    async def _evict(self, victims: tuple[str, ...], for_uid: str) -> None:
        """Stop these replicas and wait until their memory is really back."""
        stopped = []
        for key in victims:
            uid, _, index = key.rpartition("/")
            model = self._models[uid]
            replica = model.replicas[int(index)]
            log.info(
                "evicting %s (idle %.0f s) to make room for %s",
                key,
                time.monotonic() - replica.last_used,
                for_uid,
            )
            replica.state = ReplicaState.EVICTED
            metrics.EVICTIONS.labels(uid).inc()
            stopped.extend(self._runner_ids(replica))
            if replica.runner:
                await replica.runner.stop()
            replica.reservation = None
        await self._memory_back(stopped)

    @staticmethod
    def _runner_ids(replica: Replica) -> list[tuple[str, int]]:
        """(node, pid) of the replica's runner: pids are only unique per node ("" on one machine)."""
        r, pid = replica.reservation, replica.runner.pid if replica.runner else None
        return [(node_of(r.devices[0]), pid)] if r and r.devices and pid is not None else []

    async def _memory_back(self, stopped: list[tuple[str, int]]) -> None:
        """After a stop: wait until NVML (here, or on the runner's node) no longer lists the runners
        (fake GPUs and the CPU: at once)."""
        if self.settings.fake_gpus or not stopped:
            return
        deadline = time.monotonic() + MEMORY_BACK_TIMEOUT
        while time.monotonic() < deadline:
            if self.cluster is not None:
                await self.cluster.poll_agents()  # fresh, not the last poll's view
            usage = await asyncio.to_thread(self._read)
            if not any((node_of(device), pid) in stopped for device, pid in usage.gpu_usage):
                return
            await asyncio.sleep(0.2)
        log.warning("GPU memory of runners %s still in use after %.0f s", stopped, MEMORY_BACK_TIMEOUT)

    async def estimate(self, request: EstimateRequest) -> dict[str, Any]:
        """The estimate and where it would go now, without launching anything."""
        if request.model_name is None:
            raise InvalidRequest("model_name is required (a catalog name)")
        family, spec, engine, source = self._resolve(
            request.model_name,
            None,
            request.model_format,
            request.quantization,
            request.model_size_in_billions,
            request.model_engine,
            None,
        )
        plan = await self._plan(request, engine, family, spec, source)
        probe = RunningModel(
            "(estimate)",
            family,
            spec,
            engine,
            source,
            LaunchRequest(model_name=family.model_name, worker_ip=request.worker_ip),
            plan,
            self.settings.keep_alive,
            [Replica(0)],
        )
        async with self._placing:
            decision, _ = await self._decide(probe, probe.replicas[0])
        where: dict[str, Any]
        if isinstance(decision, Place):
            where = {
                "fits": True,
                "devices": list(decision.devices),
                "evict": [],
                "cores": list(decision.cores),
            }
        elif isinstance(decision, Evict):
            where = {"fits": True, "devices": list(decision.then.devices), "evict": list(decision.victims)}
        else:
            where = {
                "fits": False,
                "reason": memory.explain(family.model_name, decision, [], self._blocked_reasons()),
                **memory.nofit_details(decision),
            }
        return {
            "model_name": family.model_name,
            "model_engine": engine,
            "device_kind": plan.kind,
            "n_devices": plan.n_devices,
            "estimate": plan.breakdown,
            "placement": where,
        }

    async def devices(self) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.devices_now)

    def devices_now(self) -> list[dict[str, Any]]:
        """Each device with each replica's share (reads NVML: call it off the event loop)."""
        snapshot = self._read()
        states = memory.device_states(snapshot, self._shoal_use(snapshot))
        holdings = self._holdings()
        per_replica = {}
        for model in self._models.values():
            for replica in model.replicas:
                per_replica[f"{model.uid}/{replica.index}"] = {
                    "model_uid": model.uid,
                    "model_type": model.family.model_type,
                    **replica.describe(),
                    "breakdown": model.plan.breakdown,
                }
        return memory.device_report(states, snapshot, holdings, per_replica, self.policy)

    def _measure(self, snapshot: Snapshot) -> None:
        by_id = {d.id: d for d in snapshot.devices}
        for model in self._models.values():
            for replica in model.replicas:
                r = replica.reservation
                if r is None or replica.runner is None or replica.state is not ReplicaState.READY:
                    continue
                seen = [snapshot.measure(by_id[d], replica.runner.pid) for d in r.devices if d in by_id]
                values = [v for v in seen if v is not None]
                if values:
                    was_over = r.over
                    r.measured = max(r.measured or 0, *values)
                    if r.over and not was_over:  # once, when it first goes over; metrics keep the rest
                        log.warning(
                            "%s/%d uses %d bytes, over its reservation of %d",
                            model.uid,
                            replica.index,
                            r.measured,
                            r.estimate,
                        )

    # ---- runners -----------------------------------------------------------------------------
    async def _start(self, model: RunningModel, replica: Replica) -> None:
        """Spawn one runner on its reservation and wait until it answers; on failure record why."""
        assert replica.reservation is not None
        n = next(self._spawned)
        reservation, plan = replica.reservation, model.plan
        real_gpu = plan.kind == "gpu" and not plan.fake
        options = {k: v for k, v in model.request.engine_options().items() if k != "n_threads"}
        if real_gpu and model.engine in FRACTION_ENGINES and reservation.device_total:
            # torch enforces the share: an allocation past it raises OutOfMemoryError in this runner only
            options["memory_fraction"] = min(1.0, reservation.reserved / reservation.device_total)
        config = RunnerConfig(
            model_uid=model.uid,
            replica=replica.index,
            engine=model.engine,
            model_format=model.spec.model_format,
            source=model.source,
            context_length=model.family.context_length,
            device="cuda" if real_gpu else "cpu",
            n_threads=len(reservation.cores) or model.request.engine_options().get("n_threads"),
            options=options,
            socket="" if self.cluster else str(self._run_dir / f"r{n}.sock"),
            status_file=str(self._run_dir / f"r{n}.status"),
        )
        env = dict(model.request.envs or {})
        env["CUDA_VISIBLE_DEVICES"] = (
            ",".join(d.split(":")[1] for d in reservation.devices) if real_gpu else ""
        )
        runner: RunnerProcess | RemoteRunner
        if self.cluster is not None:
            try:
                log_name = f"{model.uid}-{replica.index}.log"
                runner = self.cluster.runner(reservation.devices[0], config, env, log_name, reservation.cores)
            except NodeLost as exc:
                await self._lost_while_starting(model, replica, exc)
                return
        else:
            runner = RunnerProcess(
                config, self._logs / f"{model.uid}-{replica.index}.log", env, reservation.cores
            )
        replica.runner = runner
        replica.state = ReplicaState.STARTING if replica.ready_since is None else ReplicaState.RESTARTING
        try:
            if isinstance(runner, RemoteRunner):
                await runner.start()
            else:
                runner.spawn(self._run_dir / f"r{n}.json")
            await runner.wait_ready(self.settings.launch_timeout)
        except NodeLost as exc:
            await runner.stop()
            await self._lost_while_starting(model, replica, exc)
            return
        except LaunchFailed as exc:
            await runner.stop()
            replica.state, replica.last_error = ReplicaState.FAILED, exc.message
            return
        if replica.runner is runner and replica.state not in (ReplicaState.STOPPING, ReplicaState.EVICTED):
            replica.state, replica.ready_since = ReplicaState.READY, time.monotonic()
            replica.last_used = time.monotonic()
            metrics.LAUNCHES.labels(model.uid).inc()
            log.info(
                "model %s replica %d ready on %s (pid %s)",
                model.uid,
                replica.index,
                ",".join(reservation.devices),
                runner.pid,
            )

    async def _lost_while_starting(self, model: RunningModel, replica: Replica, exc: NodeLost) -> None:
        """Its node left before the replica was ready: place it again on the nodes left."""
        log.warning("model %s replica %d lost while starting: %s", model.uid, replica.index, exc.message)
        replica.last_error = exc.message
        replica.state, replica.reservation = ReplicaState.RESTARTING, None
        self._freed.set()
        await self._replace(model, replica)

    async def ensure_ready(self, uid: str) -> None:
        """Autoload (Ollama-style): bring back an evicted model, or launch a catalog model by name;
        the request waits meanwhile."""
        model = self._models.get(uid)
        if model is None:
            try:
                self.catalog.get(uid)
            except ModelNotFound:
                return  # the request then answers 404 as usual
            try:
                await self.launch(LaunchRequest(model_name=uid))
            except Conflict:
                pass  # launched by a concurrent request
        elif model.status == "evicted":
            evicted = [r for r in model.replicas if r.state is ReplicaState.EVICTED]
            await self._bring_up(model, evicted, forget_on_failure=False)
        deadline = time.monotonic() + self.settings.launch_timeout
        while (model := self._models.get(uid)) is not None and model.status == "loading":
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)

    async def terminate(self, uid: str) -> None:
        model = self.get(uid)
        del self._models[uid]
        self.store.delete_model(uid)
        await self._stop_model(model)

    async def _stop_model(self, model: RunningModel) -> None:
        for replica in model.replicas:
            replica.state = ReplicaState.STOPPING
        stopped = [key for r in model.replicas for key in self._runner_ids(r)]
        await asyncio.gather(*(r.runner.stop() for r in model.replicas if r.runner))
        for replica in model.replicas:
            replica.state, replica.reservation = ReplicaState.STOPPED, None
        if model.plan.kind == "gpu":
            await self._memory_back(stopped)
        self._freed.set()

    # ---- supervision -------------------------------------------------------------------------
    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("background task failed: %s", task.exception())

    async def supervise(self) -> None:
        """Runs for the life of the gateway: notice dead runners, restart them, sample memory."""
        for tick in itertools.count():
            for model in list(self._models.values()):
                for replica in model.replicas:
                    runner = replica.runner
                    if replica.state is ReplicaState.READY and runner and runner.exited() is not None:
                        self._on_crash(model, replica)
            if tick % MEASURE_EVERY == 0 and self._models:
                self._measure(await asyncio.to_thread(self._read))
            await asyncio.sleep(SUPERVISOR_TICK)

    def notice_unreachable(self, uid: str, replica: Replica) -> None:
        """A request could not reach this replica: if its process is gone, handle it now, not next tick."""
        model = self._models.get(uid)
        runner = replica.runner
        if model and replica.state is ReplicaState.READY and runner and runner.exited() is not None:
            self._on_crash(model, replica)

    def _on_crash(self, model: RunningModel, replica: Replica) -> None:
        assert replica.runner is not None
        replica.last_error = replica.runner.failure_reason()
        if isinstance(replica.runner, RemoteRunner) and replica.runner.node_lost:
            # Its node left the cluster: not a crash of the model; place it again where it fits.
            log.warning("model %s replica %d lost: %s", model.uid, replica.index, replica.last_error)
            replica.state, replica.reservation = ReplicaState.RESTARTING, None
            self._spawn_task(self._replace(model, replica))
            return
        metrics.CRASHES.labels(model.uid).inc()
        lived = time.monotonic() - (replica.ready_since or 0)
        replica.crashes = replica.crashes + 1 if lived < FAST_CRASH else 1
        log.warning("model %s replica %d died: %s", model.uid, replica.index, replica.last_error)
        if replica.crashes > self.settings.max_restarts:
            replica.state, replica.reservation = ReplicaState.FAILED, None
            self._freed.set()
            return
        replica.state = ReplicaState.RESTARTING  # keeps its reservation: it comes back on the same devices
        delay = min(0.5 * 2 ** (replica.crashes - 1), MAX_BACKOFF)
        self._spawn_task(self._restart(model, replica, delay))

    async def _restart(self, model: RunningModel, replica: Replica, delay: float) -> None:
        old = replica.runner
        if old is not None:
            await old.stop()
        await asyncio.sleep(delay)
        if self._models.get(model.uid) is model and replica.state is ReplicaState.RESTARTING:
            await self._start(model, replica)

    async def _replace(self, model: RunningModel, replica: Replica) -> None:
        """A replica whose node was lost: a new placement on the nodes left, then a new runner."""
        try:
            await self._reserve(model, replica)
        except ShoalError as exc:
            replica.state, replica.last_error = ReplicaState.FAILED, f"{replica.last_error}; {exc.message}"
            return
        if self._models.get(model.uid) is model and replica.state is ReplicaState.RESTARTING:
            await self._start(model, replica)

    async def shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*(self._stop_model(m) for m in self._models.values()), return_exceptions=True)
        self._models.clear()
        if self.cluster is not None:
            await self.cluster.shutdown()
        shutil.rmtree(self._run_dir, ignore_errors=True)
