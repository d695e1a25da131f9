"""Every environment variable Shoal reads, in one place, each with a line of help.

The CLI builds its defaults from here; nothing else calls os.environ for settings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Setting:
    env: str
    default: str
    help: str

    def get(self) -> str:
        return os.environ.get(self.env, self.default)


ENDPOINT = Setting("SHOAL_ENDPOINT", "http://127.0.0.1:9997", "URL of the Shoal server the CLI talks to")
DATA_DIR = Setting(
    "SHOAL_DATA_DIR", str(Path.home() / ".shoal"), "where registrations, logs and sockets live"
)
HOST = Setting("SHOAL_HOST", "127.0.0.1", "address the server listens on")
PORT = Setting("SHOAL_PORT", "9997", "port the server listens on")
LAUNCH_TIMEOUT = Setting("SHOAL_LAUNCH_TIMEOUT", "600", "seconds a runner may take to load its model")
REQUEST_TIMEOUT = Setting("SHOAL_REQUEST_TIMEOUT", "600", "seconds a proxied inference request may take")
MAX_RESTARTS = Setting("SHOAL_MAX_RESTARTS", "5", "fast crashes of a replica before it is marked failed")
LOG_LEVEL = Setting("SHOAL_LOG_LEVEL", "info", "gateway log level")

ALL: tuple[Setting, ...] = (
    ENDPOINT,
    DATA_DIR,
    HOST,
    PORT,
    LAUNCH_TIMEOUT,
    REQUEST_TIMEOUT,
    MAX_RESTARTS,
    LOG_LEVEL,
)


@dataclass(frozen=True)
class ServerSettings:
    """What one gateway process runs with; built by the CLI or by tests."""

    host: str = field(default_factory=HOST.get)
    port: int = field(default_factory=lambda: int(PORT.get()))
    data_dir: Path = field(default_factory=lambda: Path(DATA_DIR.get()))
    launch_timeout: float = field(default_factory=lambda: float(LAUNCH_TIMEOUT.get()))
    request_timeout: float = field(default_factory=lambda: float(REQUEST_TIMEOUT.get()))
    max_restarts: int = field(default_factory=lambda: int(MAX_RESTARTS.get()))
