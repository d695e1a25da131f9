"""Devices Shoal can place models on: the CPU (RAM) and NVIDIA GPUs read through NVML."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Device:
    kind: str  # "cpu" or "gpu"
    index: int
    name: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    cores: int | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def cpu_device() -> Device:
    meminfo: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            meminfo[key] = int(value.split()[0]) * 1024
    total, available = meminfo["MemTotal"], meminfo.get("MemAvailable", meminfo["MemFree"])
    return Device("cpu", 0, "cpu", total, total - available, available, cores=os.cpu_count())


def nvml_devices() -> list[Device]:
    """NVIDIA GPUs, or [] when NVML (the driver) is absent."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no driver, no library: a machine without NVIDIA GPUs
        return []
    try:
        devices = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
            devices.append(Device("gpu", i, name, int(mem.total), int(mem.used), int(mem.free)))
        return devices
    finally:
        pynvml.nvmlShutdown()


def all_devices() -> list[Device]:
    return [cpu_device(), *nvml_devices()]
