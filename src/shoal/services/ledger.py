"""The memory ledger: what each replica holds, as the scheduler's frozen holdings, and a no-fit
decision worded with its numbers. Pure functions over the running models and a Snapshot.

The rule for what a replica holds (docs/gpu-sharing.md): its estimate (or declared gpu_memory),
raised to its measured use while that use lasts. The highest use ever seen is kept as `peak` for
people and metrics, but a spike the runner gave back does not keep the room from later launches.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from shoal.devices import Snapshot
from shoal.engines.registry import PARKS
from shoal.scheduler import DeviceState, Holding, NoFit, Policy, free_bytes, headroom_bytes, node_of
from shoal.services.replicas import HOLDS_HOST_RAM, HOLDS_MEMORY, Replica, ReplicaState, RunningModel
from shoal.units import gib


@dataclass
class Reservation:
    """What one replica holds: the same bytes on each of its devices."""

    devices: tuple[str, ...]
    estimate: int  # per device: the estimator's total, or the launch's declared gpu_memory
    breakdown: dict[str, object]  # the estimate's parts, for the devices route and the UI
    cores: tuple[int, ...] = ()
    device_total: int = 0  # bytes of the smallest of its devices (for a torch memory fraction)
    measured: int | None = None  # per device: the latest use seen (NVML per pid, or RSS on the CPU)
    peak: int | None = None  # per device: the highest use seen since it was placed
    # per device: this replica's own profile run, peak × (1 + margin); once set it replaces the estimate
    profile: int | None = None

    @property
    def base(self) -> int:
        """What it holds before measurements raise it: its profile once measured, else the estimate."""
        return self.estimate if self.profile is None else self.profile

    @property
    def reserved(self) -> int:
        return max(self.base, self.measured or 0)

    @property
    def over(self) -> bool:
        return self.measured is not None and self.measured > self.base

    def record(self, used: int) -> bool:
        """A new measurement; True when it first goes over the estimate."""
        was_over = self.over
        self.measured, self.peak = used, max(self.peak or 0, used)
        return self.over and not was_over


def device_states(snapshot: Snapshot, shoal_use: dict[str, int]) -> list[DeviceState]:
    """Devices as the scheduler sees them: memory used by others excludes Shoal's own runners."""
    return [
        DeviceState(
            d.id,
            "cpu" if d.kind == "cpu" else "gpu",
            d.total_bytes,
            max(0, d.used_bytes - shoal_use.get(d.id, 0)),
            d.cores,
        )
        for d in snapshot.devices
    ]


def explain(uid: str, fit: NoFit, holdings: list[Holding], now_blocked: dict[str, str]) -> str:
    free = "; ".join(f"{r.device} {gib(r.free)} free of {gib(r.total)}" for r in fit.devices) or "none"
    evictable = sum(r.evictable for r in fit.devices)
    blocked = ", ".join(f"{h} ({now_blocked.get(h, 'held')})" for h in fit.blocked) or "none"
    return (
        f"cannot place {uid!r}: it needs {gib(fit.needed)} on each of {fit.n_devices} device(s), "
        f"{fit.reason}. Free: {free}. Evictable now: {gib(evictable)}. Held and not evictable: {blocked}."
    )


def nofit_details(fit: NoFit) -> dict[str, object]:
    return {
        "needed_bytes": fit.needed,
        "n_devices": fit.n_devices,
        "reason": fit.reason,
        "devices": [
            {"device": r.device, "total_bytes": r.total, "free_bytes": r.free, "evictable_bytes": r.evictable}
            for r in fit.devices
        ],
        "not_evictable": list(fit.blocked),
    }


def device_report(
    states: list[DeviceState],
    snapshot: Snapshot,
    holdings: list[Holding],
    models: dict[str, dict[str, object]],
    policy: Policy,
) -> list[dict[str, object]]:
    """GET /v1/cluster/devices: each device's total, use by others, each model's share, and free."""
    report: list[dict[str, object]] = []
    for state, device in zip(states, snapshot.devices, strict=True):
        here = [h for h in holdings if h.device == state.id]
        report.append(
            {
                "id": state.id,
                "node": state.id.rpartition("/")[0] or None,  # Ray mode: the node; else None
                "kind": state.kind,
                "index": device.index,
                "name": device.name,
                "fake": device.fake,
                "total_bytes": state.total,
                "used_by_others_bytes": state.used_by_others,
                "reserved_bytes": sum(h.reserved for h in here),
                "headroom_bytes": headroom_bytes(state, policy),
                "free_bytes": free_bytes(state, holdings, policy),
                "cores": state.cores or None,
                "models": [models[h.replica] for h in here if h.replica in models],
            }
        )
    return report


def _replicas(models: Iterable[RunningModel]) -> Iterator[tuple[RunningModel, Replica]]:
    for model in models:
        for replica in model.replicas:
            yield model, replica


def host_ram_device(devices: tuple[str, ...]) -> str:
    """The CPU device of the node these devices are on: where a parked replica's bytes are held."""
    node = node_of(devices[0]) if devices else ""
    return f"{node}/cpu" if node else "cpu"


def holdings(models: Iterable[RunningModel]) -> list[Holding]:
    """Every reservation, as the scheduler's frozen values; a parked replica as a holding of its
    node's host RAM (idle, keep-alive 0: the first to go when RAM is short, least recently used first)."""
    held = []
    for model, replica in _replicas(models):
        key = f"{model.uid}/{replica.index}"
        if replica.state in HOLDS_HOST_RAM:
            ram = host_ram_device(replica.parked_from)
            held.append(
                Holding(
                    key, ram, replica.parked_bytes, replica.last_used, replica.last_used, 0.0, parked=True
                )
            )
            continue
        r = replica.reservation
        if r is None or replica.state not in HOLDS_MEMORY:
            continue
        idle = replica.in_flight == 0 and replica.state is ReplicaState.READY
        on_gpu = model.plan.kind == "gpu"
        can_park = on_gpu and model.engine in PARKS and replica.runner is not None
        # a move is a new runner on another GPU: only for a replica free to go to any of them
        can_move = (
            on_gpu
            and model.plan.n_devices == 1
            and model.plan.allowed is None
            and not model.request.worker_ip
        )
        for i, device in enumerate(r.devices):
            held.append(
                Holding(
                    f"{model.uid}/{replica.index}",
                    device,
                    r.reserved,
                    replica.last_used,
                    replica.last_used if idle else None,
                    model.keep_alive,
                    model.request.pinned,
                    r.cores if i == 0 else (),
                    can_park=can_park,
                    can_move=can_move,
                )
            )
    return held


def shoal_use(models: Iterable[RunningModel], snapshot: Snapshot) -> dict[str, int]:
    """Per device, what Shoal's own runners are measured to use (so it is not counted as others')."""
    use: dict[str, int] = {}
    by_id = {d.id: d for d in snapshot.devices}
    for _, replica in _replicas(models):
        pid = replica.runner.pid if replica.runner else None
        held = replica.reservation.devices if replica.reservation else ()
        if replica.state in HOLDS_HOST_RAM:  # its process's RSS is the parked weights: Shoal's, not others'
            held = (host_ram_device(replica.parked_from),)
        for device_id in held:
            measured = snapshot.measure(by_id[device_id], pid) if device_id in by_id else None
            use[device_id] = use.get(device_id, 0) + (measured or 0)
    return use


def blocked_reasons(models: Iterable[RunningModel], now: float | None = None) -> dict[str, str]:
    """Why each replica may not be evicted now (for a 507's message)."""
    now = time.monotonic() if now is None else now
    reasons = {}
    for model, replica in _replicas(models):
        key = f"{model.uid}/{replica.index}"
        if model.request.pinned:
            reasons[key] = "pinned"
        elif replica.in_flight or replica.state is not ReplicaState.READY:
            reasons[key] = "busy" if replica.in_flight else replica.state.value
        elif model.keep_alive < 0:
            reasons[key] = "keep_alive -1"
        else:
            reasons[key] = f"idle {now - replica.last_used:.0f} s of keep_alive {model.keep_alive:.0f} s"
    return reasons


def measure(models: Iterable[RunningModel], snapshot: Snapshot) -> list[tuple[str, int, int]]:
    """Record each ready replica's use; returns (replica, used, base) of those that just went over."""
    by_id = {d.id: d for d in snapshot.devices}
    went_over = []
    for model, replica in _replicas(models):
        r = replica.reservation
        if r is None or replica.runner is None or replica.state is not ReplicaState.READY:
            continue
        seen = [snapshot.measure(by_id[d], replica.runner.pid) for d in r.devices if d in by_id]
        values = [v for v in seen if v is not None]
        if values and r.record(max(values)):
            went_over.append((f"{model.uid}/{replica.index}", r.measured or 0, r.base))
    return went_over
