"""Placement by memory: a pure function over frozen values. No I/O, no clock, no asyncio.

    free(device) = total − used by processes that are not Shoal's − Shoal's reservations − headroom

Every model kind follows the same rule: there are no per-kind slots and no order rules, so whether
a launch fits depends only on the memory (and, for the CPU, cores) that earlier launches hold.
When nothing fits, idle and unpinned replicas past their keep-alive are evicted in
least-recently-used order if that makes room; otherwise the answer explains the numbers.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["gpu", "cpu"]


@dataclass(frozen=True)
class DeviceState:
    id: str  # "gpu:0", "cpu"
    kind: Kind
    total: int  # bytes
    used_by_others: int  # bytes held by processes that are not Shoal's runners
    cores: int = 0  # CPU only: cores to share out among CPU runners


@dataclass(frozen=True)
class Holding:
    """One replica's reservation on one device."""

    replica: str  # "uid/index"
    device: str
    reserved: int  # bytes: max(estimate or declared, measured)
    last_used: float  # when it last served a request (the caller's clock)
    idle_since: float | None  # None while it has requests in flight
    keep_alive: float  # seconds idle before it may be evicted; negative: never
    pinned: bool = False
    cores: tuple[int, ...] = ()


@dataclass(frozen=True)
class Demand:
    per_device: int  # bytes needed on each device used
    kind: Literal["gpu", "cpu", "auto"] = "auto"  # auto: GPUs when there are any, else the CPU
    n_devices: int = 1  # GPUs for one replica (engines that split a model)
    allowed: tuple[str, ...] | None = None  # gpu_idx pinning: only these device ids
    cores: int = 0  # runners that compute on the CPU (CPU or fake-GPU replicas): cores wanted
    avoid: frozenset[str] = frozenset()  # devices already holding a replica of this model


@dataclass(frozen=True)
class Policy:
    name: Literal["binpack", "spread"] = "binpack"
    headroom: float = 0.05  # fraction of each device kept free


@dataclass(frozen=True)
class Place:
    devices: tuple[str, ...]
    cores: tuple[int, ...] = ()


@dataclass(frozen=True)
class Evict:
    victims: tuple[str, ...]  # replicas to stop first, least recently used first
    then: Place


@dataclass(frozen=True)
class DeviceReport:
    device: str
    total: int
    free: int
    evictable: int  # bytes idle unpinned replicas past keep-alive hold here


@dataclass(frozen=True)
class NoFit:
    needed: int
    n_devices: int
    devices: tuple[DeviceReport, ...]
    reason: str
    blocked: tuple[str, ...] = field(default=())  # replicas that hold memory but may not be evicted


Decision = Place | Evict | NoFit


def node_of(device_id: str) -> str:
    """ "node-ab12cd34/gpu:0" → "node-ab12cd34"; one machine's "gpu:0" → ""."""
    return device_id.rpartition("/")[0]


def headroom_bytes(device: DeviceState, policy: Policy) -> int:
    return int(device.total * policy.headroom)


def free_bytes(device: DeviceState, holdings: tuple[Holding, ...] | list[Holding], policy: Policy) -> int:
    reserved = sum(h.reserved for h in holdings if h.device == device.id)
    return device.total - device.used_by_others - reserved - headroom_bytes(device, policy)


def evictable(holding: Holding, now: float) -> bool:
    if holding.pinned or holding.idle_since is None or holding.keep_alive < 0:
        return False
    return now - holding.idle_since >= holding.keep_alive


def _candidates(demand: Demand, devices: list[DeviceState]) -> list[DeviceState]:
    kind = demand.kind
    if kind == "auto":
        kind = "gpu" if any(d.kind == "gpu" for d in devices) else "cpu"
    chosen = [d for d in devices if d.kind == kind]
    if demand.allowed is not None:
        chosen = [d for d in chosen if d.id in demand.allowed]
    return chosen


def _victims_for(
    device: DeviceState, here: list[Holding], free: int, demand: Demand, now: float
) -> tuple[str, ...] | None:
    """The fewest LRU victims that make room on this device: () when it fits, None when impossible."""
    if free >= demand.per_device:
        return ()
    victims: list[str] = []
    for holding in sorted((h for h in here if evictable(h, now)), key=lambda h: (h.last_used, h.replica)):
        victims.append(holding.replica)
        free += holding.reserved
        if free >= demand.per_device:
            return tuple(victims)
    return None


def share_cores(n_cores: int, holdings: list[Holding], wanted: int) -> tuple[int, ...]:
    """The least-shared CPU cores for a runner that computes on the CPU (a CPU replica, or one on a
    fake GPU). Soft: cores are shared only when every core is already taken."""
    load = Counter(core for h in holdings for core in h.cores)
    ranked = sorted(range(n_cores), key=lambda c: (load[c], c))
    return tuple(sorted(ranked[: max(1, min(wanted, n_cores))]))


def place(
    demand: Demand, devices: list[DeviceState], holdings: list[Holding], policy: Policy, now: float
) -> Decision:
    """Where one replica goes, what must be evicted first, or why it cannot go anywhere."""
    candidates = _candidates(demand, devices)
    by_device: dict[str, list[Holding]] = {}
    for holding in holdings:  # one pass: placement stays linear in devices + holdings
        by_device.setdefault(holding.device, []).append(holding)
    options = []
    for device in candidates:
        here = by_device.get(device.id, [])
        free = free_bytes(device, here, policy)
        victims = _victims_for(device, here, free, demand, now)
        if victims is not None:
            # fewest evictions first; then other replicas of the same model elsewhere; then the policy
            fit = free if policy.name == "binpack" else -free
            options.append((len(victims), device.id in demand.avoid, fit, device.id, victims))
    options.sort()
    if len(options) >= demand.n_devices:
        chosen = options[: demand.n_devices]
        ids = tuple(sorted(o[3] for o in chosen))
        victims = tuple(v for o in chosen for v in o[4])
        # Cores are those of the chosen devices' node (a cluster has one CPU per node).
        node = node_of(ids[0])
        cpu = next((d for d in devices if d.kind == "cpu" and node_of(d.id) == node), None)
        cores: tuple[int, ...] = ()
        if demand.cores and cpu is not None and cpu.cores:
            same_node = [h for h in holdings if h.replica not in victims and node_of(h.device) == node]
            cores = share_cores(cpu.cores, same_node, demand.cores)
        target = Place(ids, cores)
        return Evict(victims, target) if victims else target
    return _explain(demand, candidates, holdings, policy, now)


def _explain(
    demand: Demand,
    candidates: list[DeviceState],
    holdings: list[Holding],
    policy: Policy,
    now: float,
) -> NoFit:
    reports = tuple(
        DeviceReport(
            d.id,
            d.total,
            free_bytes(d, holdings, policy),
            sum(h.reserved for h in holdings if h.device == d.id and evictable(h, now)),
        )
        for d in candidates
    )
    blocked = tuple(
        sorted(
            h.replica for h in holdings if h.device in {d.id for d in candidates} and not evictable(h, now)
        )
    )
    if not candidates:
        if demand.allowed is not None:
            reason = f"no device among {', '.join(demand.allowed)}"
        else:
            reason = f"no {demand.kind} device"
    elif demand.n_devices > len(candidates):
        reason = f"needs {demand.n_devices} devices, {len(candidates)} exist"
    elif all(demand.per_device > d.total - d.used_by_others - headroom_bytes(d, policy) for d in candidates):
        reason = "larger than any device"
    else:
        reason = "not enough free memory, even after evicting every idle model past its keep-alive"
    return NoFit(demand.per_device, demand.n_devices, reports, reason, blocked)
