"""Which replica serves a request: `async with router.lease(uid) as replica:` borrows the least busy
ready replica (round-robin among equals) for the length of the block, and gives it back on every
way out. Under a model's request_limits, a lease waits in a queue of at most max_queue; past it, 503.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from shoal.errors import ModelNotFound, ModelUnavailable
from shoal.services.replicas import Replica, ReplicaState, RunningModel


class Router:
    def __init__(self, models: Mapping[str, RunningModel]) -> None:
        self._models = models  # the service's own dict: the router only reads it

    def get(self, uid: str) -> RunningModel:
        model = self._models.get(uid)
        if model is None:
            shown = uid if len(uid) <= 200 else f"{uid[:200]}... ({len(uid)} characters)"
            raise ModelNotFound(f"model {shown!r} is not running (see GET /v1/models)")
        return model

    @asynccontextmanager
    async def lease(self, uid: str) -> AsyncIterator[Replica]:
        model = self.get(uid)
        ready_replicas(model)  # fail fast, before queueing, when none is ready
        limiter = model.limiter
        if limiter is not None:
            if limiter.locked() and model.waiting >= model.request.max_queue:
                raise ModelUnavailable(
                    f"model {uid!r} is at its limit of {model.request.request_limits} requests at once "
                    f"with {model.waiting} queued (max_queue {model.request.max_queue}); retry shortly",
                    retry_after=1,
                )
            model.waiting += 1
            try:
                await limiter.acquire()
            finally:
                model.waiting -= 1
        try:
            ready = ready_replicas(model)
            turn = next(model.turn)
            replica = min(ready, key=lambda r: (r.in_flight, (r.index - turn) % len(model.replicas)))
            replica.in_flight += 1
            replica.last_used = time.monotonic()
            try:
                yield replica
            finally:
                replica.in_flight -= 1
                replica.last_used = time.monotonic()
        finally:
            if limiter is not None:
                limiter.release()

    def queue_depth(self) -> dict[str, int]:
        return {uid: m.waiting for uid, m in self._models.items()}


def ready_replicas(model: RunningModel) -> list[Replica]:
    uid = model.uid
    ready = [r for r in model.replicas if r.state is ReplicaState.READY]
    if ready:
        return ready
    if model.status == "failed":
        errors = "; ".join(r.last_error or "unknown" for r in model.replicas)
        raise ModelUnavailable(f"model {uid!r} failed: {errors}", retry_after=30)
    if model.status == "evicted":
        raise ModelUnavailable(
            f"model {uid!r} was evicted to make room for another model; launch it again "
            "(or run the server with --autoload to reload it on demand)",
            retry_after=30,
        )
    if model.status == "stopped":
        raise ModelUnavailable(f"model {uid!r} is being stopped", retry_after=30)
    raise ModelUnavailable(f"model {uid!r} is loading or restarting; retry shortly", retry_after=2)


def gone_message(uid: str, replica: Replica, cause: str) -> str:
    """Why a request lost its runner, from what the replica is doing now."""
    if replica.state in (ReplicaState.STOPPING, ReplicaState.STOPPED):
        return f"model {uid!r} was terminated while this request was running"
    if replica.state is ReplicaState.EVICTED:
        return f"model {uid!r} was evicted while this request was running"
    return f"model {uid!r} stopped answering ({cause}); it is being restarted"
