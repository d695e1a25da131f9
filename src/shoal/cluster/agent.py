"""The node agent: one Ray actor per node (created by the gateway's RayHost; a plain class here).

It reports the node's devices and each of its runners' memory use, spawns and stops runner
processes there exactly as the gateway does on one machine (PR_SET_PDEATHSIG, the cores the
scheduler gave, the same log file and status file), and receives model files the node lacks.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from shoal import settings
from shoal.cluster import files
from shoal.devices import all_devices, gpu_process_usage, rss_bytes
from shoal.runners.config import RunnerConfig
from shoal.runners.process import child_setup, failure_reason

DIR_PREFIX = "shoal-agent-"


def sweep_stale_dirs(parent: Path) -> None:
    """Remove the folders of agents that are gone (a killed actor cannot clean up after itself)."""
    for folder in parent.glob(f"{DIR_PREFIX}*"):
        try:
            pid = int(folder.name[len(DIR_PREFIX) :].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def runner_environment() -> dict[str, str]:
    """The environment runners start from: this Ray worker's, less OMP_NUM_THREADS=1, which Ray
    forces on a worker without CPUs (this agent) and which would make a runner's torch or BLAS
    single-threaded. Kept when the node itself set it (the raylet's own environment has it)."""
    env = dict(os.environ)
    try:
        raylet = Path(f"/proc/{env['RAY_RAYLET_PID']}/environ").read_bytes().split(b"\0")
    except (KeyError, OSError):
        return env
    if not any(item.startswith(b"OMP_NUM_THREADS=") for item in raylet):
        env.pop("OMP_NUM_THREADS", None)
    return env


class NodeAgent:
    """Runners are spawned from one long-lived thread: PR_SET_PDEATHSIG fires when the *thread* that
    forked exits, so a short-lived thread would kill its runners."""

    def __init__(self, host: str) -> None:
        self.host = host
        sweep_stale_dirs(Path(tempfile.gettempdir()))
        self.dir = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-"))
        self.cache = Path(settings.MODEL_CACHE.get()).expanduser()
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shoal-spawner")
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._status: dict[int, str] = {}
        self._logs: dict[int, Path] = {}
        self._tags: dict[int, str] = {}  # runner pid → the gateway's tag for it (spawn's `tag`)
        self._sources: dict[int, str] = {}  # runner pid → the model path it loads (copies in use)
        self._lock = threading.Lock()
        self._n = 0
        self._env = runner_environment()

    def poll(self) -> dict[str, Any]:
        """The node now: devices, per-pid GPU use (NVML), each runner's RSS, which runners exited,
        and the live ones with their tags. Runs in its own concurrency group (the gateway sets it up),
        so a runner's stop or a file copy on this node does not hold it back."""
        fake = settings.FAKE_GPUS.get()
        procs = list(self._procs.items())  # spawn and stop may change the dict meanwhile
        codes = {pid: proc.poll() for pid, proc in procs}
        live = [pid for pid, code in codes.items() if code is None]
        return {
            "devices": [d.to_dict() for d in all_devices(fake)],
            "gpu": [] if fake else [[dev, pid, used] for (dev, pid), used in gpu_process_usage().items()],
            "rss": {pid: rss for pid in live if (rss := rss_bytes(pid)) is not None},
            "exited": codes,
            "live": {pid: self._tags.get(pid, "") for pid in live},
        }

    def spawn(
        self, config_json: str, env: dict[str, str], log_name: str, cores: list[int], tag: str = ""
    ) -> tuple[int, str]:
        """Start a runner on a TCP port bound here and handed over (no race for a free port);
        returns (pid, "host:port"). `tag` comes back with the pid in every poll: the gateway stops
        the live runners whose tags it no longer knows (left behind by a partition)."""
        with self._lock:
            self._n += 1
            n = self._n
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        sock.listen(1024)
        listen = f"{self.host}:{sock.getsockname()[1]}"
        status = self.dir / f"r{n}.status"
        config = RunnerConfig.model_validate_json(config_json).model_copy(
            update={"listen": listen, "listen_fd": sock.fileno(), "socket": "", "status_file": str(status)}
        )
        path = self.dir / f"r{n}.json"
        path.write_text(config.model_dump_json())
        log_path = self.dir / log_name

        def start() -> subprocess.Popen[bytes]:
            with open(log_path, "ab") as out:
                return subprocess.Popen(
                    [sys.executable, "-m", "shoal.runners.main", str(path)],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env={**self._env, **env},
                    preexec_fn=child_setup(cores),
                    close_fds=True,
                    pass_fds=(sock.fileno(),),
                )

        try:
            proc = self._spawner.submit(start).result()
        finally:
            sock.close()  # the runner holds its own copy
        self._procs[proc.pid] = proc
        self._status[proc.pid] = str(status)
        self._logs[proc.pid] = log_path
        self._tags[proc.pid] = tag
        self._sources[proc.pid] = str(config.source.path or "")
        return proc.pid, listen

    def failure_reason(self, pid: int) -> str:
        proc = self._procs.get(pid)
        status = Path(self._status.get(pid, "/nonexistent"))
        return failure_reason(
            status, self._logs.get(pid, Path("/nonexistent")), proc.poll() if proc else None
        )

    def stop(self, pid: int, grace: float = 5.0) -> None:
        proc = self._procs.pop(pid, None)
        self._tags.pop(pid, None)
        self._sources.pop(pid, None)
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        """The gateway is leaving: stop every runner and remove this agent's folder."""
        for pid in list(self._procs):
            self.stop(pid)
        shutil.rmtree(self.dir, ignore_errors=True)

    # ---- model files (see files.py) -------------------------------------------------------------
    def find_files(self, m: files.Manifest) -> str | None:
        return files.find(self.cache, m)

    def write_chunk(self, m: files.Manifest, rel: str, offset: int, data: bytes) -> None:
        files.write_chunk(self.cache, m, rel, offset, data)

    def finish_files(self, m: files.Manifest) -> str:
        """Complete the copy; older copies of the same source that no live runner uses are removed."""
        final = files.finish(self.cache, m)
        live = {self._sources.get(pid, "") for pid, proc in list(self._procs.items()) if proc.poll() is None}
        files.prune(self.cache, m, live)
        return final

    def cached(self) -> list[dict[str, Any]]:
        """The copies in this node's model cache (GET /v1/workers shows them)."""
        return files.listing(self.cache)
