"""What the benchmarks share: the machine they ran on, a free loopback port, a server process and
the wait for it to answer."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import importlib.metadata
import os
import platform
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

PACKAGES = ("shoal", "httpx", "xllamacpp", "sentence-transformers", "torch")


def machine_info() -> dict[str, Any]:
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "versions": versions,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def server_process(
    command: list[str], log_path: Path, env: dict[str, str]
) -> Iterator[subprocess.Popen[bytes]]:
    """A server in its own process group; stopped with SIGTERM, then the whole group is killed."""
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # anything the server left behind


async def wait_ok(
    client: httpx.AsyncClient,
    path: str,
    proc: subprocess.Popen[bytes],
    log_path: Path,
    timeout: float,
    poll: float,
) -> None:
    """Until GET `path` answers 200; RuntimeError with the server log's tail when the process exits
    first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if (await client.get(path)).status_code == 200:
                return
        await asyncio.sleep(poll)
    raise RuntimeError(f"no 200 on {path} within {timeout:.0f} s:\n{log_path.read_text()[-2000:]}")


def cpu_seconds(pid: int) -> float:
    """CPU time of all of a process's threads so far (0 once it is gone), from the scheduler's own
    nanosecond count (/proc/PID/task/*/schedstat): /proc/PID/stat counts in 10 ms ticks, too coarse
    for an idle gateway's few ms per second."""
    total = 0
    with contextlib.suppress(FileNotFoundError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):  # a thread that ended meanwhile
                total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def descendants(pid: int) -> set[int]:
    """The processes below `pid`: its children, theirs, and so on."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


async def settle(pid: int, quiet: float = 0.1, timeout: float = 60.0, seconds: int = 2) -> float:
    """Wait until `pid` and its descendants together use less than `quiet` of a core in each of
    `seconds` seconds in a row (a server's warm spare runner, started within half a second after a
    launch, imports torch for seconds on the cores a phase would measure); a process born during a
    second counts with all its CPU. Returns the seconds waited."""
    started, calm = time.monotonic(), 0
    while time.monotonic() - started < timeout and calm < seconds:
        before = {p: cpu_seconds(p) for p in {pid} | descendants(pid)}
        await asyncio.sleep(1.0)
        after = {p: cpu_seconds(p) for p in {pid} | descendants(pid)}
        used = sum(cpu - before.get(p, 0.0) for p, cpu in after.items())
        calm = calm + 1 if used < quiet else 0
    return round(time.monotonic() - started, 1)
