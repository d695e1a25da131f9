"""The gateway's handle on one runner process: spawn, wait until ready, ping, terminate, kill.

Runners get PR_SET_PDEATHSIG so they die with the gateway even when it is SIGKILLed (a runner that
outlives its parent keeps its memory; see shared/RAY-FACTS.md). Their output goes to a log file,
never a pipe (a full pipe blocks the runner). A runner may start as a warm spare that already
imported its engine's libraries (shoal.runners.spare); it is a child of the gateway all the same.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from shoal.errors import LaunchFailed
from shoal.runners.client import RunnerClient
from shoal.runners.config import RunnerConfig

_PR_SET_PDEATHSIG = 1


def cpu_set(cores: tuple[int, ...] | list[int]) -> set[int]:
    """The CPUs that the scheduler's core numbers name: indices into the CPUs this process may use
    (the scheduler counts them from 0)."""
    usable = sorted(os.sched_getaffinity(0))
    return {usable[c % len(usable)] for c in cores}


def child_setup(cores: tuple[int, ...] | list[int]) -> Callable[[], None]:
    """The runner dies with the process that spawned it, and computes on the cores it was given."""
    cpus = cpu_set(cores)

    def setup() -> None:  # runs in the child between fork and exec
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if cpus:
            os.sched_setaffinity(0, cpus)

    return setup


class SparePool(Protocol):
    """What a runner asks of the warm spares (shoal.hosts.spares.Spares)."""

    def launching(self, runner: object) -> None: ...

    def launched(self, runner: object) -> None: ...

    def hand_off(self, engine: str, launch: dict[str, object]) -> subprocess.Popen[bytes] | None: ...


class Runner(Protocol):
    """What wait_healthy needs of a runner, local (RunnerProcess) or on a Ray node (RemoteRunner)."""

    config: RunnerConfig

    @property
    def http(self) -> RunnerClient: ...

    def exited(self) -> int | None: ...

    async def stop(self, grace: float = 5.0) -> None: ...


async def ping(runner: Runner, timeout: float) -> bool:
    """Liveness: /health answers 200 within `timeout` seconds."""
    try:
        status, _ = await runner.http.call("GET", "/health", timeout=timeout)
    except (TimeoutError, OSError):
        return False
    return status == 200


async def wait_healthy(
    runner: Runner,
    timeout: float,
    reason: Callable[[], Awaitable[str]],
    reachable: Callable[[], bool] = lambda: True,
    interval: float = 0.1,
) -> None:
    """Poll the runner's /health until it answers 200; a runner that exits first, or never answers
    within `timeout` (then it is stopped), fails the launch with the reason."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if runner.exited() is not None:
            raise LaunchFailed(await reason())
        if reachable() and await ping(runner, 2):
            return
        await asyncio.sleep(interval)
    await runner.stop()
    raise LaunchFailed(f"runner for {runner.config.model_uid} did not become ready within {timeout:.0f} s")


def failure_reason(status: Path, log_path: Path, exit_code: int | None) -> str:
    """Why a runner stopped: what it wrote to its status file, else its exit code; plus the last
    error-looking lines of its log (llama.cpp and friends log the real cause there)."""
    reason = status.read_text().strip() if status.exists() else f"runner exited with code {exit_code}"
    try:
        lines = log_path.read_text(errors="replace").splitlines()[-200:]
    except OSError:
        lines = []
    hints = [ln.strip() for ln in lines if any(k in ln.lower() for k in ("error", "failed", "exception"))]
    hints = [h for h in hints if h not in reason][-3:]
    return reason + (" | " + " | ".join(hints) if hints else "")


class RunnerProcess:
    """One spawned runner. Not restartable: the supervisor makes a new one."""

    def __init__(
        self,
        config: RunnerConfig,
        log_path: Path,
        env: dict[str, str],
        cores: tuple[int, ...] = (),
        config_path: Path | None = None,
        spares: SparePool | None = None,
    ) -> None:
        self.config = config
        self.spares = spares  # warm spare runners to start from, if any (shoal.hosts.spares)
        self.config_path = config_path or Path(config.socket).with_suffix(".json")
        self.cores = cores
        self.log_path = log_path
        self._env = env
        self._popen: subprocess.Popen[bytes] | None = None
        self._http: RunnerClient | None = None

    @property
    def http(self) -> RunnerClient:
        """Keep-alive HTTP over the runner's Unix socket."""
        if self._http is None:
            self._http = RunnerClient(socket=self.config.socket)
        return self._http

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen else None

    @property
    def node_lost(self) -> bool:
        return False  # one machine: a runner that is gone crashed (or was stopped)

    async def start(self) -> None:
        self.spawn(self.config_path)

    def spawn(self, config_path: Path) -> None:
        config_path.write_text(self.config.model_dump_json())
        Path(self.config.status_file).unlink(missing_ok=True)
        if self.spares is None:
            self._popen = self._cold(config_path)
            return
        self.spares.launching(self)  # until ready or stopped: no spare starts importing meanwhile
        try:
            launch: dict[str, object] = {
                "config": str(config_path),
                "env": self._env,
                "log": str(self.log_path),
                "cpus": sorted(cpu_set(self.cores)),
            }
            self._popen = self.spares.hand_off(self.config.engine, launch) or self._cold(config_path)
        except BaseException:
            self.spares.launched(self)
            raise

    def _cold(self, config_path: Path) -> subprocess.Popen[bytes]:
        with open(self.log_path, "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "shoal.runners.main", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self._env},
                preexec_fn=child_setup(self.cores),
                close_fds=True,
            )

    def exited(self) -> int | None:
        """The exit code once the process is gone, else None."""
        return None if self._popen is None else self._popen.poll()

    async def wait_ready(self, timeout: float) -> None:
        async def reason() -> str:
            return self.failure_reason()

        try:
            socket_made = Path(self.config.socket).exists
            await wait_healthy(self, timeout, reason, socket_made, interval=0.05)
        finally:
            if self.spares is not None:
                self.spares.launched(self)

    def failure_reason(self) -> str:
        return failure_reason(Path(self.config.status_file), self.log_path, self.exited())

    def files_progress(self) -> dict[str, Any] | None:
        return None  # one machine: a runner loads its files where they are

    async def ping(self, timeout: float) -> bool:
        return await ping(self, timeout)

    async def kill(self) -> None:
        if self._popen is not None and self._popen.poll() is None:
            self._popen.kill()
            await asyncio.to_thread(self._popen.wait)
        await self.stop()

    async def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, wait up to `grace` seconds, then SIGKILL; always reaps the process."""
        if self._popen is not None and self._popen.poll() is None:
            self._popen.terminate()
            deadline = time.monotonic() + grace
            while self._popen.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self._popen.poll() is None:
                self._popen.kill()
                await asyncio.to_thread(self._popen.wait)
        if self._http is not None:
            await self._http.close()
        if self.spares is not None:
            self.spares.launched(self)
        Path(self.config.socket).unlink(missing_ok=True)
