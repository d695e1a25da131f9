"""What the gateway tells a runner at spawn, as one JSON document (shared by both sides)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from shoal.catalog.specs import Source

# Every runner's environment (warm spares' too, so a launch stays warm): the gateway fetched the
# weights before the runner starts, so a runner never calls a hub (a launch's envs may say otherwise).
RUNNER_ENV = {"HF_HUB_OFFLINE": "1"}


class RunnerConfig(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_uid: str
    replica: int
    engine: str
    model_format: str
    source: Source
    context_length: int | None = None
    device: str = "cpu"
    n_threads: int | None = None
    options: dict[str, Any] = {}
    socket: str  # Unix socket the runner listens on (unless `listen` is set)
    listen: str | None = None  # "host:port": listen on TCP instead (runners on Ray nodes)
    listen_fd: int | None = None  # the socket bound to `listen`, inherited from the node agent
    status_file: str  # where the runner writes why it failed to load
    memory_bytes: int | None = None  # the GPU reservation per device, for the torch cap
    profile: bool = False  # warm up with the engine's profile run (largest batch × context), for a profile
