"""The model service: launch, describe, terminate and place models; it owns the running models.

It is composed of the parts it delegates to: a `Host` (where runners live: this machine or a Ray
cluster, shoal.hosts), the `Router` (which replica serves a request), the `Supervisor` (one loop
that restarts dead or hung runners and samples memory) and the ledger (what each replica holds).
Launches reserve memory through the pure scheduler, one placement at a time under a lock, so two
launches never take the same bytes. Replica states change only through `replicas.move`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import orjson

from shoal import metrics
from shoal.catalog import Catalog, ModelFamily, ModelSpec, Source, default_engine
from shoal.catalog.resolve import local_path
from shoal.catalog.weights import check_weights
from shoal.devices import Snapshot
from shoal.engines import registry
from shoal.engines.options import check_launch_options
from shoal.errors import (
    Conflict,
    HubNotFound,
    HubUnreachable,
    InsufficientMemory,
    InvalidRequest,
    LaunchFailed,
    ModelNotFound,
    NodeLost,
    ShoalError,
)
from shoal.hosts import Host, RunnerHandle
from shoal.hosts.mps import MpsControl
from shoal.hub import names as hub_names
from shoal.hub.download import HubLaunch, Pull
from shoal.hub.resolve import HubModel
from shoal.protocol.admin import EstimateRequest, LaunchRequest, PullRequest
from shoal.runners.config import RUNNER_ENV, RunnerConfig
from shoal.scheduler import (
    Decision,
    Demand,
    DeviceState,
    Evict,
    Holding,
    Move,
    NoFit,
    Place,
    Policy,
    node_of,
    place,
)
from shoal.services import ledger, parking
from shoal.services.hubs import HubService, catalog_ref, check_hub
from shoal.services.ledger import Reservation
from shoal.services.plan import LaunchPlan, keep_alive_seconds, plan_launch
from shoal.services.profiles import ProfileBook, model_identity, wants_profile_run
from shoal.services.replicas import Replica, ReplicaState, RunningModel, move
from shoal.services.router import Router
from shoal.services.snapshots import SnapshotReader
from shoal.services.supervisor import Supervisor
from shoal.settings import ServerSettings
from shoal.state import StateStore

log = logging.getLogger("shoal.models")

MEMORY_BACK_TIMEOUT = 30.0  # seconds to wait for an evicted runner's GPU memory to show as free
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


class ModelService:
    def __init__(
        self,
        catalog: Catalog,
        settings: ServerSettings,
        store: StateStore,
        host: Host,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.catalog = catalog
        self.store = store
        self.settings = settings
        self.host = host
        self.snapshots = SnapshotReader(host)  # bounded: NVML or /proc may hang
        self.clock = clock
        self.policy = Policy(settings.placement, settings.headroom, settings.park_memory)  # type: ignore[arg-type]
        self._models: dict[str, RunningModel] = {}
        self.router = Router(self._models)
        self.supervisor = Supervisor(
            self._models,
            host,
            self,
            clock,
            settings.max_restarts,
            settings.liveness_interval,
            settings.liveness_timeout,
        )
        self.hubs = HubService(settings)
        self._placing = asyncio.Lock()  # one placement decision at a time
        self._freed = asyncio.Event()  # set whenever memory is given back (for queued launches)
        # Measured profiles (services/profiles.py) and CUDA MPS (hosts/mps.py):
        self.profiles = ProfileBook(store, settings.profile, settings.profile_margin)
        self.mps = MpsControl(settings.data_dir, bool(settings.fake_gpus), cluster=not host.one_machine)
        metrics.PARKED_REPLICAS.set_function(self._parked_count)

    def _parked_count(self) -> int:
        return sum(r.state is ReplicaState.PARKED for m in self._models.values() for r in m.replicas)

    async def start(self) -> None:
        """Join the Ray cluster (Ray mode); start the MPS daemon when asked for."""
        await self.host.start()
        if self.settings.mps:
            await asyncio.to_thread(self.mps.start)  # off with its reason where it cannot run

    def memory_freed(self) -> None:
        self._freed.set()

    def workers(self) -> list[dict[str, Any]]:
        """GET /v1/workers: the nodes (one, "local", on a single machine)."""
        return self.host.workers(sum(len(m.replicas) for m in self._models.values()))

    # ---- queries ---------------------------------------------------------------------------
    def get(self, uid: str) -> RunningModel:
        return self.router.get(uid)

    def running(self) -> list[RunningModel]:
        return list(self._models.values())

    def queue_depth(self) -> dict[str, int]:
        return self.router.queue_depth()

    def notice_unreachable(self, uid: str, replica: Replica) -> None:
        """A request could not reach this replica: if its process is gone, handle it now, not next tick."""
        model = self._models.get(uid)
        if model is not None:
            self.supervisor.check(model, replica)

    # ---- launch / terminate ----------------------------------------------------------------
    async def _resolve(
        self,
        request: LaunchRequest | EstimateRequest | PullRequest,
        model_type: str | None,
        model_path: str | None,
    ) -> tuple[ModelFamily, ModelSpec, str, Source, HubModel | None]:
        """The family, spec, engine and source of a launch, and for hub weights what the hub (or
        the cache) says of them: nothing is downloaded here."""
        assert request.model_name is not None
        preferred = check_hub(request.download_hub or self.hubs.default_hub)
        ref = hub_names.parse(request.model_name)  # a malformed hub name or ModelScope: 400
        if ref is not None and model_path:
            raise InvalidRequest("model_path names local weights; a hub name names the hub's: give one")
        variant = _variant(request)  # which files a diffusers pipeline fetches: checked first
        hub = await self.hubs.resolve(ref, model_type, None, variant) if ref is not None else None
        family = (
            self.hubs.family(hub) if hub is not None else self.catalog.get(request.model_name, model_type)
        )
        try:
            spec = family.pick_spec(
                request.model_format, request.quantization, request.model_size_in_billions
            )
        except LookupError as exc:
            raise InvalidRequest(str(exc)) from exc
        engine_name = request.model_engine or default_engine(family.model_type, spec.model_format)
        if engine_name is None:
            raise InvalidRequest(f"no engine serves format {spec.model_format!r}; name one in model_engine")
        engine = registry.canonical(engine_name, spec.model_format)
        if isinstance(request, LaunchRequest):  # bad engine options are refused before any planning
            check_launch_options(engine, request.engine_options())
        elif isinstance(request, EstimateRequest):  # an estimate's extras: only the values of known ones
            check_launch_options(
                None, {k: v for k, v in (request.model_extra or {}).items() if v is not None}
            )
        if not isinstance(request, PullRequest):
            registry.check_installed(engine)
        assert spec.source is not None
        source = Source(path=model_path) if model_path else spec.source
        ref = catalog_ref(source, preferred)
        if hub is None and ref is not None:  # a catalog model from the hub, of any type
            try:
                hub = await self.hubs.resolve(ref, family.model_type, spec.model_format, variant)
            except (HubUnreachable, HubNotFound):
                if not isinstance(request, EstimateRequest):
                    raise
                # No hub here (and not cached): the estimate falls back on the catalog's size.
        if hub is not None:
            return family, spec, engine, self.hubs.source(hub), hub
        path = local_path(source)  # a missing package or path fails here, with the fix, before any spawn
        if source.path and path is not None:
            check_weights(path, spec.model_format)  # a path that holds no weights of this format: 400
        return family, spec, engine, source, None

    async def _plan(
        self,
        request: LaunchRequest | EstimateRequest,
        engine: str,
        family: ModelFamily,
        spec: ModelSpec,
        source: Source,
        hub: HubModel | None = None,
    ) -> LaunchPlan:
        snapshot = await self.snapshots.read()
        options = (
            request.engine_options()
            if isinstance(request, LaunchRequest)
            else dict(request.model_extra or {})
        )
        plan = await asyncio.to_thread(
            plan_launch,
            request,
            engine,
            family,
            spec,
            source,
            snapshot.devices,
            self.settings.cpu_cores_per_model,
            options,
            hub.weights if hub is not None else None,
        )
        # On its stored profile, or on the formula corrected by similar models' profiles.
        identity = model_identity(family, spec, source)
        return await asyncio.to_thread(self.profiles.place, plan, identity, engine, options, snapshot.devices)

    async def launch(
        self, request: LaunchRequest, wait: bool = True, preferred: list[list[str]] | None = None
    ) -> RunningModel:
        if request.gpu_compute is not None and not self.mps.status.enabled:
            raise InvalidRequest(f"gpu_compute needs CUDA MPS, which is off here: {self.mps.status.reason}")
        family, spec, engine, source, hub = await self._resolve(
            request, request.model_type, request.model_path
        )
        named = hub_names.parse(request.model_name)
        uid = request.model_uid or (named.default_uid() if named is not None else family.model_name)
        self._check_free(uid)
        keep_alive = keep_alive_seconds(request.keep_alive, self.settings.keep_alive)
        plan = await self._plan(request, engine, family, spec, source, hub)
        pull = None
        if hub is not None and hub.local is None:
            # Before a byte of weights: a model that cannot fit is a 507 now, not after the download.
            if request.queue_timeout == 0:
                probe = self._probe(uid, family, spec, engine, source, request, plan)
                async with self._placing:
                    decision, _ = await self._decide(probe, probe.replicas[0])
                if isinstance(decision, NoFit):
                    message = ledger.explain(uid, decision, [], ledger.blocked_reasons(self.running()))
                    raise InsufficientMemory(message, ledger.nofit_details(decision))
            if not self.host.fetches_hub_files:  # (Ray: each replica's node fetches them, _start)
                pull = self.hubs.start(hub)  # the disk is checked first (507)
        await self._take_uid(uid)  # again: it may have been taken while the estimate was read
        replicas = [Replica(i) for i in range(request.replica)]
        on_nodes = hub if self.host.fetches_hub_files else None
        model = RunningModel(uid, family, spec, engine, source, request, plan, keep_alive, replicas,
                             preferred=preferred or [], download=pull, hub=on_nodes)  # fmt: skip
        self._models[uid] = model
        # Desired state first: a server that restarts mid-launch (or mid-download) brings the model
        # back, and the download resumes where it stopped.
        self.store.save_model(uid, request.model_dump(mode="json", exclude_none=True) | {"model_uid": uid})
        if not wait:  # the caller polls GET /v1/models/{uid}; a failure stays visible there
            self.supervisor.spawn(self._fetch_then_bring_up(model, hub, forget_on_failure=False))
            return model
        await self._fetch_then_bring_up(model, hub, forget_on_failure=True)
        return model

    async def _fetch_then_bring_up(
        self, model: RunningModel, hub: HubModel | None, forget_on_failure: bool
    ) -> None:
        """The download (when there is one), then placement and the runners: the launch timeout
        starts once the files are in."""
        if model.download is not None and hub is not None:
            try:
                model.source = await self.hubs.fetch(hub, model.download)
            except ShoalError as exc:
                if self._models.get(model.uid) is model:
                    await self._fail(
                        model, f"download of {hub.ref.name} failed: {exc.message}", forget_on_failure
                    )
                raise
            if self._models.get(model.uid) is not model:
                return  # terminated while it downloaded; the files stay in the cache
        await self._bring_up(model, model.replicas, forget_on_failure)

    def _probe(
        self,
        uid: str,
        family: ModelFamily,
        spec: ModelSpec,
        engine: str,
        source: Source,
        request: LaunchRequest | EstimateRequest,
        plan: LaunchPlan,
    ) -> RunningModel:
        """A model that is not launched, to ask the scheduler where it would go."""
        launch = LaunchRequest(model_name=family.model_name, worker_ip=request.worker_ip)
        return RunningModel(
            uid, family, spec, engine, source, launch, plan, self.settings.keep_alive, [Replica(0)]
        )

    def _check_free(self, uid: str) -> None:
        held = self._models.get(uid)
        if held is not None and held.status != "failed":
            raise Conflict(f"model uid {uid!r} is already in use; terminate it or pick another model_uid")

    async def _take_uid(self, uid: str) -> None:
        """A uid whose model failed is free again: the failed entry is dropped for the new launch."""
        self._check_free(uid)
        failed = self._models.pop(uid, None)
        if failed is not None:
            await self._stop_model(failed)

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
            except ValueError as exc:  # a saved launch that today's validation refuses
                log.error("could not restore %s: %s", saved.uid, exc)

    async def _bring_up(self, model: RunningModel, replicas: list[Replica], forget_on_failure: bool) -> None:
        """Reserve memory for each replica (evicting or queueing as needed), then start them all."""
        try:
            for replica in replicas:
                if replica.state is not ReplicaState.STARTING:
                    move(replica, ReplicaState.STARTING, self.clock())
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
            replica.last_error = replica.last_error or reason
            move(replica, ReplicaState.FAILED, self.clock())
        if forget and self._models.get(model.uid) is model:
            del self._models[model.uid]
            self.store.delete_model(model.uid)

    async def ensure_ready(self, uid: str, name: str | None = None) -> None:
        """Autoload (Ollama-style): bring back an evicted model, or launch a catalog model by name
        (or the hub name `name` under the uid it launches as by default, downloading it if need
        be); the request waits meanwhile."""
        model = self._models.get(uid)
        if model is None:
            if name is not None and hub_names.parse(name) is not None:
                request = LaunchRequest(model_name=name, model_uid=uid)
            else:
                try:
                    self.catalog.get(uid)
                except ModelNotFound:
                    return  # the request then answers 404 as usual
                request = LaunchRequest(model_name=uid)
            try:
                await self.launch(request)
            except Conflict:
                pass  # launched by a concurrent request
        elif model.status == "evicted":
            evicted = [r for r in model.replicas if r.state is ReplicaState.EVICTED]
            for replica in evicted:  # at once: a request that comes meanwhile waits for these
                move(replica, ReplicaState.STARTING, self.clock())
            await self._bring_up(model, evicted, forget_on_failure=False)
            model.unloaded = False
        elif model.status == "parked":
            await parking.wake(self, model)
        elif model.waking:  # woken (or moved) by another request: wait with it
            await parking.wait_until_awake(model, self.settings.launch_timeout)
        deadline = time.monotonic() + self.settings.launch_timeout
        while (model := self._models.get(uid)) is not None and model.status == "loading":
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)

    def parked(self, uid: str) -> bool:
        """Its next request brings it back and waits for it: parked (or waking, or moving), or
        unloaded at a client's request (`unload`)."""
        model = self._models.get(uid)
        if model is None:
            return False
        return (
            bool(model.waking) or model.status == "parked" or (model.unloaded and model.status == "evicted")
        )

    def set_keep_alive(self, uid: str, seconds: float | None) -> None:
        """A client's keep-alive for this model (Ollama's per-request keep_alive): idle that long, it
        may be evicted; negative: never. None puts back the launch's keep-alive."""
        model = self.get(uid)
        if seconds is None:
            seconds = keep_alive_seconds(model.request.keep_alive, self.settings.keep_alive)
        model.keep_alive = seconds

    async def unload(self, uid: str) -> bool:
        """Stop the model's idle replicas at a client's request (Ollama's keep_alive 0). The model
        stays known, parked: its next request loads it again, with or without --autoload. A pinned
        model stays; a replica still answering another request stays (its keep-alive is 0, so it is
        the first to go when room is needed). True when a replica was stopped."""
        model = self.get(uid)
        if model.request.pinned:
            return False
        async with self._placing:
            idle = [r for r in model.replicas if r.state is ReplicaState.READY and r.in_flight == 0]
            if not idle:
                return False
            if len(idle) == sum(r.state is ReplicaState.READY for r in model.replicas):
                model.unloaded = True
            await self._evict(tuple(f"{uid}/{r.index}" for r in idle), "at the client's request")
        self._freed.set()
        return True

    async def terminate(self, uid: str) -> None:
        model = self.get(uid)
        del self._models[uid]
        self.store.delete_model(uid)
        await self._stop_model(model)
        metrics.forget_model(uid)

    async def _stop_model(self, model: RunningModel) -> None:
        replicas = [r for r in model.replicas if r.state is not ReplicaState.STOPPING]
        for replica in replicas:
            move(replica, ReplicaState.STOPPING, self.clock())
        stopped = [key for r in replicas for key in self._runner_ids(r)]
        await asyncio.gather(*(r.runner.stop() for r in replicas if r.runner))
        for replica in replicas:
            move(replica, ReplicaState.STOPPED, self.clock())
        if model.plan.kind == "gpu":
            await self._memory_back(stopped)
        self._freed.set()

    # ---- placement ---------------------------------------------------------------------------
    async def _decide(self, model: RunningModel, replica: Replica) -> tuple[Decision, Snapshot]:
        snapshot = await self.snapshots.read()
        models = self.running()
        states = ledger.device_states(snapshot, ledger.shoal_use(models, snapshot))
        others = frozenset(
            d for r in model.replicas if r is not replica and r.reservation for d in r.reservation.devices
        )
        plan = model.plan
        # a parked replica's wake: the devices its live process is on come first among equals
        waking = replica.runner is not None and replica.runner.exited() is None
        prefer = replica.parked_from if waking else ()
        demand = Demand(plan.per_device, plan.kind, plan.n_devices, plan.allowed, plan.cores, others, prefer)
        demand = self.host.restrict(demand, model.request.worker_ip, states)
        holdings, now = ledger.holdings(models), time.monotonic()
        if plan.n_devices > 1:
            return self._place_on_one_node(demand, states, holdings, now), snapshot
        before = model.preferred[replica.index] if replica.index < len(model.preferred) else []
        if before and len(before) == plan.n_devices and demand.allowed is None:
            # Restored after a restart: where it ran before, if it still fits there without evicting.
            again = place(replace(demand, allowed=tuple(before)), states, holdings, self.policy, now)
            if isinstance(again, Place):
                return again, snapshot
        return place(demand, states, holdings, self.policy, now), snapshot

    def _place_on_one_node(
        self, demand: Demand, states: list[DeviceState], holdings: list[Holding], now: float
    ) -> Decision:
        """A replica that spans several GPUs keeps them on one node."""
        by_node: dict[str, list[str]] = {}
        for s in states:
            by_node.setdefault(node_of(s.id), []).append(s.id)
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
        if isinstance(anywhere, NoFit) or len(by_node) == 1:
            return anywhere
        reason = f"no single node has {demand.n_devices} devices with room"
        return NoFit(demand.per_device, demand.n_devices, (), reason)

    async def _reserve(self, model: RunningModel, replica: Replica) -> None:
        deadline = time.monotonic() + model.request.queue_timeout
        while True:
            async with self._placing:
                decision, snapshot = await self._decide(model, replica)
                if isinstance(decision, Move):
                    await parking.move_replica(self, decision, f"to make room for {model.uid}")
                    continue
                if isinstance(decision, Evict):
                    await self._make_room(decision, f"to make room for {model.uid}")
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
                    models = self.running()
                    message = ledger.explain(
                        model.uid, decision, ledger.holdings(models), ledger.blocked_reasons(models)
                    )
                    raise InsufficientMemory(message, ledger.nofit_details(decision))
                self._freed.clear()
            try:  # queued: try again when memory is given back, or at least every second
                await asyncio.wait_for(self._freed.wait(), timeout=min(1.0, deadline - time.monotonic()))
            except TimeoutError:
                pass

    async def _make_room(self, decision: Evict, why: str) -> None:
        """Parked replicas stopped for host RAM, then the parks, then the evictions. A replica that
        became busy meanwhile is left be: the caller decides again."""
        for key in decision.drop:
            await parking.drop(self, key, f"(host RAM is short) {why}")
        for key in decision.park:
            await parking.park(self, key, why)
        await self._evict(decision.victims, why)

    async def _evict(self, victims: tuple[str, ...], why: str) -> None:
        """Stop these replicas and wait until their memory is really back."""
        stopped = []
        for key in victims:
            uid, _, index = key.rpartition("/")
            replica = self._models[uid].replicas[int(index)]
            if replica.state is ReplicaState.PARKED:  # stopped for RAM: its next request loads it again
                self._models[uid].unloaded = True
            log.info("evicting %s (idle %.0f s) %s", key, time.monotonic() - replica.last_used, why)
            stopped.extend(self._runner_ids(replica))
            move(replica, ReplicaState.EVICTED, self.clock())
            metrics.EVICTIONS.labels(uid).inc()
            if replica.runner:
                await replica.runner.stop()
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
            await self.host.refresh()  # fresh, not the last poll's view
            usage = await self.snapshots.read()
            if not any((node_of(device), pid) in stopped for device, pid in usage.gpu_usage):
                return
            await asyncio.sleep(0.2)
        log.warning("GPU memory of runners %s still in use after %.0f s", stopped, MEMORY_BACK_TIMEOUT)

    async def estimate(self, request: EstimateRequest) -> dict[str, Any]:
        """The estimate and where it would go now, without launching anything."""
        if request.model_name is None:
            raise InvalidRequest("model_name is required (a catalog name or a hub name, hf.co/ORG/REPO)")
        family, spec, engine, source, hub = await self._resolve(request, request.model_type, None)
        plan = await self._plan(request, engine, family, spec, source, hub)
        probe = self._probe("(estimate)", family, spec, engine, source, request, plan)
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
            where = {
                "fits": True,
                "devices": list(decision.then.devices),
                "evict": list(decision.victims),
                "park": list(decision.park),
                "stop_parked": list(decision.drop),
            }
        elif isinstance(decision, Move):
            move_to = {"replica": decision.replica, "from": decision.source, "to": decision.to}
            where = {"fits": True, "devices": list(decision.then.devices), "evict": [], "move": move_to}
        else:
            blocked = ledger.blocked_reasons(self.running())
            where = {
                "fits": False,
                "reason": ledger.explain(family.model_name, decision, [], blocked),
                **ledger.nofit_details(decision),
            }
        return {
            "model_name": family.model_name,
            "model_engine": engine,
            "device_kind": plan.kind,
            "n_devices": plan.n_devices,
            "estimate": plan.breakdown,
            "placement": where,
            "download": None
            if hub is None
            else {
                "name": hub.ref.name,
                "revision": hub.commit,
                "cached": hub.local is not None,
                "total_bytes": hub.selection.total,
                "missing_bytes": sum(f.size for f in hub.missing),
            },
        }

    # ---- the hub cache -------------------------------------------------------------------------
    async def pull(self, request: PullRequest) -> tuple[str, HubModel | None, Pull | None]:
        """Download a model's files into the cache without launching it: (its name, what the hub
        says of it, the download; None when the files are already there). A model whose weights
        are local (a package, a path) has nothing to download: (name, None, None)."""
        family, _, _, _, hub = await self._resolve(request, request.model_type, None)
        if hub is None:
            return family.model_name, None, None
        return hub.ref.name, hub, self.hubs.start(hub) if hub.local is None else None

    def cached(self) -> list[dict[str, Any]]:
        return self.hubs.cached(self._models.values())

    async def remove_cached(self, name: str) -> dict[str, Any]:
        """Remove a hub model from the gateway's cache and from every node's (Ray), or from none:
        a 409 while a model uses it (here, or a runner on a node) or it downloads, a 404 when no
        cache has it. Says per node what went."""
        hub, repo, shown = self.hubs.removable(name, self._models.values())
        folder = self.hubs.folder(hub, repo).absolute()  # as a node's copies name their source
        nodes = await self.host.remove_hub(hub, repo, str(folder), dry_run=True)
        busy = [n for n in nodes if n["status"] in ("in use", "downloading")]
        if busy:
            why = "; ".join(_node_holds(n) for n in busy)
            raise Conflict(f"{shown} is in use on {why}; stop them first (shoal stop UID)")
        here = await asyncio.to_thread(self.hubs.remove, hub, repo)
        if any(n["status"] == "cached" for n in nodes):
            nodes = await self.host.remove_hub(hub, repo, str(folder))
        if not here and not any(n["status"] == "removed" for n in nodes):
            where = f"{self.hubs.roots[hub]}" + (" nor on any node" if nodes else "")
            raise ModelNotFound(f"{shown} is not in the cache ({where})")
        gateway = {"status": "removed" if here else "not cached", "path": str(folder)}
        return {"name": shown, "status": "removed", "gateway": gateway, "nodes": nodes}

    async def devices(self) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.devices_now)

    def devices_now(self) -> list[dict[str, Any]]:
        """Each device with each replica's share (reads NVML: call it off the event loop)."""
        snapshot = self.snapshots.now()
        models = self.running()
        states = ledger.device_states(snapshot, ledger.shoal_use(models, snapshot))
        per_replica = {
            f"{model.uid}/{replica.index}": {
                "model_uid": model.uid,
                "model_type": model.family.model_type,
                **replica.describe(),
                "breakdown": model.plan.breakdown,
            }
            for model in models
            for replica in model.replicas
        }
        report = ledger.device_report(states, snapshot, ledger.holdings(models), per_replica, self.policy)
        health, mps = self.supervisor.health(), self.mps.status.to_dict()
        return [{**device, "supervisor": health, "mps": mps} for device in report]

    # ---- runners -----------------------------------------------------------------------------
    def _runner_config(self, model: RunningModel, reservation: Reservation) -> RunnerConfig:
        options = {k: v for k, v in model.request.engine_options().items() if k != "n_threads"}
        if model.plan.real_gpu and model.engine in FRACTION_ENGINES and reservation.device_total:
            # torch enforces the share: an allocation past it raises OutOfMemoryError in this runner only
            options["memory_fraction"] = min(1.0, reservation.reserved / reservation.device_total)
        capped = model.plan.real_gpu and model.engine in FRACTION_ENGINES
        return RunnerConfig(
            model_uid=model.uid,
            replica=0,
            engine=model.engine,
            model_format=model.spec.model_format,
            source=model.source,
            context_length=model.family.context_length,
            device="cuda" if model.plan.real_gpu else "cpu",
            n_threads=len(reservation.cores) or model.request.engine_options().get("n_threads"),
            options=options,
            socket="",  # the host says where
            status_file="",
            memory_bytes=reservation.reserved if capped else None,  # the runner shares it of its CUDA total
        )

    async def _start(self, model: RunningModel, replica: Replica) -> None:
        """Spawn one runner on its reservation and wait until it answers; on failure record why."""
        reservation = replica.reservation
        assert reservation is not None
        profile = wants_profile_run(self.profiles.mode, model.plan)
        config = self._runner_config(model, reservation).model_copy(
            update={"replica": replica.index, "profile": profile}
        )
        env = {**RUNNER_ENV, **(model.request.envs or {})}
        env["CUDA_VISIBLE_DEVICES"] = (
            ",".join(d.split(":")[-1] for d in reservation.devices) if model.plan.real_gpu else ""
        )
        if model.plan.real_gpu:  # CUDA MPS on: the runner joins the daemon, capped at its reservation
            env.update(
                self.mps.env(reservation.reserved, len(reservation.devices), model.request.gpu_compute)
            )
        log_name = f"{model.uid}-{replica.index}.log"
        hub = self._hub_launch(model) if model.hub is not None else None
        try:
            runner = self.host.runner(reservation.devices[0], config, env, log_name, reservation.cores, hub)
        except NodeLost as exc:
            await self._lost_while_starting(model, replica, exc)
            return
        replica.runner = runner
        try:
            await runner.start()
            await runner.wait_ready(self.settings.launch_timeout)
        except NodeLost as exc:
            await runner.stop()
            await self._lost_while_starting(model, replica, exc)
            return
        except LaunchFailed as exc:
            await runner.stop()
            replica.last_error = exc.message
            if replica.state is not ReplicaState.STOPPED:
                move(replica, ReplicaState.FAILED, self.clock())
            return
        if replica.runner is runner and replica.state in (ReplicaState.STARTING, ReplicaState.RESTARTING):
            move(replica, ReplicaState.READY, self.clock())
            metrics.LAUNCHES.labels(model.uid).inc()
            log.info(
                "model %s replica %d ready on %s (pid %s)",
                model.uid,
                replica.index,
                ",".join(reservation.devices),
                runner.pid,
            )
            if profile:
                await self._record_profile(model, replica)

    def _hub_launch(self, model: RunningModel) -> HubLaunch:
        """The hub files a Ray node fetches itself for a replica of `model`, and the gateway's own
        copy for a node that cannot reach the hub: downloaded here first when the gateway lacks it
        (one download however many nodes need it; the model's `download` shows it)."""
        hub = model.hub
        assert hub is not None

        async def gateway_path() -> str:
            if hub.local is not None:
                return str(hub.local)
            if model.download is None or model.download.error is not None:
                model.download = self.hubs.start(hub)
            return str((await self.hubs.fetch(hub, model.download)).path)

        return HubLaunch(self.hubs.node_files(hub), gateway_path)

    async def _record_profile(self, model: RunningModel, replica: Replica) -> None:
        """After a profile run: the reservation becomes its peak plus the margin, the torch cap
        follows it, and the profile is stored for the next launch of the same thing."""
        r, runner = replica.reservation, replica.runner
        assert r is not None and runner is not None
        if not await self._profile_ran(runner):  # e.g. out of memory under the formula's cap
            log.warning("model %s replica %d: its profile run failed; no profile", model.uid, replica.index)
            return
        snapshot = await self.snapshots.read()
        measured = self.profiles.measured_device(snapshot, r.devices, runner.pid)
        if measured is None:
            log.warning("model %s replica %d: its profile peak could not be read", model.uid, replica.index)
            return
        stored = await asyncio.to_thread(self.profiles.record, model.plan, model.engine, *measured)
        r.profile = stored.reserved
        model.plan = self.profiles.on_profile(model.plan, stored)  # restarts and reloads use it
        log.info(
            "model %s replica %d profiled on %s: peak %d bytes, reserved %d (estimate %d)",
            model.uid, replica.index, measured[0], stored.peak, stored.reserved, r.estimate,
        )  # fmt: skip
        torch_capped = model.engine in FRACTION_ENGINES and model.engine != "vllm"
        if model.plan.real_gpu and torch_capped and r.device_total:
            fraction = min(1.0, r.reserved / r.device_total)  # the runner takes bytes where it can
            try:
                status, text = await runner.http.call(
                    "POST", "/memory_fraction", {"fraction": fraction, "bytes": r.reserved}
                )
                if status != 200:
                    raise ShoalError(f"{status}: {text[:300].decode('utf-8', 'replace')}")
            except Exception as exc:  # the runner serves on under its first cap
                log.warning("model %s: torch memory cap not moved to %.4f: %s", model.uid, fraction, exc)
        self._freed.set()  # a smaller reservation can make room for a queued launch

    @staticmethod
    async def _profile_ran(runner: RunnerHandle) -> bool:
        """The runner says its profile run completed (runners/app.py counts it on /metrics)."""
        try:
            status, text = await runner.http.call("GET", "/metrics")
            return status == 200 and orjson.loads(text).get("runner_profile_runs") == 1
        except Exception as exc:  # unreadable: not measured, rather than a wrong profile
            log.warning("runner metrics unread after a profile run: %s", exc)
            return False

    async def _lost_while_starting(self, model: RunningModel, replica: Replica, exc: NodeLost) -> None:
        """Its node left before the replica was ready: place it again on the nodes left."""
        log.warning("model %s replica %d lost while starting: %s", model.uid, replica.index, exc.message)
        replica.last_error = exc.message
        move(replica, ReplicaState.RESTARTING, self.clock(), release=True)
        self._freed.set()
        await self.replace_replica(model, replica)

    async def start_replica(self, model: RunningModel, replica: Replica) -> None:
        """The supervisor's restart of a replica whose backoff is over (same reservation)."""
        if self._models.get(model.uid) is model and replica.state is ReplicaState.RESTARTING:
            await self._start(model, replica)

    async def replace_replica(self, model: RunningModel, replica: Replica) -> None:
        """A replica whose node was lost: a new placement on the nodes left, then a new runner."""
        try:
            await self._reserve(model, replica)
        except ShoalError as exc:
            replica.last_error = f"{replica.last_error}; {exc.message}"
            move(replica, ReplicaState.FAILED, self.clock())
            return
        await self.start_replica(model, replica)

    async def shutdown(self) -> None:
        self.hubs.stop()  # download threads end at their next chunk, resumable
        await self.supervisor.stop()
        await asyncio.gather(*(self._stop_model(m) for m in self._models.values()), return_exceptions=True)
        self._models.clear()
        await self.host.shutdown()
        await asyncio.to_thread(self.mps.stop)  # after its clients (the runners) are gone


def _node_holds(report: dict[str, Any]) -> str:
    """What holds a hub repo on a node (its NodeAgent.remove_hub report), for a 409."""
    if report["status"] == "downloading":
        return f"{report['node']} (downloading it)"
    known = report.get("model_uids") or []
    strays = len(report["pids"]) - len(known)
    held = ", ".join([*known, *([f"{strays} runner(s) the gateway does not know"] if strays > 0 else [])])
    return f"{report['node']} (by {held})"


def _variant(request: LaunchRequest | EstimateRequest | PullRequest) -> str | None:
    """A launch's diffusers `variant` (fp16), checked (400) before the hub's files are picked by it."""
    raw = request.variant if isinstance(request, PullRequest) else (request.model_extra or {}).get("variant")
    if raw is None:
        return None
    return str(check_launch_options(None, {"variant": raw})["variant"])
