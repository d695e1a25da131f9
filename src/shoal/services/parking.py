"""Carrying out the scheduler's park, wake and move decisions (docs/gpu-sharing.md, "Park and wake").

- Park: the replica leaves the router at once (READY → PARKED: its GPU reservation is released and
  the node's host RAM holds its bytes), then its runner moves the weights to host RAM (POST /park).
  A runner that cannot park is stopped instead (PARKED → EVICTED).
- Wake: PARKED → STARTING, placed again by memory (which may park, evict or move others). On the
  devices it left, its own process brings the weights back (POST /wake: fast, same pid); anywhere
  else a new runner starts there, since a runner's CUDA_VISIBLE_DEVICES is fixed at its spawn.
- Move: park + wake elsewhere, i.e. a new runner on the target GPU; the demand then takes the room.

These run under the model service's placement lock, from its one `_reserve` loop; states change only
through `replicas.move`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from shoal import metrics
from shoal.errors import LaunchFailed, ShoalError
from shoal.hosts import RunnerHandle
from shoal.scheduler import Move
from shoal.services.ledger import Reservation
from shoal.services.replicas import Replica, ReplicaState, RunningModel, move

if TYPE_CHECKING:
    from shoal.services.models import ModelService

log = logging.getLogger("shoal.parking")

PARK_TIMEOUT = 120.0  # seconds a runner may take to move its weights to host RAM or back


async def runner_call(runner: RunnerHandle, path: str) -> str | None:
    """POST to the runner's /park or /wake: None when it answered 200, else what went wrong."""
    try:
        status, text = await runner.http.call("POST", path, timeout=PARK_TIMEOUT)
    except (TimeoutError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if status == 200 else f"{status}: {text[:300].decode('utf-8', 'replace')}"


def _find(service: ModelService, key: str) -> tuple[RunningModel, Replica] | None:
    uid, _, index = key.rpartition("/")
    model = service._models.get(uid)
    if model is None or int(index) >= len(model.replicas):
        return None
    return model, model.replicas[int(index)]


async def park(service: ModelService, key: str, why: str) -> bool:
    """Park one idle replica; False when it is no longer idle (the caller decides again). A runner
    that fails to park is stopped: its room is made all the same."""
    found = _find(service, key)
    if found is None:
        return False
    model, replica = found
    runner = replica.runner
    if replica.state is not ReplicaState.READY or replica.in_flight or runner is None:
        return False
    log.info("parking %s (idle %.0f s) %s", key, time.monotonic() - replica.last_used, why)
    move(replica, ReplicaState.PARKED, service.clock())  # off the router before its weights move
    failure = await runner_call(runner, "/park")
    if failure is not None:
        log.warning("%s could not park (%s): stopped instead", key, failure)
        move(replica, ReplicaState.EVICTED, service.clock())
        metrics.EVICTIONS.labels(model.uid).inc()
        await runner.stop()
        return True
    metrics.PARKS.labels(model.uid).inc()
    return True


async def drop(service: ModelService, key: str, why: str) -> None:
    """Stop a parked replica (host RAM is short): its next request loads it again."""
    found = _find(service, key)
    if found is None or found[1].state is not ReplicaState.PARKED:
        return
    model, replica = found
    log.info("stopping parked %s %s", key, why)
    move(replica, ReplicaState.EVICTED, service.clock())
    model.unloaded = True  # a request brings it back, with or without --autoload
    metrics.EVICTIONS.labels(model.uid).inc()
    if replica.runner is not None:
        await replica.runner.stop()


async def move_replica(service: ModelService, decision: Move, why: str) -> None:
    """Defragment: the replica's room on its GPU is given up now, and a new runner loads it on the
    target GPU in the background (its requests wait meanwhile)."""
    found = _find(service, decision.replica)
    if found is None:
        return
    model, replica = found
    if replica.state is not ReplicaState.READY or replica.in_flight:
        return  # busy again: the caller decides again
    log.info("moving %s from %s to %s %s", decision.replica, decision.source, decision.to, why)
    metrics.MOVES.labels(model.uid).inc()
    stopped = service._runner_ids(replica)
    runner = replica.runner
    total = replica.reservation.device_total if replica.reservation else 0
    move(replica, ReplicaState.PARKED, service.clock())
    move(replica, ReplicaState.STARTING, service.clock())
    replica.reservation = Reservation(
        (decision.to,), model.plan.per_device, model.plan.breakdown, replica.parked_cores, device_total=total
    )
    model.waking += 1
    if runner is not None:
        await runner.stop()
    await service._memory_back(stopped)
    service.supervisor.spawn(_start_moved(service, model, replica))


async def _start_moved(service: ModelService, model: RunningModel, replica: Replica) -> None:
    started = time.monotonic()
    try:
        await service._start(model, replica)
    finally:
        model.waking -= 1
    if replica.state is ReplicaState.READY:
        _woke(model, replica, started, "new_runner")
    else:
        log.error("moved %s/%d failed to start: %s", model.uid, replica.index, replica.last_error)


async def wake(service: ModelService, model: RunningModel) -> None:
    """Wake every parked replica of the model; the request that asked waits for it. Raises the
    placement's error (507 with the numbers) when it cannot be placed again; it stays parked then."""
    parked = [r for r in model.replicas if r.state is ReplicaState.PARKED]
    if not parked:
        return
    started = time.monotonic()
    for replica in parked:  # at once: a request that comes meanwhile waits for these
        move(replica, ReplicaState.STARTING, service.clock())
    model.waking += 1
    try:
        for replica in parked:
            await _wake_one(service, model, replica, started)
    except BaseException:
        for replica in parked:  # those not tried yet stay parked, as they were
            if replica.state is ReplicaState.STARTING and replica.reservation is None:
                move(replica, ReplicaState.PARKED, service.clock())
        raise
    finally:
        model.waking -= 1


async def _wake_one(service: ModelService, model: RunningModel, replica: Replica, started: float) -> None:
    try:
        await service._reserve(model, replica)  # may park, evict or move others
    except ShoalError:
        move(replica, ReplicaState.PARKED, service.clock())  # as it was: process and host RAM kept
        raise
    reservation, runner = replica.reservation, replica.runner
    assert reservation is not None
    if runner is not None and runner.exited() is None and reservation.devices == replica.parked_from:
        reservation.cores = replica.parked_cores  # the same process: the cores it is bound to
        failure = await runner_call(runner, "/wake")
        if failure is None:
            move(replica, ReplicaState.READY, service.clock())
            _woke(model, replica, started, "same_process")
            return
        log.warning("%s/%d could not wake (%s): a new runner loads it", model.uid, replica.index, failure)
    if runner is not None:
        await runner.stop()
    await service._start(model, replica)  # its reservation's devices: a new runner there
    if replica.state is not ReplicaState.READY:
        raise LaunchFailed(f"could not wake {model.uid!r}: {replica.last_error}")
    _woke(model, replica, started, "new_runner")


def _woke(model: RunningModel, replica: Replica, started: float, how: str) -> None:
    seconds = time.monotonic() - started
    replica.last_wake_seconds, replica.last_woken = seconds, time.time()
    metrics.WAKE_SECONDS.labels(model.uid, how).observe(seconds)
    log.info("woke %s/%d in %.2f s (%s)", model.uid, replica.index, seconds, how)


async def wait_until_awake(model: RunningModel, timeout: float) -> None:
    """A request that comes while the model wakes (or moves): wait for it, bounded."""
    deadline = time.monotonic() + timeout
    while model.waking and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
