"""One supervisor loop for the life of the gateway: notice dead and hung runners, restart them with a
capped backoff, and sample each runner's real memory use into the ledger.

Every step of a tick is guarded: it runs as its own task, so a step that hangs (an NVML call or a
/proc read that never returns) holds up no other; an exception is logged once per cause (with its
traceback), counted in /metrics, and the loop goes on. A step still running past its deadline is
logged and counted once as failed ("hung"), and not started again until it ends, so hung calls do
not pile up. `health()` says when each step last succeeded, so /ready and GET /v1/cluster/devices
can say when supervision or sampling is stale. Time comes from an injected clock and restarts are
due times checked on each tick, so unit tests drive `tick()` with no sleeps.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Protocol

from shoal import metrics
from shoal.hosts import Host, RunnerHandle
from shoal.services import ledger
from shoal.services.replicas import Replica, ReplicaState, RunningModel, move

log = logging.getLogger("shoal.supervisor")

TICK = 0.2  # seconds between checks of runner processes
SAMPLE_EVERY = 2.0  # seconds between samples of each runner's memory use
FAST_CRASH = 60.0  # a replica that dies sooner than this after becoming ready counts as a fast crash
MAX_BACKOFF = 30.0
STALE_AFTER = {"runners": 5.0, "memory": 3 * SAMPLE_EVERY + 5.0}  # seconds without a success
STEP_DEADLINE = {"runners": 5.0, "memory": 10.0}  # seconds a step may run before it counts as hung


class Launcher(Protocol):
    """What the supervisor asks of the model service (which owns placement and runner starts)."""

    async def start_replica(self, model: RunningModel, replica: Replica) -> None: ...

    async def replace_replica(self, model: RunningModel, replica: Replica) -> None: ...

    def memory_freed(self) -> None: ...


class Supervisor:
    def __init__(
        self,
        models: Mapping[str, RunningModel],
        host: Host,
        launcher: Launcher,
        clock: Callable[[], float],
        max_restarts: int,
        ping_every: float,
        liveness_timeout: float,
    ) -> None:
        self.models, self.host, self.launcher, self.clock = models, host, launcher, clock
        self.max_restarts = max_restarts
        self.ping_every = ping_every  # seconds between liveness pings of a ready runner
        self.liveness_timeout = liveness_timeout  # no answer for this long: hung, killed, restarted
        self.last_ok = dict.fromkeys(STALE_AFTER, clock())  # step → clock() of its last success
        self.errors = 0
        self._failing: dict[str, str] = {}  # step → the cause it is failing with now (logged once)
        self._last_sample = float("-inf")
        self._tasks: set[asyncio.Task[Any]] = set()
        self.running: dict[str, asyncio.Task[None]] = {}  # step → its task while it runs
        self._started: dict[str, float] = {}  # step → clock() when its running task started

    # ---- the loop --------------------------------------------------------------------------
    async def run(self) -> None:
        while True:
            await self.tick()
            await asyncio.sleep(TICK)

    async def tick(self) -> None:
        """One pass: start each step that is due and not still running; never raises (but for
        cancellation). The steps end in their own time; their outcome is recorded as they do."""
        now = self.clock()
        self._start("runners", self.check_runners, now)
        if now - self._last_sample >= SAMPLE_EVERY and self._start("memory", self.sample_memory, now):
            self._last_sample = now
        await asyncio.sleep(0)  # a step that does not block ends within this pass

    def _start(self, step: str, fn: Callable[[float], Coroutine[Any, Any, None]], now: float) -> bool:
        """Start `step` as a task unless it still runs (then: is it past its deadline?)."""
        if step in self.running:
            took = now - self._started[step]
            if took > STEP_DEADLINE[step] and not self._failing.get(step, "").startswith("hung"):
                self._failed(step, f"hung: still running after {took:.0f} s; not started again until it ends")
            return False
        task = asyncio.create_task(fn(now), name=f"supervisor {step}")
        self.running[step], self._started[step] = task, now
        task.add_done_callback(functools.partial(self._ended, step, now))
        return True

    def _ended(self, step: str, started: float, task: asyncio.Task[None]) -> None:
        if self.running.get(step) is task:
            del self.running[step]
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._failed(step, f"{type(exc).__name__}: {exc}", exc)
            return
        if step in self._failing:
            log.warning("supervisor step %r works again after: %s", step, self._failing.pop(step))
        self.last_ok[step] = max(self.last_ok.get(step, started), started)

    def _failed(self, step: str, cause: str, exc: BaseException | None = None) -> None:
        self.errors += 1
        metrics.SUPERVISOR_ERRORS.labels(step).inc()
        if self._failing.get(step) != cause:  # once per cause, not five times a second
            self._failing[step] = cause
            log.error("supervisor step %r failed (it goes on): %s", step, cause, exc_info=exc)

    def health(self) -> dict[str, Any]:
        """Seconds since each step last succeeded, and whether that is too long ago."""
        now = self.clock()
        steps = {
            step: {
                "seconds_ago": round(now - self.last_ok[step], 1) if step in self.last_ok else None,
                "stale": step in self.last_ok and now - self.last_ok[step] > limit,
                "failing": self._failing.get(step),
            }
            for step, limit in STALE_AFTER.items()
        }
        return {"supervision": steps["runners"], "memory_sampling": steps["memory"], "errors": self.errors}

    # ---- steps -----------------------------------------------------------------------------
    async def check_runners(self, now: float) -> None:
        for model in list(self.models.values()):
            for replica in model.replicas:
                if replica.state is ReplicaState.READY:
                    self.check(model, replica, now)
                elif replica.state is ReplicaState.RESTARTING and self._restart_due(replica, now):
                    replica.restart_at = None
                    self.spawn(self.launcher.start_replica(model, replica))
                elif replica.state is ReplicaState.PARKED:
                    self.check_parked(model, replica)

    async def sample_memory(self, now: float) -> None:
        if not any(m.replicas for m in self.models.values()):
            return
        snapshot = await asyncio.to_thread(self.host.snapshot)
        for key, used, estimate in ledger.measure(list(self.models.values()), snapshot):
            log.warning("%s uses %d bytes, over its reservation of %d", key, used, estimate)

    def check(self, model: RunningModel, replica: Replica, now: float | None = None) -> None:
        """A ready replica: is its process alive, and does it answer?"""
        now = self.clock() if now is None else now
        runner = replica.runner
        if replica.state is not ReplicaState.READY or runner is None:
            return
        if runner.exited() is not None:
            self.crashed(model, replica, now, runner.failure_reason())
            return
        if replica.ping is not None and replica.ping.done():
            ping, replica.ping = replica.ping, None
            if not ping.cancelled() and ping.exception() is None and ping.result():
                replica.last_pong = now
        silent = now - replica.last_pong
        if silent > self.liveness_timeout:
            metrics.HUNG.labels(model.uid).inc()
            reason = f"runner (pid {runner.pid}) did not answer /health for {silent:.0f} s: killed as hung"
            self.crashed(model, replica, now, reason, kill=True)
        elif replica.ping is None and silent >= self.ping_every:
            replica.ping = asyncio.create_task(runner.ping(self.liveness_timeout))

    @staticmethod
    def check_parked(model: RunningModel, replica: Replica) -> None:
        """A parked runner that died holds nothing any more: evicted, and its next request loads it."""
        runner = replica.runner
        if runner is None or runner.exited() is None:
            return
        log.warning("parked %s/%d died (%s): evicted", model.uid, replica.index, runner.failure_reason())
        move(replica, ReplicaState.EVICTED)
        model.unloaded = True

    def crashed(
        self, model: RunningModel, replica: Replica, now: float, reason: str, kill: bool = False
    ) -> None:
        runner = replica.runner
        assert runner is not None
        replica.last_error = reason
        if replica.ping is not None:
            replica.ping.cancel()
            replica.ping = None
        if runner.node_lost:
            # Its node left the cluster: not a crash of the model; place it again where it fits.
            log.warning("model %s replica %d lost: %s", model.uid, replica.index, reason)
            move(replica, ReplicaState.RESTARTING, now, release=True)
            self.launcher.memory_freed()
            self.spawn(self.launcher.replace_replica(model, replica))
            return
        metrics.CRASHES.labels(model.uid).inc()
        lived = now - (replica.ready_since if replica.ready_since is not None else now)
        replica.crashes = replica.crashes + 1 if lived < FAST_CRASH else 1
        log.warning("model %s replica %d died: %s", model.uid, replica.index, reason)
        self.spawn(self._reap(runner, kill))
        if replica.crashes > self.max_restarts:
            if move(replica, ReplicaState.FAILED, now):
                self.launcher.memory_freed()
            return
        move(replica, ReplicaState.RESTARTING, now)  # keeps its reservation: back on the same devices
        replica.restart_at = now + min(0.5 * 2 ** (replica.crashes - 1), MAX_BACKOFF)

    @staticmethod
    def _restart_due(replica: Replica, now: float) -> bool:
        """Its backoff is over and its old process is gone (reaped, or killed as hung)."""
        gone = replica.runner is None or replica.runner.exited() is not None
        return replica.restart_at is not None and replica.restart_at <= now and gone

    @staticmethod
    async def _reap(runner: RunnerHandle, kill: bool) -> None:
        await (runner.kill() if kill else runner.stop())

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("supervisor task failed: %s: %s", type(exc).__name__, exc, exc_info=exc)

    async def stop(self) -> None:
        for task in [*self._tasks, *self.running.values()]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self.running.values(), return_exceptions=True)
