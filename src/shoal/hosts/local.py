"""One machine: NVML (or declared fake GPUs) and the CPU here; runners on Unix sockets, started from
warm spares (hosts/spares.py) when there is one for the engine's family."""

from __future__ import annotations

import functools
import itertools
import shutil
import socket
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from shoal import devices
from shoal.devices import Snapshot
from shoal.hosts.spares import Spares
from shoal.runners.config import RunnerConfig
from shoal.runners.process import RunnerProcess
from shoal.scheduler import Demand, DeviceState


@functools.cache
def local_names() -> frozenset[str]:
    """What worker_ip may say on one machine (as Xinference's local worker): "local", loopback, the
    host's name, or one of its addresses."""
    names = {"local", "localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn()}
    try:
        names.update(str(info[4][0]) for info in socket.getaddrinfo(socket.gethostname(), None))
    except OSError:
        pass
    return frozenset(str(name) for name in names)


class LocalHost:
    fetches_hub_files = False  # the gateway downloads into its cache, which its runners read
    one_machine = True

    def __init__(self, fake_gpus: str, logs: Path, spare_families: tuple[str, ...] = ()) -> None:
        self.fake_gpus = fake_gpus
        self.logs = logs
        self.logs.mkdir(parents=True, exist_ok=True)
        # Unix socket paths are limited to 107 bytes, so sockets live in a short temp dir.
        self.run_dir = Path(tempfile.mkdtemp(prefix="shoal-"))
        self._spawned = itertools.count()
        self.spares = Spares(spare_families, logs) if spare_families else None

    async def start(self) -> None:
        if self.spares is not None:
            await self.spares.start()

    async def shutdown(self) -> None:
        if self.spares is not None:
            await self.spares.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def snapshot(self) -> Snapshot:
        return devices.read(self.fake_gpus)

    async def refresh(self) -> None:
        pass  # every snapshot reads NVML afresh

    def runner(
        self,
        device_id: str,
        config: RunnerConfig,
        env: dict[str, str],
        log_name: str,
        cores: tuple[int, ...],
        hub: object = None,  # (the hub files are in this machine's cache by now)
    ) -> RunnerProcess:
        n = next(self._spawned)
        config = config.model_copy(
            update={
                "socket": str(self.run_dir / f"r{n}.sock"),
                "status_file": str(self.run_dir / f"r{n}.status"),
            }
        )
        config_path = self.run_dir / f"r{n}.json"
        return RunnerProcess(config, self.logs / log_name, env, cores, config_path, self.spares)

    def restrict(self, demand: Demand, worker_ip: str | None, states: list[DeviceState]) -> Demand:
        if worker_ip is not None and worker_ip not in local_names():
            return replace(demand, allowed=(f"(no node matches worker_ip {worker_ip})",))
        return demand

    def workers(self, runners: int) -> list[dict[str, Any]]:
        ids = [d.id for d in devices.all_devices(self.fake_gpus)]
        local = {"node": "local", "node_id": None, "worker_ip": "127.0.0.1", "alive": True}
        return [{**local, "devices": ids, "runners": runners}]

    async def remove_hub(
        self, hub: str, repo: str, copies_of: str, dry_run: bool = False
    ) -> list[dict[str, Any]]:
        return []  # the gateway's cache is this machine's
