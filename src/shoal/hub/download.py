"""Downloads of hub files into the cache, in the gateway (never in a runner): one download per file
however many launches or pulls want it, resumed from what an interrupted one left (a stable
`ETAG.shoal.incomplete` blob continued with a Range request, after a failure or a restart), with
progress per model: bytes done, total, rate, ETA.

From Hugging Face the bytes move through `huggingface_hub`'s own `get_hf_file_metadata` (HEAD:
etag, size, where) and `http_get` (GET, resuming at an offset, retrying a dropped connection), so
HF_ENDPOINT, HF_TOKEN and proxies apply; or, for a file the hub serves through xet (its HEAD answer
carries a xet hash) where hf_xet is installed and SHOAL_HUB_XET is not 0, through `xet_get` (hf_xet:
the file's chunks from the hub's CAS, in parallel, kept in hf_xet's own chunk cache, HF_XET_CACHE).
Xet does not resume from Shoal's partial blob: it downloads the file whole into a staging file beside
it, so a partial blob left by an interrupted plain download is resumed over plain HTTP instead, and a
failed xet download falls back to plain HTTP (logged). From ModelScope through hub/modelscope.py (the
blob named by the sha256 its file list gives). Either way each file lands in Hugging Face's cache
layout (hub/cache.py), one cache root per hub, and the resume, lock and progress below are the same. A
file lock beside each partial blob keeps two gateways sharing one cache from writing it together.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

from shoal.errors import HubUnreachable, InsufficientDisk, ShoalError
from shoal.hub import cache, modelscope
from shoal.hub.remote import RemoteFile, hub_errors

log = logging.getLogger("shoal.hub")
RATE_WINDOW = 10.0  # seconds of progress the rate is measured over (else the mean since the start)


@dataclass
class FileJob:
    """One file's download, shared by every pull that needs it."""

    repo: str
    commit: str
    path: str
    size: int
    sha256: str | None = None  # from the hub's file list (ModelScope), where it gives one
    done: int = 0
    resumed_from: int = 0  # bytes already there when this download started
    started: float | None = None  # when its GET began (time.monotonic)
    etag: str | None = None
    task: asyncio.Future[Path] | None = None


@dataclass(frozen=True)
class HubFiles:
    """A hub model's files as a Ray node fetches them itself (sent to its agent, so picklable): what
    the gateway resolved (commit, files, the path the engine loads) and how to reach the hub."""

    name: str  # hf.co/ORG/REPO..., as shown
    hub: str
    repo: str
    commit: str
    revision: str
    target: str  # the path the engine loads, relative to the snapshot ("" for the folder)
    files: tuple[RemoteFile, ...]
    endpoint: str | None  # the gateway's HF_ENDPOINT (or ModelScope endpoint)
    token: str | None  # the gateway's HF_TOKEN
    offline: bool  # the gateway is offline (HF_HUB_OFFLINE=1): the node does not try the hub either
    disk_headroom: int
    probe_timeout: float  # seconds the node's first request to the hub may take (SHOAL_HUB_PROBE_TIMEOUT)
    xet: bool = True  # the gateway's SHOAL_HUB_XET: use hf_xet where the hub serves a file through xet

    @property
    def key(self) -> str:
        return f"{self.hub}:{self.repo}@{self.commit}"

    @property
    def total(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class HubLaunch:
    """A replica of a hub model placed on a Ray node: the files its node fetches itself, and how to
    get the gateway's own copy of them instead (downloaded at the gateway first when it lacks them)
    for a node that cannot reach the hub."""

    files: HubFiles
    gateway_path: Callable[[], Awaitable[str]]


class DownloadStopped(HubUnreachable):
    """The gateway is shutting down: the download stops, its partial blob stays for the next one."""


class _Counting:
    """The partial blob as http_get writes it, counting bytes into the job as they land (and
    stopping the download, between two chunks, when the gateway shuts down)."""

    def __init__(self, f: BinaryIO, job: FileJob, stop: threading.Event) -> None:
        self.f, self.job, self.stop = f, job, stop

    def write(self, data: bytes) -> int:
        if self.stop.is_set():
            raise DownloadStopped(f"{self.job.repo}/{self.job.path}: the server stopped; it resumes later")
        n = self.f.write(data)
        self.job.done += len(data)
        return n

    def tell(self) -> int:
        return self.f.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.f.seek(offset, whence)

    def truncate(self, size: int | None = None) -> int:  # the server ignored Range: start over
        n = self.f.truncate(size)
        self.job.done = n
        return n


class _XetProgress:
    """The progress bar `xet_get` reports to (its `_tqdm_bar`): bytes written into the file, counted
    into the job."""

    def __init__(self, job: FileJob) -> None:
        self.job = job

    def update(self, n: int) -> None:
        self.job.done += n

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:  # the rate: Pull works it out
        pass


XetGet = Callable[[Path], None]  # downloads the file whole into the path given


@dataclass
class Pull:
    """The download of one model's files: what GET /v1/models/{uid} and the pull routes show."""

    name: str
    repo: str
    commit: str
    jobs: list[FileJob]
    started: float = field(default_factory=time.monotonic)
    error: str | None = None
    finished: bool = False
    _samples: deque[tuple[float, int]] = field(default_factory=deque)

    @property
    def active(self) -> bool:
        return not self.finished and self.error is None

    @property
    def total(self) -> int:
        return sum(j.size for j in self.jobs)

    @property
    def completed(self) -> int:
        return sum(min(j.done, j.size) for j in self.jobs)

    def progress(self) -> dict[str, Any]:
        now, done = time.monotonic(), self.completed
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[0][0] > RATE_WINDOW:
            self._samples.popleft()
        t0, d0 = self._samples[0]
        rate = (done - d0) / (now - t0) if now > t0 and done > d0 else None
        began = [j.started for j in self.jobs if j.started is not None]
        fetched = sum(min(j.done, j.size) - j.resumed_from for j in self.jobs if j.started is not None)
        if rate is None and began and fetched > 0 and now > min(began):  # the mean since it began
            rate = fetched / (now - min(began))
        left = self.total - done
        status = "done" if self.finished else "failed" if self.error else "downloading"
        return {
            "status": status,
            "name": self.name,
            "repo": self.repo,
            "revision": self.commit,
            "completed_bytes": done,
            "total_bytes": self.total,
            "rate_bytes_per_s": round(rate) if rate else None,
            "eta_s": round(left / rate, 1) if rate and left > 0 else (0.0 if left <= 0 else None),
            "error": self.error,
            "files": [
                {"path": j.path, "size": j.size, "completed": min(j.done, j.size), "digest": digest(j)}
                for j in self.jobs
            ],
        }

    async def wait(self, root: Path, target: str) -> Path:
        """The local path of `target` once every file is in (raises ShoalError when one failed)."""
        try:
            await asyncio.gather(*(asyncio.shield(j.task) for j in self.jobs if j.task))
        except ShoalError as exc:
            self.error = exc.message
            raise
        self.finished = True
        return cache.snapshot(root, self.repo, self.commit) / target


def _in_daemon_thread(fn: Callable[..., Path], *args: Any) -> asyncio.Future[Path]:
    """Run a download in a daemon thread: a gateway that exits does not wait for it (the partial
    blob stays, and the next download continues it from its size)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Path] = loop.create_future()

    def settle(result: Path | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as exc:  # handed to the awaiting side, whatever it is
            result, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop is closed: the gateway has exited
            pass

    threading.Thread(target=run, name="shoal-download", daemon=True).start()
    return future


def digest(job: FileJob) -> str:
    """Ollama's digest for a file: its sha256 (the LFS etag) when known, else one of its name."""
    etag = job.etag or ""
    if len(etag) == 64 and all(c in "0123456789abcdef" for c in etag):
        return f"sha256:{etag}"
    return "sha256:" + hashlib.sha256(f"{job.repo}/{job.commit}/{job.path}".encode()).hexdigest()


class Downloader:
    """`endpoint` and `token` (Hugging Face) or `endpoint` (ModelScope) are the gateway's, handed to
    a Ray node's agent that downloads for itself (None: this process's HF_ENDPOINT, HF_TOKEN and
    MODELSCOPE_DOMAIN)."""

    def __init__(
        self,
        root: Path,
        disk_headroom: int,
        hub: str = "huggingface",
        endpoint: str | None = None,
        token: str | None = None,
        xet: bool = True,
    ) -> None:
        self.root = root
        self.xet = xet  # SHOAL_HUB_XET: use hf_xet where the hub serves a file through xet
        self.hub = hub
        self.disk_headroom = disk_headroom
        self.endpoint, self.token = endpoint, token
        self._jobs: dict[tuple[str, str, str], FileJob] = {}
        self._stop = threading.Event()

    def stop(self) -> None:
        """At shutdown: running downloads stop at their next chunk (their partial blobs stay)."""
        self._stop.set()

    def check_disk(self, repo: str, files: list[RemoteFile]) -> None:
        """Refuse up front (507) a download that would leave less than the headroom free."""
        blobs = cache.repo_dir(self.root, repo) / "blobs"
        have = sum(p.stat().st_size for p in blobs.glob(f"*{cache.INCOMPLETE}")) if blobs.is_dir() else 0
        need = max(0, sum(f.size for f in files) - have)
        free = cache.free_bytes(self.root)
        if free - need < self.disk_headroom:
            gib = 1024**3
            raise InsufficientDisk(
                f"downloading {repo} needs {need / gib:.2f} GiB on the disk of {self.root}, which has "
                f"{free / gib:.2f} GiB free and keeps {self.disk_headroom / gib:.2f} GiB free "
                "(SHOAL_DISK_HEADROOM); free some space (shoal rm-cache) or set SHOAL_MODEL_CACHE"
            )

    def pull(self, name: str, repo: str, commit: str, revision: str, files: list[RemoteFile]) -> Pull:
        """Start (or join) the downloads of these files; await `Pull.wait` for the result."""
        jobs = []
        for f in files:
            key = (repo, commit, f.path)
            job = self._jobs.get(key)
            if job is None or (job.task is not None and job.task.done() and job.task.exception()):
                job = FileJob(repo, commit, f.path, f.size, f.sha256)
                job.task = _in_daemon_thread(self.fetch, job, revision)
                job.task.add_done_callback(functools.partial(self._finished, key))
                self._jobs[key] = job
            jobs.append(job)
        return Pull(name, repo, commit, jobs)

    def _finished(self, key: tuple[str, str, str], task: asyncio.Future[Path]) -> None:
        if not task.cancelled() and task.exception() is None:
            self._jobs.pop(key, None)  # in the cache now: the next pull finds it there

    def active(self, repo: str) -> bool:
        return any(r == repo and j.task and not j.task.done() for (r, _, _), j in self._jobs.items())

    def fetch(self, job: FileJob, revision: str, probe: float | None = None) -> Path:
        """One file into the cache (resumed from its partial blob), counting bytes into `job`.
        `probe`: seconds the first request (Hugging Face's HEAD) may take, in place of
        huggingface_hub's 10, so a Ray node whose hub does not answer gives up soon."""
        from filelock import FileLock

        what = f"hub file {job.repo}/{job.path}"
        xet: XetGet | None = None
        if self.hub == "modelscope":
            etag, get = self._modelscope(job, revision)
        else:
            etag, get, xet = self._huggingface(job, probe)
        job.etag = etag
        blobs = cache.repo_dir(self.root, job.repo) / "blobs"
        blobs.mkdir(parents=True, exist_ok=True)
        blob = blobs / etag
        part = blobs / (etag + cache.INCOMPLETE)
        with FileLock(str(part) + ".lock"):
            if not blob.exists():
                resume = part.stat().st_size if part.exists() else 0
                job.done = job.resumed_from = resume
                job.started = time.monotonic()
                # A partial blob is resumed over plain HTTP: xet would start the file over.
                if xet is None or resume or not self._by_xet(xet, job, part, what):
                    if resume:
                        log.info("resuming %s at byte %d of %s", what, resume, job.size)
                    with part.open("ab") as f, hub_errors(what):
                        get(_Counting(f, job, self._stop), resume)
                os.replace(part, blob)
        job.done = job.size = blob.stat().st_size
        link = cache.link(self.root, job.repo, job.commit, job.path, etag)
        cache.write_ref(self.root, job.repo, revision, job.commit)
        return link

    def _by_xet(self, xet: XetGet, job: FileJob, part: Path, what: str) -> bool:
        """Download the file with hf_xet into a staging file, then move it to the partial blob (so the
        partial blob only ever holds a prefix of the file); False, after a log line, when that failed
        and plain HTTP should do it instead."""
        staging = part.with_name(part.name.removesuffix(cache.INCOMPLETE) + ".shoal.xet")
        try:
            xet(staging)
            got = staging.stat().st_size
            if got != job.size:
                raise OSError(f"it wrote {got} bytes of {job.size}")
        except Exception as exc:  # whatever hf_xet raised: plain HTTP is the way that is left
            log.warning("%s: the xet download failed (%s); downloading over plain HTTP", what, exc)
            staging.unlink(missing_ok=True)
            job.done = 0
            return False
        os.replace(staging, part)
        return True

    def _huggingface(
        self, job: FileJob, probe: float | None = None
    ) -> tuple[str, Callable[[_Counting, int], None], XetGet | None]:
        """The file's etag, how to GET it from an offset (huggingface_hub's own calls), and how to
        download it with hf_xet (None: not served through xet, hf_xet not installed, or SHOAL_HUB_XET=0)."""
        import httpx2
        from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
        from huggingface_hub.file_download import http_get, xet_get
        from huggingface_hub.utils import build_hf_headers
        from huggingface_hub.utils._runtime import is_xet_available

        url = hf_hub_url(job.repo, job.path, revision=job.commit, endpoint=self.endpoint)
        what = f"hub file {job.repo}/{job.path}"
        timeout = constants.DEFAULT_ETAG_TIMEOUT if probe is None else probe
        with hub_errors(what):
            try:
                meta = get_hf_file_metadata(url, token=self.token, timeout=timeout)
            except httpx2.TimeoutException as exc:
                if probe is None:
                    raise
                raise HubUnreachable(
                    f"{what}: the hub at {urlparse(url).netloc} sent no answer within {probe:g} s "
                    f"(SHOAL_HUB_PROBE_TIMEOUT): {type(exc).__name__}"
                ) from None
        if not meta.etag:
            raise HubUnreachable(f"{what}: the hub sent no etag")
        hub_headers = build_hf_headers(token=self.token)
        headers = dict(hub_headers)
        if urlparse(meta.location).netloc != urlparse(url).netloc:
            headers.pop("authorization", None)  # a signed CDN URL: the token stays home

        def get(sink: _Counting, resume: int) -> None:
            http_get(meta.location, sink, resume_size=resume, headers=headers, expected_size=meta.size)  # type: ignore[arg-type]

        xet_data = meta.xet_file_data
        if not (self.xet and xet_data is not None and is_xet_available()):
            return meta.etag, get, None

        def by_xet(target: Path) -> None:
            # The hub's headers (its token) ask for xet's own token; xet_get keeps them from the CAS.
            xet_get(incomplete_path=target, xet_file_data=xet_data, headers=hub_headers,
                    expected_size=meta.size, displayed_filename=job.path,
                    _tqdm_bar=_XetProgress(job))  # type: ignore[arg-type]  # fmt: skip

        return meta.etag, get, by_xet

    def _modelscope(self, job: FileJob, revision: str) -> tuple[str, Callable[[_Counting, int], None]]:
        """The blob name (the listing's sha256, else one of the file's name and snapshot), and the GET."""
        etag = job.sha256 or hashlib.sha256(f"{job.repo}/{job.commit}/{job.path}".encode()).hexdigest()

        def get(sink: _Counting, resume: int) -> None:
            modelscope.download(job.repo, revision, job.path, sink, resume, job.size, self.endpoint)

        return etag, get
