"""A running model and its replicas as values, and the one door their state moves through.

`move(replica, to)` is the only place a replica's state changes: it checks the move against the
lifecycle table (an illegal move raises), drops the reservation when the new state holds no
memory, and stamps the times the supervisor and the eviction order read.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shoal.catalog import ModelFamily, ModelSpec, Source
from shoal.engines.base import abilities, context_tokens
from shoal.errors import IllegalTransition
from shoal.protocol.admin import LaunchRequest
from shoal.scheduler import node_of
from shoal.services.plan import LaunchPlan

if TYPE_CHECKING:
    from shoal.hosts import RunnerHandle
    from shoal.hub.download import Pull
    from shoal.hub.resolve import HubModel
    from shoal.services.ledger import Reservation


class ReplicaState(enum.Enum):
    STARTING = "starting"  # process spawned (or about to be), model loading
    READY = "ready"  # answering requests
    PARKED = "parked"  # idle, its weights in host RAM: process alive, no GPU reservation; a request wakes it
    RESTARTING = "restarting"  # its process died or hung; a new one starts after a backoff
    STOPPING = "stopping"  # terminate requested
    STOPPED = "stopped"  # process gone on purpose
    EVICTED = "evicted"  # stopped to make room for another model; a relaunch (or autoload) brings it back
    FAILED = "failed"  # crashed too often, or could not load; last_error says why


S = ReplicaState
ALLOWED: dict[ReplicaState, frozenset[ReplicaState]] = {
    S.STARTING: frozenset({S.READY, S.RESTARTING, S.FAILED, S.STOPPING, S.EVICTED, S.PARKED}),
    S.READY: frozenset({S.RESTARTING, S.FAILED, S.STOPPING, S.EVICTED, S.PARKED}),
    S.PARKED: frozenset({S.STARTING, S.STOPPING, S.EVICTED}),  # STARTING: its wake (placed again)
    S.RESTARTING: frozenset({S.READY, S.RESTARTING, S.FAILED, S.STOPPING, S.EVICTED}),
    S.STOPPING: frozenset({S.STOPPED, S.FAILED}),
    S.STOPPED: frozenset({S.STARTING, S.FAILED}),
    S.EVICTED: frozenset({S.STARTING, S.STOPPING}),
    S.FAILED: frozenset({S.STARTING, S.STOPPING, S.FAILED}),
}
HOLDS_MEMORY = frozenset({S.STARTING, S.READY, S.RESTARTING, S.STOPPING})
HOLDS_HOST_RAM = frozenset({S.PARKED})  # in the host-RAM ledger (the node's CPU device) instead


@dataclass
class Replica:
    index: int
    runner: RunnerHandle | None = None
    state: ReplicaState = ReplicaState.STARTING
    reservation: Reservation | None = None
    in_flight: int = 0
    crashes: int = 0  # consecutive fast crashes
    last_error: str | None = None
    ready_since: float | None = None
    last_used: float = field(default_factory=time.monotonic)
    restart_at: float | None = None  # RESTARTING: when the supervisor starts its new runner
    last_pong: float = 0.0  # when its runner last answered a liveness ping
    ping: asyncio.Task[bool] | None = None  # the liveness ping in flight, if any
    # Parked (or last parked): the devices it left, where its process still is, and what it holds
    # in host RAM; a wake on those devices is fast (same process), elsewhere a new runner.
    parked_from: tuple[str, ...] = ()
    parked_cores: tuple[int, ...] = ()
    parked_bytes: int = 0
    parked_at: float | None = None  # time.time()
    last_wake_seconds: float | None = None  # from the request that woke it to ready again
    last_woken: float | None = None  # time.time()

    @property
    def key(self) -> str:
        return str(self.index)

    def describe(self) -> dict[str, Any]:
        r = self.reservation
        return {
            "index": self.index,
            "state": self.state.value,
            "pid": self.runner.pid if self.runner else None,
            "node": (node_of(r.devices[0]) or None) if r and r.devices else None,
            "device": ",".join(r.devices) if r else None,
            "cores": list(r.cores) if r else [],
            "estimate_bytes": r.estimate if r else None,
            "profile_bytes": r.profile if r else None,
            "measured_bytes": r.measured if r else None,
            "peak_bytes": r.peak if r else None,
            "reserved_bytes": r.reserved if r else None,
            "over_reservation": r.over if r else False,
            "in_flight": self.in_flight,
            "idle_seconds": round(time.monotonic() - self.last_used, 1),
            "restarts": self.crashes,
            "last_error": self.last_error,
            "parked_from": ",".join(self.parked_from) or None,
            "parked_bytes": self.parked_bytes if self.state is ReplicaState.PARKED else None,
            "parked_at": self.parked_at,
            "last_wake_seconds": self.last_wake_seconds,
            "last_woken": self.last_woken,
            "files": self.runner.files_progress() if self.runner else None,
        }


def move(replica: Replica, to: ReplicaState, now: float | None = None, release: bool = False) -> bool:
    """Change the replica's state; True when that gave back its reserved memory. `release` drops
    the reservation even in a state that holds memory (its node is gone: it is placed anew)."""
    if to not in ALLOWED[replica.state]:
        raise IllegalTransition(f"replica {replica.index}: {replica.state.value} → {to.value} is not allowed")
    now = time.monotonic() if now is None else now
    if to is S.PARKED and replica.reservation is not None:  # (a wake that found no room keeps its record)
        r = replica.reservation
        replica.parked_from, replica.parked_cores = r.devices, r.cores
        replica.parked_bytes, replica.parked_at = r.reserved * len(r.devices), time.time()
    replica.state = to
    if to is S.READY:
        replica.ready_since = replica.last_used = replica.last_pong = now
        replica.restart_at = None
    freed = (release or to not in HOLDS_MEMORY) and replica.reservation is not None
    if freed:
        replica.reservation = None
    return freed


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
    limiter: asyncio.Semaphore | None = None
    turn: Iterator[int] = field(default_factory=itertools.count)
    unloaded: bool = False  # unloaded at a client's request (Ollama's keep_alive 0): a request reloads it
    waking: int = 0  # wakes and moves under way: a request for it waits for them
    download: Pull | None = None  # its files coming from a hub (status "downloading" meanwhile)
    hub: HubModel | None = None  # Ray: a hub model whose files each node fetches itself

    def __post_init__(self) -> None:
        if self.request.request_limits:
            self.limiter = asyncio.Semaphore(self.request.request_limits)

    @property
    def context(self) -> int:
        """Tokens one request may fill, as the engine reads this launch (engines.base.context_tokens)."""
        return context_tokens(self.engine, self.request.engine_options(), self.family.context_length)

    @property
    def abilities(self) -> list[str]:
        """The catalog's abilities as this launch's engine can serve them (engines.base.abilities)."""
        return abilities(self.family.model_ability, self.engine)

    @property
    def status(self) -> str:
        states = {r.state for r in self.replicas}
        if self.download is not None and self.download.active and ReplicaState.STARTING in states:
            return "downloading"
        if ReplicaState.READY in states:
            return "ready"
        if states & {ReplicaState.STARTING, ReplicaState.RESTARTING}:
            return "loading"
        if ReplicaState.PARKED in states:
            return "parked"
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
            "model_ability": self.abilities,
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
            "download": self.download.progress() if self.download is not None else None,
        }
