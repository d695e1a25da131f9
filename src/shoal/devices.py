"""Devices Shoal places models on, from one interface with three sources:

- NVML (nvidia-ml-py): real NVIDIA GPUs, their memory and each process's use of it;
- declared fake GPUs (SHOAL_FAKE_GPUS="2x24GiB" or "24GiB,80GiB"): for machines without one, so the
  scheduler and supervisor run end to end; runners placed on them run on the CPU;
- the CPU: RAM and cores.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field

from shoal.units import parse_size

_FAKE = re.compile(r"^(?:(\d+)\s*[xX]\s*)?(.+)$")


@dataclass(frozen=True)
class Device:
    id: str  # "gpu:0" or "cpu"
    kind: str  # "gpu" or "cpu"
    index: int
    name: str
    total_bytes: int
    used_bytes: int  # by every process, Shoal's runners included
    fake: bool = False
    cores: int = 0

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def parse_fake_gpus(spec: str) -> list[int]:
    """ "2x24GiB" → two of 24 GiB; "24GiB,80GiB" → one of each; "" → none."""
    sizes: list[int] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        match = _FAKE.match(part)
        count = int(match.group(1) or 1) if match else 0
        if match is None or count < 1:
            raise ValueError(f"bad SHOAL_FAKE_GPUS entry {part!r}: use e.g. 2x24GiB or 24GiB,80GiB")
        sizes.extend([parse_size(match.group(2))] * count)
    return sizes


def cpu_device() -> Device:
    meminfo: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            meminfo[key] = int(value.split()[0]) * 1024
    total, available = meminfo["MemTotal"], meminfo.get("MemAvailable", meminfo["MemFree"])
    cores = len(os.sched_getaffinity(0))
    return Device("cpu", "cpu", 0, "cpu", total, total - available, cores=cores)


def fake_gpus(spec: str) -> list[Device]:
    return [
        Device(f"gpu:{i}", "gpu", i, f"fake GPU {i}", size, 0, fake=True)
        for i, size in enumerate(parse_fake_gpus(spec))
    ]


def nvml_devices() -> list[Device]:
    """NVIDIA GPUs, or [] when NVML (the driver) is absent."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no driver or no library: a machine without NVIDIA GPUs
        return []
    try:
        devices = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
            devices.append(Device(f"gpu:{i}", "gpu", i, name, int(mem.total), int(mem.used)))
        return devices
    finally:
        pynvml.nvmlShutdown()


def gpu_process_usage() -> dict[tuple[str, int], int]:
    """(device id, pid) → bytes, from NVML's compute processes; {} without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return {}
    try:
        usage: dict[tuple[str, int], int] = {}
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            for proc in [*pynvml.nvmlDeviceGetComputeRunningProcesses(handle), *_mps_clients(handle)]:
                used = proc.usedGpuMemory  # None when the driver cannot say (e.g. in some containers)
                if used is not None:
                    key = (f"gpu:{i}", int(proc.pid))
                    usage[key] = max(usage.get(key, 0), int(used))
        return usage
    finally:
        pynvml.nvmlShutdown()


def _mps_clients(handle: object) -> list[object]:
    """Processes that run through CUDA MPS (shoal serve --mps), listed apart from the others by NVML."""
    import pynvml

    try:
        return list(pynvml.nvmlDeviceGetMPSComputeRunningProcesses(handle))
    except pynvml.NVMLError:  # a driver without MPS client accounting
        return []


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def process_tree(pid: int) -> list[int]:
    """The pid and its descendants on this machine (vLLM's engine core is a child of its runner)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rpartition(")")[2].split()[1])  # the name may hold spaces
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        tree.append(current := todo.pop())
        todo.extend(children.get(current, []))
    return tree


def rss_peak_bytes(pid: int) -> int | None:
    """The process's resident high-water mark (VmHWM), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def all_devices(fake_spec: str = "") -> list[Device]:
    """The CPU, then the GPUs: declared fake ones when SHOAL_FAKE_GPUS is set, else NVML's."""
    gpus = fake_gpus(fake_spec) if fake_spec else nvml_devices()
    return [cpu_device(), *gpus]


@dataclass(frozen=True)
class Snapshot:
    """Devices and what each process uses of them, read at one moment (by a Host)."""

    devices: list[Device]
    gpu_usage: dict[tuple[str, int], int]  # (device id, pid) → bytes, real GPUs only
    # Ray mode: (node's cpu device id, pid) → RSS, as its node agent read it; None: read /proc here
    cpu_usage: dict[tuple[str, int], int] | None = None
    taken: float = field(default=0.0, compare=False)  # time.monotonic() of the reading

    def measure(self, device: Device, pid: int | None) -> int | None:
        """A runner's use of one device, where it can be measured (not on fake GPUs)."""
        if pid is None or device.fake:
            return None
        if device.kind == "cpu":
            return rss_bytes(pid) if self.cpu_usage is None else self.cpu_usage.get((device.id, pid))
        return self.gpu_usage.get((device.id, pid), 0)

    def peak(self, device: Device, pid: int | None) -> int | None:
        """The highest use a runner (with its child processes) reached on a device, for a profile.
        Real GPU: NVML's per-pid use now, which keeps what the warm-up took (torch's caching allocator
        holds it; llama.cpp and vLLM allocate up front). CPU and fake GPUs (their runners compute on
        the CPU): the processes' RSS high-water marks. None where this machine cannot read it (a
        runner on a Ray node's CPU)."""
        if pid is None:
            return None
        on_gpu = device.kind == "gpu" and not device.fake
        if self.cpu_usage is not None:  # Ray: the pid lives on another node; no /proc to walk here
            return self.gpu_usage.get((device.id, pid)) if on_gpu else None
        pids = process_tree(pid)
        if on_gpu:
            return sum(self.gpu_usage.get((device.id, p), 0) for p in pids)
        peaks = [rss_peak_bytes(p) for p in pids]
        return sum(p for p in peaks if p is not None) or None


def read(fake_spec: str = "") -> Snapshot:
    """This machine's devices and per-pid GPU use now (reads NVML and /proc: call it off the loop)."""
    import time

    usage = {} if fake_spec else gpu_process_usage()
    return Snapshot(all_devices(fake_spec), usage, taken=time.monotonic())
