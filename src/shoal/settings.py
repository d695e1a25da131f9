"""Every environment variable Shoal reads, in one place, each with a line of help.

The CLI builds its defaults from here (and `shoal serve --help` lists them all, from ALL); nothing
else calls os.environ for settings. ServerSettings checks its numbers when it is built: a value that
does not parse or is out of bounds raises SettingError, whose one-line message names the setting.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from shoal.units import parse_size

T = TypeVar("T")


class SettingError(ValueError):
    """A setting's value Shoal cannot run with; the message names the setting, on one line."""


@dataclass(frozen=True)
class Setting:
    env: str
    default: str
    help: str

    def get(self) -> str:
        return os.environ.get(self.env, self.default)

    def on(self) -> bool:
        """A yes/no setting: 1, true or yes is on, 0, false or no off; anything else reads as its
        default does."""
        for value in (self.get(), self.default):
            value = value.strip().lower()
            if value in ("1", "true", "yes"):
                return True
            if value in ("0", "false", "no"):
                return False
        return False


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
FAKE_GPUS = Setting(
    "SHOAL_FAKE_GPUS", "", 'declare fake GPUs instead of NVML\'s, e.g. "2x24GiB" or "24GiB,80GiB"'
)
HEADROOM = Setting("SHOAL_HEADROOM", "0.05", "fraction of each device's memory never reserved")
PLACEMENT = Setting("SHOAL_PLACEMENT", "binpack", "binpack (fill a device first) or spread (most free first)")
KEEP_ALIVE = Setting("SHOAL_KEEP_ALIVE", "300", "default seconds a model stays idle before it may be evicted")
CPU_CORES_PER_MODEL = Setting("SHOAL_CPU_CORES_PER_MODEL", "", "cores a CPU runner gets (default: half)")
AUTOLOAD = Setting("SHOAL_AUTOLOAD", "0", "1: a request for a catalog model that is not running loads it")
API_KEY = Setting("SHOAL_API_KEY", "", "admin API key the server accepts; the CLI and client send it")
RAY_ADDRESS = Setting(
    "SHOAL_RAY_ADDRESS", "", "join this Ray cluster (an address, or auto) and place models on all its nodes"
)
MODEL_CACHE = Setting(
    "SHOAL_MODEL_CACHE",
    str(Path.home() / ".cache" / "shoal" / "models"),
    "where hub downloads (hub/ and modelscope/, in Hugging Face's cache layout) and, on a Ray node, "
    "copied model files are kept",
)
DISK_HEADROOM = Setting(
    "SHOAL_DISK_HEADROOM", "1GiB", "disk left free after a download; a download that needs more is a 507"
)
DOWNLOAD_HUB = Setting(
    "SHOAL_DOWNLOAD_HUB",
    "huggingface",
    "hub catalog models download from when their spec names it: huggingface or modelscope",
)
HUB_PROBE_TIMEOUT = Setting(
    "SHOAL_HUB_PROBE_TIMEOUT",
    "3",
    "seconds a Ray node's first request to the hub may take before it gets the gateway's copy instead",
)
HUB_XET = Setting(
    "SHOAL_HUB_XET",
    "1",
    "1: a Hugging Face file its hub serves through xet downloads with hf_xet, where it is installed "
    "(falling back to plain HTTP if that fails); 0: always plain HTTP",
)
MAX_BODY = Setting("SHOAL_MAX_BODY", "128MiB", "largest request body accepted (413 past it)")
LIVENESS_INTERVAL = Setting(
    "SHOAL_LIVENESS_INTERVAL", "2", "seconds between liveness pings (GET /health) of each ready runner"
)
LIVENESS_TIMEOUT = Setting(
    "SHOAL_LIVENESS_TIMEOUT",
    "15",
    "seconds a ready runner may leave pings unanswered before it is killed as hung and restarted",
)
FIRST_BYTE_TIMEOUT = Setting(
    "SHOAL_FIRST_BYTE_TIMEOUT",
    "300",
    "seconds a proxied request waits for its runner's first byte (and between bytes of a stream); then 504",
)
HEADER_TIMEOUT = Setting(
    "SHOAL_HEADER_TIMEOUT", "10", "seconds a connection may take to send a request's headers (then closed)"
)
BODY_TIMEOUT = Setting(
    "SHOAL_BODY_TIMEOUT", "60", "seconds a request body may pause between two reads (then 408, closed)"
)
IDLE_TIMEOUT = Setting(
    "SHOAL_IDLE_TIMEOUT", "20", "seconds an idle keep-alive connection is kept open between requests"
)
WARM_SPARES = Setting(
    "SHOAL_WARM_SPARES",
    "all",
    "warm spare runners that have imported an engine family's libraries, so a launch skips the imports: "
    "all (each installed family: torch, llama.cpp, onnx), none, or a comma-separated list",
)
MAX_CONNECTIONS = Setting(
    "SHOAL_MAX_CONNECTIONS",
    "auto",
    "open client connections in all, past it 503 (auto: 10000, or fewer to stay under the descriptor limit); "
    "the last 16 (an eighth, if fewer) only for clients on the host itself",
)
MAX_CONNECTIONS_PER_CLIENT = Setting(
    "SHOAL_MAX_CONNECTIONS_PER_CLIENT",
    "auto",
    "open connections from one client address, past it 503 (auto: a quarter of the total; 0: no cap)",
)
PARK_MEMORY = Setting(
    "SHOAL_PARK_MEMORY",
    "auto",
    "host RAM parked models may hold per node (auto: the node's free RAM; 0: never park, evict instead)",
)
PROFILE = Setting(
    "SHOAL_PROFILE",
    "gpu",
    "profile runs after a load (a warm-up at the launch's largest batch x context, then its peak use is "
    "the reservation): gpu (real GPUs), all (also CPU and fake GPUs), off",
)
PROFILE_MARGIN = Setting(
    "SHOAL_PROFILE_MARGIN", "0.05", "fraction added to a measured profile's peak to make its reservation"
)
MPS = Setting(
    "SHOAL_MPS",
    "0",
    "run the CUDA MPS control daemon and cap each GPU runner's memory at its reservation (SHOAL_MPS=1)",
)

ALL: tuple[Setting, ...] = (
    ENDPOINT, DATA_DIR, HOST, PORT, LAUNCH_TIMEOUT, REQUEST_TIMEOUT, MAX_RESTARTS, LOG_LEVEL,
    FAKE_GPUS, HEADROOM, PLACEMENT, KEEP_ALIVE, CPU_CORES_PER_MODEL, AUTOLOAD, API_KEY, MAX_BODY,
    RAY_ADDRESS, MODEL_CACHE, DISK_HEADROOM, DOWNLOAD_HUB, HUB_PROBE_TIMEOUT, HUB_XET, LIVENESS_INTERVAL,
    LIVENESS_TIMEOUT, FIRST_BYTE_TIMEOUT, HEADER_TIMEOUT, BODY_TIMEOUT, IDLE_TIMEOUT, MAX_CONNECTIONS,
    MAX_CONNECTIONS_PER_CLIENT, PARK_MEMORY, PROFILE, PROFILE_MARGIN, MPS, WARM_SPARES,
)  # fmt: skip


def _read(setting: Setting, parse: Callable[[str], T], what: str) -> T:
    """The setting's value parsed, or a SettingError that names it."""
    value = setting.get()
    try:
        return parse(value)
    except (ValueError, OverflowError):
        raise SettingError(f"{setting.env}={value!r} is not {what}") from None


def _seconds(setting: Setting) -> Callable[[], float]:
    return lambda: _read(setting, float, "a number of seconds")


def _auto_int(setting: Setting) -> Callable[[], int | None]:
    def parse(value: str) -> int | None:
        return None if value.strip().lower() in ("", "auto") else int(value)

    return lambda: _read(setting, parse, "a whole number or auto")


# ServerSettings fields that must be a finite number of seconds over 0, and their settings
POSITIVE_SECONDS = {
    "launch_timeout": LAUNCH_TIMEOUT,
    "request_timeout": REQUEST_TIMEOUT,
    "liveness_interval": LIVENESS_INTERVAL,
    "liveness_timeout": LIVENESS_TIMEOUT,
    "first_byte_timeout": FIRST_BYTE_TIMEOUT,
    "header_timeout": HEADER_TIMEOUT,
    "body_timeout": BODY_TIMEOUT,
    "idle_timeout": IDLE_TIMEOUT,
    "hub_probe_timeout": HUB_PROBE_TIMEOUT,
}
# whole-number fields: (setting, least value allowed); None ("auto") is always allowed
AT_LEAST = {
    "max_restarts": (MAX_RESTARTS, 0),
    "cpu_cores_per_model": (CPU_CORES_PER_MODEL, 1),
    "max_body": (MAX_BODY, 1),
    "max_connections": (MAX_CONNECTIONS, 1),
    "max_connections_per_client": (MAX_CONNECTIONS_PER_CLIENT, 0),
}
# fractions: (setting, whether 1 itself is allowed)
FRACTIONS = {"headroom": (HEADROOM, False), "profile_margin": (PROFILE_MARGIN, True)}


@dataclass(frozen=True)
class ServerSettings:
    """What one gateway process runs with; built by the CLI or by tests."""

    host: str = field(default_factory=HOST.get)
    port: int = field(default_factory=lambda: _read(PORT, int, "a port number"))
    data_dir: Path = field(default_factory=lambda: Path(DATA_DIR.get()))
    launch_timeout: float = field(default_factory=_seconds(LAUNCH_TIMEOUT))
    request_timeout: float = field(default_factory=_seconds(REQUEST_TIMEOUT))
    max_restarts: int = field(default_factory=lambda: _read(MAX_RESTARTS, int, "a whole number"))
    fake_gpus: str = field(default_factory=FAKE_GPUS.get)
    headroom: float = field(default_factory=lambda: _read(HEADROOM, float, "a fraction"))
    placement: str = field(default_factory=PLACEMENT.get)
    keep_alive: float = field(default_factory=lambda: _read(KEEP_ALIVE, float, "a number of seconds"))
    cpu_cores_per_model: int = field(
        default_factory=lambda: _read(
            CPU_CORES_PER_MODEL, lambda v: int(v or max(1, (os.cpu_count() or 1) // 2)), "a whole number"
        )
    )
    autoload: bool = field(default_factory=AUTOLOAD.on)
    api_key: str | None = field(default_factory=lambda: API_KEY.get() or None)
    max_body: int = field(default_factory=lambda: _read(MAX_BODY, parse_size, "a size (e.g. 128MiB)"))
    ray_address: str | None = field(default_factory=lambda: RAY_ADDRESS.get() or None)
    liveness_interval: float = field(default_factory=_seconds(LIVENESS_INTERVAL))
    liveness_timeout: float = field(default_factory=_seconds(LIVENESS_TIMEOUT))
    first_byte_timeout: float = field(default_factory=_seconds(FIRST_BYTE_TIMEOUT))
    header_timeout: float = field(default_factory=_seconds(HEADER_TIMEOUT))
    body_timeout: float = field(default_factory=_seconds(BODY_TIMEOUT))
    idle_timeout: float = field(default_factory=_seconds(IDLE_TIMEOUT))
    # None: "auto", worked out from the descriptor limit when the server starts (gateway/server.py)
    max_connections: int | None = field(default_factory=_auto_int(MAX_CONNECTIONS))
    max_connections_per_client: int | None = field(default_factory=_auto_int(MAX_CONNECTIONS_PER_CLIENT))
    model_cache: Path = field(default_factory=lambda: Path(MODEL_CACHE.get()))
    disk_headroom: int = field(default_factory=lambda: _read(DISK_HEADROOM, parse_size, "a size (e.g. 1GiB)"))
    download_hub: str = field(default_factory=DOWNLOAD_HUB.get)
    hub_probe_timeout: float = field(default_factory=_seconds(HUB_PROBE_TIMEOUT))
    hub_xet: bool = field(default_factory=HUB_XET.on)
    # bytes parked replicas may hold per node; None: its free RAM ("auto"); 0: never park
    park_memory: int | None = field(
        default_factory=lambda: _read(
            PARK_MEMORY,
            lambda v: None if v.strip().lower() in ("", "auto") else parse_size(v),
            "a size or auto",
        )
    )
    profile: str = field(default_factory=lambda: PROFILE.get().lower())
    profile_margin: float = field(default_factory=lambda: _read(PROFILE_MARGIN, float, "a fraction"))
    mps: bool = field(default_factory=MPS.on)
    warm_spares: str = field(default_factory=WARM_SPARES.get)
    grace: float = 10.0  # seconds in-flight requests get to finish at shutdown

    def __post_init__(self) -> None:
        """The numbers are in bounds (SettingError naming the setting if not)."""
        for name, setting in POSITIVE_SECONDS.items():
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise SettingError(f"{setting.env} must be a number of seconds greater than 0, not {value}")
        for name, (setting, least) in AT_LEAST.items():
            value = getattr(self, name)
            if value is not None and value < least:
                raise SettingError(f"{setting.env} must be at least {least}, not {value}")
        for name, (setting, one) in FRACTIONS.items():
            value = getattr(self, name)
            if not (0 <= value <= 1 if one else 0 <= value < 1):
                raise SettingError(
                    f"{setting.env} must be a fraction from 0 to {'1' if one else 'under 1'}, not {value}"
                )
        if not 0 <= self.port <= 65535:
            raise SettingError(f"{PORT.env} must be a port number (0 to 65535), not {self.port}")
