"""The memory ledger's I/O side: read devices and per-process use, turn replicas into the
scheduler's frozen holdings, and word a no-fit decision with its numbers."""

from __future__ import annotations

from dataclasses import dataclass

from shoal.devices import Device, all_devices, gpu_process_usage, rss_bytes
from shoal.scheduler import DeviceState, Holding, NoFit, Policy, free_bytes, headroom_bytes
from shoal.units import gib


@dataclass
class Reservation:
    """What one replica holds: the same bytes on each of its devices."""

    devices: tuple[str, ...]
    estimate: int  # per device: the estimator's total, or the launch's declared gpu_memory
    breakdown: dict[str, object]  # the estimate's parts, for the devices route and the UI
    cores: tuple[int, ...] = ()
    device_total: int = 0  # bytes of the smallest of its devices (for a torch memory fraction)
    measured: int | None = None  # per device: the highest use seen (NVML per pid, or RSS on the CPU)

    @property
    def reserved(self) -> int:
        return max(self.estimate, self.measured or 0)

    @property
    def over(self) -> bool:
        return self.measured is not None and self.measured > self.estimate


@dataclass(frozen=True)
class Snapshot:
    devices: list[Device]
    gpu_usage: dict[tuple[str, int], int]  # (device id, pid) → bytes, real GPUs only
    # Ray mode: (node's cpu device id, pid) → RSS, as its node agent read it; None: read /proc here
    cpu_usage: dict[tuple[str, int], int] | None = None

    def measure(self, device: Device, pid: int | None) -> int | None:
        """A runner's use of one device, where it can be measured (not on fake GPUs)."""
        if pid is None or device.fake:
            return None
        if device.kind == "cpu":
            return rss_bytes(pid) if self.cpu_usage is None else self.cpu_usage.get((device.id, pid))
        return self.gpu_usage.get((device.id, pid), 0)


def read(fake_gpus: str) -> Snapshot:
    devices = all_devices(fake_gpus)
    usage = {} if fake_gpus else gpu_process_usage()
    return Snapshot(devices, usage)


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
