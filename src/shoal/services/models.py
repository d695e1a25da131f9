"""The model service: launch, describe, terminate, route to a ready replica, and supervise runners.

It owns all mutable state about running models; one supervisor loop watches the runner processes
and restarts crashed replicas with exponential backoff (capped; after too many fast crashes the
replica is marked failed with the last error).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.catalog import DEFAULT_ENGINE_BY_FORMAT, Catalog, ModelFamily, ModelSpec, Source
from shoal.catalog.resolve import local_path
from shoal.devices import nvml_devices
from shoal.engines import registry
from shoal.errors import Conflict, InvalidRequest, LaunchFailed, ModelNotFound, ModelUnavailable
from shoal.protocol.admin import LaunchRequest
from shoal.runners.config import RunnerConfig
from shoal.runners.process import ReplicaState, RunnerProcess
from shoal.settings import ServerSettings

log = logging.getLogger("shoal.models")

SUPERVISOR_TICK = 0.2  # seconds between checks of runner processes
FAST_CRASH = 60.0  # a replica that dies sooner than this after becoming ready counts as a fast crash
MAX_BACKOFF = 30.0


@dataclass
class Replica:
    index: int
    device: str
    runner: RunnerProcess | None = None
    state: ReplicaState = ReplicaState.STARTING
    in_flight: int = 0
    crashes: int = 0  # consecutive fast crashes
    last_error: str | None = None
    ready_since: float | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "state": self.state.value,
            "pid": self.runner.pid if self.runner else None,
            "device": self.device,
            "in_flight": self.in_flight,
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
    replicas: list[Replica]
    created: int = field(default_factory=lambda: int(time.time()))
    last_used: float = field(default_factory=time.monotonic)
    _turn: Iterator[int] = field(default_factory=itertools.count)

    @property
    def status(self) -> str:
        states = {r.state for r in self.replicas}
        if ReplicaState.READY in states:
            return "ready"
        if states & {ReplicaState.STARTING, ReplicaState.RESTARTING}:
            return "loading"
        if states == {ReplicaState.FAILED}:
            return "failed"
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
            "replicas": [r.describe() for r in self.replicas],
        }


def _device_for(request: LaunchRequest) -> list[str]:
    """Device per replica: "cpu" or "cuda:<indices>". Memory-aware placement comes with the scheduler."""
    n_gpu, gpu_idx = request.n_gpu, request.gpu_idx
    wants_cpu = n_gpu in (None, 0, "0") or (isinstance(n_gpu, str) and n_gpu.lower() == "cpu")
    if wants_cpu and gpu_idx is None:
        return ["cpu"] * request.replica
    gpus = [d.index for d in nvml_devices()]
    if gpu_idx is not None:
        wanted = [gpu_idx] if isinstance(gpu_idx, int) else list(gpu_idx)
        missing = [i for i in wanted if i not in gpus]
        if missing:
            raise InvalidRequest(f"gpu_idx {missing} not present; this machine has GPUs {gpus or 'none'}")
        return ["cuda:" + ",".join(map(str, wanted))] * request.replica
    if isinstance(n_gpu, str) and n_gpu != "auto":
        if not n_gpu.isdigit():
            raise InvalidRequest(f"n_gpu must be an integer, 'auto' or null, not {n_gpu!r}")
        n_gpu = int(n_gpu)
    if n_gpu == "auto":
        return (
            [f"cuda:{gpus[i % len(gpus)]}" for i in range(request.replica)]
            if gpus
            else ["cpu"] * request.replica
        )
    assert isinstance(n_gpu, int)
    if n_gpu > len(gpus):
        raise InvalidRequest(f"n_gpu={n_gpu} but this machine has {len(gpus)} GPU(s)")
    return ["cuda:" + ",".join(map(str, gpus[:n_gpu]))] * request.replica


class ModelService:
    def __init__(self, catalog: Catalog, settings: ServerSettings) -> None:
        self.catalog = catalog
        self.settings = settings
        self._models: dict[str, RunningModel] = {}
        self._logs = settings.data_dir / "logs"
        self._logs.mkdir(parents=True, exist_ok=True)
        # Unix socket paths are limited to 107 bytes, so sockets live in a short temp dir.
        self._run_dir = Path(tempfile.mkdtemp(prefix="shoal-"))
        self._spawned = itertools.count()
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- queries ---------------------------------------------------------------------------
    def get(self, uid: str) -> RunningModel:
        model = self._models.get(uid)
        if model is None:
            raise ModelNotFound(f"model {uid!r} is not running (see GET /v1/models)")
        return model

    def running(self) -> list[RunningModel]:
        return list(self._models.values())

    def checkout(self, uid: str) -> Replica:
        """A ready replica for one request: the least busy, round-robin among equals.
        Every checkout is paired with release() when the request ends."""
        model = self.get(uid)
        ready = [r for r in model.replicas if r.state is ReplicaState.READY]
        if not ready:
            if model.status == "failed":
                errors = "; ".join(r.last_error or "unknown" for r in model.replicas)
                raise ModelUnavailable(f"model {uid!r} failed: {errors}", retry_after=30)
            raise ModelUnavailable(f"model {uid!r} is loading or restarting; retry shortly", retry_after=2)
        turn = next(model._turn)
        replica = min(ready, key=lambda r: (r.in_flight, (r.index - turn) % len(model.replicas)))
        replica.in_flight += 1
        model.last_used = time.monotonic()
        return replica

    @staticmethod
    def release(replica: Replica) -> None:
        replica.in_flight -= 1

    # ---- launch / terminate ----------------------------------------------------------------
    def _resolve(self, request: LaunchRequest) -> tuple[ModelFamily, ModelSpec, str, Source]:
        family = self.catalog.get(request.model_name, request.model_type)
        try:
            spec = family.pick_spec(
                request.model_format, request.quantization, request.model_size_in_billions
            )
        except LookupError as exc:
            raise InvalidRequest(str(exc)) from exc
        engine_name = request.model_engine or DEFAULT_ENGINE_BY_FORMAT.get(spec.model_format)
        if engine_name is None:
            raise InvalidRequest(f"no engine serves format {spec.model_format!r}; name one in model_engine")
        engine = registry.canonical(engine_name, spec.model_format)
        registry.check_installed(engine)
        assert spec.source is not None
        source = Source(path=request.model_path) if request.model_path else spec.source
        local_path(source)  # a missing package or path fails here, with the fix, before any spawn
        return family, spec, engine, source

    async def launch(self, request: LaunchRequest, wait: bool = True) -> RunningModel:
        family, spec, engine, source = self._resolve(request)
        uid = request.model_uid or family.model_name
        if uid in self._models:
            raise Conflict(f"model uid {uid!r} is already in use; terminate it or pick another model_uid")
        devices = _device_for(request)
        model = RunningModel(
            uid,
            family,
            spec,
            engine,
            source,
            request,
            [Replica(i, device) for i, device in enumerate(devices)],
        )
        self._models[uid] = model
        starting = asyncio.gather(*(self._start(model, r) for r in model.replicas))
        if not wait:  # the caller polls GET /v1/models/{uid}; a failure stays visible there
            self._spawn_task(self._finish_launch(model, starting, forget_on_failure=False))
            return model
        await self._finish_launch(model, starting, forget_on_failure=True)
        return model

    async def _finish_launch(
        self, model: RunningModel, starting: asyncio.Future[list[None]], forget_on_failure: bool
    ) -> None:
        await starting
        failed = [r for r in model.replicas if r.state is ReplicaState.FAILED]
        if failed:
            reason = failed[0].last_error
            await self._stop_model(model)
            for replica in model.replicas:
                replica.state = ReplicaState.FAILED
            if forget_on_failure and self._models.get(model.uid) is model:
                del self._models[model.uid]
            raise LaunchFailed(f"could not launch {model.uid!r}: {reason}")

    async def _start(self, model: RunningModel, replica: Replica) -> None:
        """Spawn one runner and wait until it answers; on failure record why."""
        n = next(self._spawned)
        config = RunnerConfig(
            model_uid=model.uid,
            replica=replica.index,
            engine=model.engine,
            model_format=model.spec.model_format,
            source=model.source,
            context_length=model.family.context_length,
            device="cpu" if replica.device == "cpu" else "cuda",
            n_threads=model.request.engine_options().get("n_threads"),
            options={k: v for k, v in model.request.engine_options().items() if k != "n_threads"},
            socket=str(self._run_dir / f"r{n}.sock"),
            status_file=str(self._run_dir / f"r{n}.status"),
        )
        env = dict(model.request.envs or {})
        env["CUDA_VISIBLE_DEVICES"] = "" if replica.device == "cpu" else replica.device.split(":", 1)[1]
        runner = RunnerProcess(config, self._logs / f"{model.uid}-{replica.index}.log", env)
        replica.runner = runner
        replica.state = ReplicaState.STARTING if replica.ready_since is None else ReplicaState.RESTARTING
        try:
            runner.spawn(self._run_dir / f"r{n}.json")
            await runner.wait_ready(self.settings.launch_timeout)
        except LaunchFailed as exc:
            await runner.stop()
            replica.state, replica.last_error = ReplicaState.FAILED, exc.message
            return
        if replica.runner is runner and replica.state is not ReplicaState.STOPPING:
            replica.state, replica.ready_since = ReplicaState.READY, time.monotonic()
            log.info("model %s replica %d ready (pid %s)", model.uid, replica.index, runner.pid)

    async def terminate(self, uid: str) -> None:
        model = self.get(uid)
        del self._models[uid]
        await self._stop_model(model)

    async def _stop_model(self, model: RunningModel) -> None:
        for replica in model.replicas:
            replica.state = ReplicaState.STOPPING
        await asyncio.gather(*(r.runner.stop() for r in model.replicas if r.runner))
        for replica in model.replicas:
            replica.state = ReplicaState.STOPPED

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
        """Runs for the life of the gateway: notice dead runners and restart them."""
        while True:
            for model in list(self._models.values()):
                for replica in model.replicas:
                    if (
                        replica.state is ReplicaState.READY
                        and replica.runner
                        and replica.runner.exited() is not None
                    ):
                        self._on_crash(model, replica)
            await asyncio.sleep(SUPERVISOR_TICK)

    def notice_unreachable(self, uid: str, replica: Replica) -> None:
        """A request could not reach this replica: if its process is gone, handle it now, not next tick."""
        model = self._models.get(uid)
        if (
            model
            and replica.state is ReplicaState.READY
            and replica.runner
            and replica.runner.exited() is not None
        ):
            self._on_crash(model, replica)

    def _on_crash(self, model: RunningModel, replica: Replica) -> None:
        assert replica.runner is not None
        replica.last_error = replica.runner.failure_reason()
        lived = time.monotonic() - (replica.ready_since or 0)
        replica.crashes = replica.crashes + 1 if lived < FAST_CRASH else 1
        log.warning("model %s replica %d died: %s", model.uid, replica.index, replica.last_error)
        if replica.crashes > self.settings.max_restarts:
            replica.state = ReplicaState.FAILED
            return
        replica.state = ReplicaState.RESTARTING
        delay = min(0.5 * 2 ** (replica.crashes - 1), MAX_BACKOFF)
        self._spawn_task(self._restart(model, replica, delay))

    async def _restart(self, model: RunningModel, replica: Replica, delay: float) -> None:
        old = replica.runner
        if old is not None:
            await old.stop()
        await asyncio.sleep(delay)
        if self._models.get(model.uid) is model and replica.state is ReplicaState.RESTARTING:
            await self._start(model, replica)

    async def shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*(self._stop_model(m) for m in self._models.values()), return_exceptions=True)
        self._models.clear()
        shutil.rmtree(self._run_dir, ignore_errors=True)
