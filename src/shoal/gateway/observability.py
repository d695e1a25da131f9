"""What /metrics adds at scrape time to the counters of shoal.metrics: queue depths, each device's
memory, each replica's formula, estimate, profile, reservation and measured use, and CUDA MPS.

The memory gauges need a snapshot of the devices (NVML, /proc); when it fails (as under descriptor
exhaustion) they are left out of that scrape, with a warning once per cause, and the rest (the
supervisor's error counts among them) is still served."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from shoal.metrics import REGISTRY
from shoal.services.models import ModelService

log = logging.getLogger("shoal.gateway")


class ServiceCollector(Collector):
    def __init__(self, service: ModelService) -> None:
        self.service = service
        self._failing: str | None = None  # why the last scrape's snapshot failed (warned once)

    def _devices(self) -> list[dict[str, Any]] | None:
        try:
            devices = self.service.devices_now()
        except Exception as exc:  # any failure of the snapshot: the rest still serves
            cause = f"{type(exc).__name__}: {exc}"
            if cause != self._failing:
                self._failing = cause
                log.warning("/metrics leaves out the memory gauges: the device snapshot failed: %s", cause)
            return None
        self._failing = None
        return devices

    def collect(self) -> Iterator[Any]:
        queue = GaugeMetricFamily(
            "shoal_queue_depth", "Requests waiting under request_limits", labels=["model"]
        )
        for uid, depth in self.service.queue_depth().items():
            queue.add_metric([uid], depth)
        yield queue
        devices = self._devices()
        if devices is not None:
            yield from self._memory(devices)
        yield from self._rest()

    def _memory(self, devices: list[dict[str, Any]]) -> Iterator[Any]:
        device = GaugeMetricFamily(
            "shoal_device_memory_bytes", "Device memory by part", labels=["device", "part"]
        )
        replica = GaugeMetricFamily(
            "shoal_replica_memory_bytes",
            "Replica memory: formula (the estimator's), estimate (what placed it: formula, corrected "
            "or stored profile), profile (its own profile run's), reserved, measured",
            labels=["model", "replica", "device", "kind"],
        )
        over = GaugeMetricFamily(
            "shoal_replica_over_reservation",
            "1 when measured use exceeds the reservation",
            labels=["model", "replica"],
        )
        for d in devices:
            for part in ("total", "used_by_others", "reserved", "headroom", "free"):
                device.add_metric([d["id"], part], d[f"{part}_bytes"])
            for m in d["models"]:
                labels = [m["model_uid"], str(m["index"]), d["id"]]
                for kind in ("estimate", "profile", "reserved", "measured"):
                    if m.get(f"{kind}_bytes") is not None:
                        replica.add_metric([*labels, kind], m[f"{kind}_bytes"])
                formula = (m.get("breakdown") or {}).get("formula_per_device")
                if formula is not None:
                    replica.add_metric([*labels, "formula"], formula)
                over.add_metric([m["model_uid"], str(m["index"])], 1 if m.get("over_reservation") else 0)
        yield device
        yield replica
        yield over

    def _rest(self) -> Iterator[Any]:
        mps = GaugeMetricFamily("shoal_mps_enabled", "1 while the CUDA MPS daemon caps GPU runners")
        mps.add_metric([], 1 if self.service.mps.status.enabled else 0)
        yield mps
        health = self.service.supervisor.health()
        ago = GaugeMetricFamily(
            "shoal_supervisor_seconds_since_success",
            "Seconds since each supervisor step (runners, memory) last succeeded",
            labels=["step"],
        )
        for step in ("supervision", "memory_sampling"):
            if health[step]["seconds_ago"] is not None:
                ago.add_metric([step], health[step]["seconds_ago"])
        yield ago


_registered: dict[int, ServiceCollector] = {}


def scrape(service: ModelService) -> bytes:
    if id(service) not in _registered:  # one collector per service (tests build several apps)
        for old in _registered.values():
            REGISTRY.unregister(old)
        _registered.clear()
        _registered[id(service)] = ServiceCollector(service)
        REGISTRY.register(_registered[id(service)])
    return generate_latest(REGISTRY)
