"""Where runners live: one seam, chosen once in build_app().

A `Host` reads devices and per-process use, spawns runners, and lists the nodes; `LocalHost` does it
on this machine, `shoal.cluster.RayHost` on every node of a Ray cluster. The model service and the
supervisor see only these two protocols, so they never branch on the environment, and unit tests
drive them over a fake host.
"""

from __future__ import annotations

from typing import Any, Protocol

from shoal.devices import Snapshot
from shoal.hub.download import HubLaunch
from shoal.runners.client import RunnerClient
from shoal.runners.config import RunnerConfig
from shoal.scheduler import Demand, DeviceState


class RunnerHandle(Protocol):
    """One runner process, here or on a node: spawned once, never restarted (a new one is made)."""

    config: RunnerConfig

    @property
    def pid(self) -> int | None: ...

    @property
    def http(self) -> RunnerClient: ...

    @property
    def node_lost(self) -> bool:
        """Its node (or node agent) went away: not a crash of the model."""
        ...

    def exited(self) -> int | None: ...

    def failure_reason(self) -> str: ...

    def files_progress(self) -> dict[str, Any] | None:
        """Its model's files on their way to its node (Ray: downloaded there, or copied from the
        gateway), as GET /v1/models/{uid} shows it."""
        ...

    async def start(self) -> None: ...

    async def wait_ready(self, timeout: float) -> None: ...

    async def ping(self, timeout: float) -> bool:
        """True when /health answers 200 within `timeout` seconds."""
        ...

    async def kill(self) -> None:
        """SIGKILL at once (a hung or stopped process ignores SIGTERM) and reap it."""
        ...

    async def stop(self, grace: float = 5.0) -> None: ...


class Host(Protocol):
    # True where each node gets a hub model's files itself when a replica starts there (Ray): the
    # gateway then does not download them up front (`runner(..., hub=)` says what to fetch)
    fetches_hub_files: bool
    # True where every runner runs on this machine (local); False on a cluster (Ray), where the
    # CUDA MPS daemon the gateway runs would reach no runner on another node
    one_machine: bool

    async def start(self) -> None:
        """Join the cluster (Ray); nothing on one machine."""
        ...

    async def shutdown(self) -> None: ...

    def snapshot(self) -> Snapshot:
        """Devices and per-pid use now (may read NVML: call it off the event loop)."""
        ...

    async def refresh(self) -> None:
        """Make the next snapshot fresh (Ray: poll the node agents now rather than next poll)."""
        ...

    def runner(
        self,
        device_id: str,
        config: RunnerConfig,
        env: dict[str, str],
        log_name: str,
        cores: tuple[int, ...],
        hub: HubLaunch | None = None,
    ) -> RunnerHandle:
        """A runner for a replica placed on `device_id` (not started yet); NodeLost if its node is
        gone. `hub`: a hub model's files, for a host that fetches them on its nodes."""
        ...

    def restrict(self, demand: Demand, worker_ip: str | None, states: list[DeviceState]) -> Demand:
        """The demand limited to the node `worker_ip` names (and, with several nodes, kept off the
        nodes that already run a replica of the model)."""
        ...

    def workers(self, runners: int) -> list[dict[str, Any]]:
        """GET /v1/workers: the nodes."""
        ...

    async def remove_hub(
        self, hub: str, repo: str, copies_of: str, dry_run: bool = False
    ) -> list[dict[str, Any]]:
        """`shoal rm-cache` on the nodes (Ray): each node's report on the hub repo in its own cache
        and its copies of the gateway's files of it (`copies_of`: the gateway's folder of the repo),
        removed unless `dry_run` or a runner there uses them. One machine: none (its cache is the
        gateway's)."""
        ...


__all__ = ["Host", "RunnerHandle"]
