"""The node agent: one Ray actor per node (created by the gateway's RayHost; a plain class here).

It reports the node's devices and each of its runners' memory use, spawns and stops runner
processes there exactly as the gateway does on one machine (PR_SET_PDEATHSIG, the cores the
scheduler gave, the same log file and status file), and gets the model files the node lacks: a
hub model's from its own cache or the hub (downloaded here), a local path's (or, when this node
cannot reach the hub, a hub model's) as a copy of the gateway's files written here chunk by chunk.
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
from shoal.errors import HubUnreachable, ShoalError
from shoal.hub import cache as hub_cache
from shoal.hub.download import Downloader, FileJob, HubFiles
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


def _within(path: str, folder: Path) -> bool:
    return bool(path) and (path == str(folder) or path.startswith(str(folder) + "/"))


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
        self._downloads: dict[str, tuple[int, list[FileJob]]] = {}  # hub downloads here: bytes had, jobs
        self._downloaders: set[Downloader] = set()
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
            "downloads": {  # bytes in so far of each hub download here (its progress at the gateway)
                key: had + sum(min(j.done, j.size) for j in jobs)
                for key, (had, jobs) in list(self._downloads.items())
            },
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
        """The gateway is leaving: stop every runner and download (its partial blob stays, resumed
        next time), and remove this agent's folder."""
        for downloader in list(self._downloaders):
            downloader.stop()
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

    def cached(self) -> dict[str, list[dict[str, Any]]]:
        """The copies of the gateway's files in this node's model cache, and the hub models there
        (GET /v1/workers shows both)."""
        hub = [
            {k: v for k, v in entry.describe([]).items() if k != "model_uids"}
            for name, root in hub_cache.roots(self.cache).items()
            for entry in hub_cache.entries(root, name)
        ]
        return {"copies": files.listing(self.cache), "hub": hub}

    def remove_hub(self, hub: str, repo: str, copies_of: str | None, dry_run: bool = False) -> dict[str, Any]:
        """`shoal rm-cache` on this node: remove a hub repo's folder from this node's hub cache, and
        the copies here of the gateway's files of it (`copies_of`: the gateway's folder of the repo).
        Refused ("in use", with the pids) while a live runner here loads from one of them, or
        ("downloading") while this node downloads the repo. `dry_run`: say what would go ("cached",
        or "not cached"), remove nothing."""
        folder = hub_cache.repo_dir(hub_cache.roots(self.cache)[hub], repo)
        targets = [folder] if folder.is_dir() else []
        if copies_of:
            under = copies_of.rstrip("/") + "/"
            targets += [
                self.cache / str(entry["key"])
                for entry in files.listing(self.cache)
                if entry["complete"] and str(entry["source"] or "").startswith(under)
            ]
        held = [
            pid
            for pid, proc in list(self._procs.items())
            if proc.poll() is None and any(_within(self._sources.get(pid, ""), t) for t in targets)
        ]
        size = sum(
            p.stat().st_size for t in targets for p in t.rglob("*") if p.is_file() and not p.is_symlink()
        )
        report: dict[str, Any] = {"status": "cached", "removed": [], "bytes": size, "pids": held}
        if held:
            return {**report, "status": "in use"}
        if any(key.startswith(f"{hub}:{repo}@") for key in list(self._downloads)):
            return {**report, "status": "downloading"}
        if not targets:
            return {**report, "status": "not cached"}
        if dry_run:
            return report
        for target in targets:
            shutil.rmtree(target, ignore_errors=True)
        return {**report, "status": "removed", "removed": [str(t) for t in targets]}

    def fetch_hub(self, want: HubFiles, gateway: files.Manifest | None) -> tuple[str | None, str, str]:
        """The path this node loads a hub model from, as (path, how, ""): from its own cache
        ("cache"), from the gateway's files seen here in place or copied here before ("gateway":
        `gateway` is their manifest, when the gateway has them), or downloaded now from the hub into
        this node's cache ("hub": the gateway's downloader code, endpoint and token, resumed from a
        partial blob). (None, "unreachable", why) when this node cannot reach the hub (the gateway
        then copies its files here); (None, "failed", why) for anything else (a full disk). Runs in
        its own concurrency group: a download does not hold back spawns and copies on this node."""
        root = hub_cache.roots(self.cache)[want.hub]
        folder = hub_cache.snapshot(root, want.repo, want.commit)
        target = str(folder / want.target) if want.target else str(folder)
        if hub_cache.has_files(root, want.repo, want.commit, [f.path for f in want.files]):
            hub_cache.touch(root, want.repo)
            return target, "cache", ""
        if gateway is not None and (found := files.find(self.cache, gateway)) is not None:
            return found, "gateway", ""
        if want.offline:
            return None, "unreachable", "the gateway is offline (HF_HUB_OFFLINE=1)"
        missing = [f for f in want.files if not (folder / f.path).is_file()]
        downloader = Downloader(root, want.disk_headroom, want.hub, want.endpoint, want.token, want.xet)
        jobs = [FileJob(want.repo, want.commit, f.path, f.size, f.sha256) for f in missing]
        self._downloads[want.key] = (want.total - sum(f.size for f in missing), jobs)
        self._downloaders.add(downloader)
        try:
            downloader.check_disk(want.repo, missing)
            for i, job in enumerate(jobs):  # the first request is the probe: a silent hub fails fast
                downloader.fetch(job, want.revision, want.probe_timeout if i == 0 else None)
        except HubUnreachable as exc:
            return None, "unreachable", exc.message
        except ShoalError as exc:
            return None, "failed", exc.message
        finally:
            self._downloads.pop(want.key, None)
            self._downloaders.discard(downloader)
        hub_cache.touch(root, want.repo)
        return target, "hub", ""
