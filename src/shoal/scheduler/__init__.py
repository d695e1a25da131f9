"""Placement by memory: a pure function over frozen values. No I/O, no clock, no asyncio.

    free(device) = total − used by processes that are not Shoal's − Shoal's reservations − headroom

Every model kind follows the same rule: there are no per-kind slots and no order rules, so whether
a launch fits depends only on the memory (and, for the CPU, cores) that earlier launches hold.
When nothing fits: first an idle replica is moved to another GPU if that makes room (`Move`: the
fewest bytes moved); else idle, unpinned replicas past their keep-alive make room in
least-recently-used order (`Evict`), each *parked* (its weights to the node's host RAM, its process
alive) where its engine can park and host RAM holds it, else stopped; otherwise the answer explains
the numbers. Host RAM is the node's CPU device: a parked replica is a holding there, so parked
weights and CPU models share one budget, and the least recently used parked replicas are stopped
first when it runs out.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
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
    can_park: bool = False  # its engine can move its weights to host RAM and back (a GPU holding)
    can_move: bool = False  # one device, no gpu_idx: a defragmenting move may take it to another GPU
    parked: bool = False  # a parked replica's weights, held in its node's host RAM (the CPU device)


@dataclass(frozen=True)
class Demand:
    per_device: int  # bytes needed on each device used
    kind: Literal["gpu", "cpu", "auto"] = "auto"  # auto: GPUs when there are any, else the CPU
    n_devices: int = 1  # GPUs for one replica (engines that split a model)
    allowed: tuple[str, ...] | None = None  # gpu_idx pinning: only these device ids
    cores: int = 0  # runners that compute on the CPU (CPU or fake-GPU replicas): cores wanted
    avoid: frozenset[str] = frozenset()  # devices already holding a replica of this model
    prefer: tuple[str, ...] = ()  # a parked replica's wake: the devices it left (its process is there)


@dataclass(frozen=True)
class Policy:
    name: Literal["binpack", "spread"] = "binpack"
    headroom: float = 0.05  # fraction of each device kept free
    park_limit: int | None = (
        None  # bytes parked replicas may hold per node (None: its free RAM; 0: never park)
    )


@dataclass(frozen=True)
class Place:
    devices: tuple[str, ...]
    cores: tuple[int, ...] = ()


@dataclass(frozen=True)
class Evict:
    victims: tuple[str, ...]  # replicas to stop first, least recently used first
    then: Place
    park: tuple[str, ...] = ()  # replicas to park instead (weights to host RAM, process kept)
    drop: tuple[str, ...] = ()  # parked replicas to stop first so those parks fit in host RAM (LRU)


@dataclass(frozen=True)
class Move:
    """Defragment: move one idle replica to another GPU, then place the demand where it was."""

    replica: str
    source: str
    to: str
    moved: int  # bytes that move
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


Decision = Place | Move | Evict | NoFit


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
    """Where one replica goes, what must move, park or be evicted first, or why it cannot go anywhere."""
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
            # fewest evictions first; then other replicas of the same model elsewhere; then where a
            # parked replica's process is; then the policy
            fit = free if policy.name == "binpack" else -free
            options.append(
                (
                    len(victims),
                    device.id in demand.avoid,
                    device.id not in demand.prefer,
                    fit,
                    device.id,
                    victims,
                )
            )
    options.sort()
    if demand.n_devices == 1 and not (options and not options[0][5]):
        moved = plan_move(demand, devices, candidates, holdings, policy, now)
        if moved is not None:  # nothing fits as it is: a move keeps every model loaded
            return moved
    if len(options) >= demand.n_devices:
        chosen = options[: demand.n_devices]
        ids = tuple(sorted(o[4] for o in chosen))
        victims = tuple(dict.fromkeys(v for o in chosen for v in o[5]))  # a multi-GPU victim once
        target = Place(ids, _cores(demand, devices, holdings, ids, victims))
        return park_or_stop(victims, target, devices, holdings, policy) if victims else target
    return _explain(demand, candidates, holdings, policy, now)


def _cores(
    demand: Demand,
    devices: list[DeviceState],
    holdings: list[Holding],
    ids: tuple[str, ...],
    gone: tuple[str, ...],
) -> tuple[int, ...]:
    """Cores are those of the chosen devices' node (a cluster has one CPU per node)."""
    node = node_of(ids[0])
    cpu = next((d for d in devices if d.kind == "cpu" and node_of(d.id) == node), None)
    if not demand.cores or cpu is None or not cpu.cores:
        return ()
    same_node = [h for h in holdings if h.replica not in gone and node_of(h.device) == node]
    return share_cores(cpu.cores, same_node, demand.cores)


def movable(holding: Holding) -> bool:
    """An idle replica a defragmenting move may take elsewhere (it need not be past its keep-alive:
    it stays loaded)."""
    return (
        holding.can_move
        and not holding.pinned
        and not holding.parked
        and holding.idle_since is not None
        and holding.keep_alive >= 0
    )


def plan_move(
    demand: Demand,
    devices: list[DeviceState],
    candidates: list[DeviceState],
    holdings: list[Holding],
    policy: Policy,
    now: float,
) -> Move | None:
    """The move of one idle single-device replica to another GPU of its node, with room there as it
    is, after which the demand fits where the replica was: the fewest bytes moved; None when no
    single move makes room."""
    spans = Counter(h.replica for h in holdings)
    free = {d.id: free_bytes(d, holdings, policy) for d in devices}
    best: tuple[tuple[int, int, str, str, str], Holding, str, str] | None = None
    for device in candidates:
        for holding in holdings:
            if holding.device != device.id or spans[holding.replica] != 1 or not movable(holding):
                continue
            if free[device.id] + holding.reserved < demand.per_device:
                continue
            for target in devices:
                same_pool = target.kind == device.kind and node_of(target.id) == node_of(device.id)
                if target.id == device.id or not same_pool or free[target.id] < holding.reserved:
                    continue
                fit = free[target.id] if policy.name == "binpack" else -free[target.id]
                key = (holding.reserved, fit, device.id, target.id, holding.replica)
                if best is None or key < best[0]:
                    best = (key, holding, device.id, target.id)
    if best is None:
        return None
    _, holding, source, to = best
    after = [replace(h, device=to) if h is holding else h for h in holdings]
    then = place(replace(demand, allowed=(source,), prefer=()), devices, after, policy, now)
    assert isinstance(then, Place)  # it fits there directly once the replica has gone
    return Move(holding.replica, source, to, holding.reserved, then)


def park_or_stop(
    victims: tuple[str, ...],
    target: Place,
    devices: list[DeviceState],
    holdings: list[Holding],
    policy: Policy,
) -> Evict:
    """Which victims park (their engine can, and the node's host RAM holds their bytes, perhaps after
    stopping parked replicas used less recently than they were) and which are stopped."""
    node = node_of(target.devices[0])
    cpu = next((d for d in devices if d.kind == "cpu" and node_of(d.id) == node), None)
    if cpu is None or policy.park_limit == 0:
        return Evict(victims, target)
    by_replica: dict[str, list[Holding]] = {}
    for h in holdings:
        by_replica.setdefault(h.replica, []).append(h)
    on_cpu = [h for h in holdings if h.device == cpu.id]
    parked = sorted((h for h in on_cpu if h.parked), key=lambda h: (h.last_used, h.replica))
    room = free_bytes(cpu, on_cpu, policy)
    if policy.park_limit is not None:
        room = min(room, policy.park_limit - sum(h.reserved for h in parked))
    stop: list[str] = []
    park: list[str] = []
    drop: list[str] = []
    for key in victims:
        held = by_replica.get(key, [])
        if not held or any(h.device == cpu.id or not h.can_park for h in held):
            stop.append(key)
            continue
        need = sum(h.reserved for h in held)  # its bytes on each of its GPUs
        older = [h for h in parked if h.last_used <= held[0].last_used]
        freed, n = 0, 0
        while room + freed < need and n < len(older):
            freed += older[n].reserved
            n += 1
        if room + freed < need:
            stop.append(key)
            continue
        drop += [h.replica for h in older[:n]]
        parked = [h for h in parked if h not in older[:n]]
        room += freed - need
        park.append(key)
    return Evict(tuple(stop), target, tuple(park), tuple(drop))


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
