"""Soak: mixed traffic for minutes while runners are killed and stopped, with stalled connections held open.

Starts `shoal serve` on a free loopback port with a temporary data dir and launches the demo chat model
(llama.cpp) and embedding model on the CPU, 2 replicas each. For --minutes, --clients asyncio clients loop
over short chat completions (some streamed), embeddings, GET /v1/models and /health; every --fault-every
seconds one runner is SIGKILLed and one of the other model SIGSTOPped (pids from GET /v1/models/{uid}),
and the time until the gateway shows each (pid changed, or state no longer "ready") is measured; a stop
still not detected after --detect-timeout is SIGCONTed and reported as not detected. --stalled raw
connections stay open all the time from another loopback address (127.0.0.2: another host to the gateway's
connection caps), each silent, stalled mid-head or stalled mid-body, and replaced when the server closes
one; the gateway's descriptors and RSS are sampled. Failed requests are attributed to the faults they
overlapped (by the x-shoal-replica header the gateway puts on a runner's failure too), and each failure on
a faulted replica is timed from the fault to its answer, against the liveness deadline. One JSON document
goes to stdout, progress to stderr. See benchmarks/README.md.

    PYTHONPATH=src .venv/bin/python benchmarks/soak.py [--minutes 10] [--clients 100] [--stalled 200]
        [--fault-every 60] [--detect-timeout 30] [--request-timeout 120] [--port 0]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

import shoal
from common import free_port, machine_info  # benchmarks/common.py
from load import PROMPTS, SENTENCES, percentile, post_checked, server_process, wait_http  # benchmarks/load.py
from shoal import settings as shoal_settings

CHAT = {"model_name": "smollm2-135m-instruct", "n_gpu": None, "replica": 2, "n_parallel": 2, "n_ctx": 512}
MODELS = {"chat": CHAT, "embed": {"model_name": "all-MiniLM-L6-v2", "n_gpu": None, "replica": 2}}
MIX = {"chat": 30, "chat_stream": 20, "embeddings": 30, "models": 10, "health": 10}  # weights
ANSWER_KEY = {"chat": "choices", "embeddings": "data", "models": "data"}  # what a good answer holds
MAX_TOKENS = 8
SAMPLE_EVERY_S = 2.0
POLL_S = 0.1
SLACK_S = 2.0  # a failure this long after a fault's window closed is still counted in it
# what each kind of stalled connection sends before it falls silent
STALLS = {
    "silent": b"",
    "mid_head": b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Soak: sta",
    "mid_body": b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b'Content-Length: 100\r\n\r\n{"model": "x", "inp',
}
STALL_FROM = "127.0.0.2"  # not the gateway's own address: counted as another host's connections
KILLS = [("chat", 0), ("chat", 1), ("embed", 0), ("embed", 1)]  # round k: kill KILLS[k % 4] ...
STOPS = [("embed", 0), ("embed", 1), ("chat", 0), ("chat", 1)]  # ... and stop STOPS[k % 4]: another model


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Outcome:
    start: float  # seconds since the traffic began
    end: float
    endpoint: str
    model: str | None  # "chat" / "embed" for inference requests
    error: str | None  # None: success
    replica: int | None  # from x-shoal-replica
    detail: str = ""


@dataclass
class Fault:
    signal: str
    model: str
    replica: int
    pid: int | None = None
    at_s: float = 0.0
    detected_s: float | None = None  # after the signal
    seen: str | None = None  # what gave it away: the state it moved to, or "pid changed"
    recovered_s: float | None = None  # ready again with a new pid
    new_pid: int | None = None
    resumed_s: float | None = None  # SIGCONT sent by this script (a stop nobody detected)
    window_end_s: float = 0.0
    skipped: str | None = None


@dataclass
class Stalled:
    opened: int = 0
    closed_by_server: int = 0
    open_s: dict[str, list[float]] = field(default_factory=dict)  # kind → how long each closed one was open
    server_said: Counter[str] = field(default_factory=Counter)  # kind: first line the server sent, if any
    open_errors: Counter[str] = field(default_factory=Counter)
    open_now: int = 0
    open_at_end: int = 0

    def closed(self, kind: str, seconds: float, said: str) -> None:
        self.closed_by_server += 1
        self.open_s.setdefault(kind, []).append(seconds)
        self.server_said[f"{kind}: {said}"] += 1


def proc_sample(pid: int) -> tuple[int, int] | None:
    """(open descriptors, VmRSS in KiB) of a process, or None once it is gone."""
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return fds, int(line.split()[1])
    except OSError:
        return None
    return None


def git(command: str) -> str | None:
    """The output of a git command in this file's checkout, or None."""
    here = Path(__file__).resolve().parent
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(
            ["git", *command.split()], cwd=here, capture_output=True, text=True
        ).stdout.strip()
    return None


async def read_sse(resp: httpx.Response) -> tuple[str | None, str]:
    """(error kind or None, detail) of a streamed chat answer: events up to `data: [DONE]`."""
    done = False
    async for line in resp.aiter_lines():
        if line.startswith("data:"):
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
            elif "error" in json.loads(data):
                return "sse_error", data[:300]
    return (None, "") if done else ("stream_incomplete", "")


def summary(outcomes: list[Outcome]) -> dict[str, Any]:
    """How many requests, how many failed, and the slowest (seconds)."""
    slowest = max((o.end - o.start for o in outcomes), default=0.0)
    return {
        "requests": len(outcomes),
        "failed": sum(o.error is not None for o in outcomes),
        "max_s": round(slowest, 2),
    }


class Soak:
    def __init__(self, base_url: str, gateway_pid: int, args: argparse.Namespace) -> None:
        self.base_url, self.gateway_pid, self.args = base_url, gateway_pid, args
        self.duration = args.minutes * 60
        self.uids: dict[str, str] = {}
        self.outcomes: list[Outcome] = []
        self.faults: list[Fault] = []
        self.stalled = Stalled()
        self.samples: list[tuple[float, int, int]] = []  # (t, fds, rss KiB)
        self.stopped: set[int] = set()  # pids this script SIGSTOPped and has not SIGCONTed
        self.runner_pids: set[int] = set()
        self.t0 = time.monotonic()
        self.traffic_s = 0.0  # how long the traffic ran, once it has
        self.liveness = {  # what the server runs with: this environment's settings, as it reads them
            "timeout_s": float(shoal_settings.LIVENESS_TIMEOUT.get()),
            "interval_s": float(shoal_settings.LIVENESS_INTERVAL.get()),
        }

    def now(self) -> float:
        return time.monotonic() - self.t0

    # ---- traffic ------------------------------------------------------------------------------

    def plan(self, endpoint: str, i: int) -> tuple[str, str, dict[str, Any] | None]:
        """(method, path, JSON body) of one request."""
        if endpoint in ("chat", "chat_stream"):
            messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
            body = {"model": self.uids["chat"], "messages": messages, "max_tokens": MAX_TOKENS}
            return "POST", "/v1/chat/completions", {**body, "stream": endpoint == "chat_stream"}
        if endpoint == "embeddings":
            body = {"model": self.uids["embed"], "input": SENTENCES[i % len(SENTENCES)]}
            return "POST", "/v1/embeddings", body
        return "GET", "/v1/models" if endpoint == "models" else "/health", None

    async def request(self, http: httpx.AsyncClient, endpoint: str, i: int) -> Outcome:
        start, replica, error, detail = self.now(), None, None, ""
        method, path, body = self.plan(endpoint, i)
        try:
            async with (
                asyncio.timeout(self.args.request_timeout),
                http.stream(method, path, json=body) as resp,
            ):
                value = resp.headers.get("x-shoal-replica")
                replica = int(value) if value is not None else None
                if resp.status_code != 200:
                    error, detail = f"http_{resp.status_code}", (await resp.aread()).decode(errors="replace")
                elif endpoint == "chat_stream":
                    error, detail = await read_sse(resp)
                elif (key := ANSWER_KEY.get(endpoint)) and key not in json.loads(await resp.aread()):
                    error = "bad_body"
        except TimeoutError:
            error = "client_timeout"
        except httpx.TimeoutException as exc:
            error, detail = "client_timeout", repr(exc)
        except httpx.TransportError as exc:
            error, detail = f"connection_error:{type(exc).__name__}", repr(exc)
        except ValueError as exc:
            error, detail = "bad_body", repr(exc)
        model = {"chat": "chat", "chat_stream": "chat", "embeddings": "embed"}.get(endpoint)
        return Outcome(start, self.now(), endpoint, model, error, replica, detail[:300])

    async def client(self, http: httpx.AsyncClient, worker: int) -> None:
        rng = random.Random(worker)
        i = worker
        while self.now() < self.duration:
            endpoint = rng.choices(list(MIX), weights=list(MIX.values()))[0]
            outcome = await self.request(http, endpoint, i)
            self.outcomes.append(outcome)
            i += self.args.clients
            if outcome.error == "http_503":  # a well-behaved client backs off
                await asyncio.sleep(1)

    # ---- faults -------------------------------------------------------------------------------

    async def describe(self, http: httpx.AsyncClient, kind: str) -> list[dict[str, Any]]:
        resp = await http.get(f"/v1/models/{self.uids[kind]}")
        resp.raise_for_status()
        replicas: list[dict[str, Any]] = resp.json()["replicas"]
        self.runner_pids.update(r["pid"] for r in replicas if r.get("pid"))
        return replicas

    async def inject(self, http: httpx.AsyncClient, sig: signal.Signals, kind: str, index: int) -> Fault:
        fault = Fault(sig.name, kind, index, at_s=round(self.now(), 2))
        try:
            replica = (await self.describe(http, kind))[index]
        except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
            fault.skipped = f"could not describe the model: {exc!r}"
            return fault
        if replica["state"] != "ready" or not replica["pid"]:
            fault.skipped = f"replica not ready (state {replica['state']})"
            return fault
        fault.pid = int(replica["pid"])
        os.kill(fault.pid, sig)
        if sig is signal.SIGSTOP:
            self.stopped.add(fault.pid)
        fault.at_s = round(self.now(), 2)
        return fault

    async def watch(self, http: httpx.AsyncClient, fault: Fault) -> None:
        """Poll until detected and recovered; a stop not detected in time is resumed and left at that."""
        until = fault.at_s + max(self.args.fault_every - SLACK_S, self.args.detect_timeout)
        while self.now() < until:
            await asyncio.sleep(POLL_S)
            t = round(self.now() - fault.at_s, 2)
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, IndexError):
                replica = (await self.describe(http, fault.model))[fault.replica]
                moved = replica["pid"] != fault.pid
                if fault.detected_s is None and (moved or replica["state"] != "ready"):
                    fault.detected_s, fault.seen = t, "pid changed" if moved else replica["state"]
                if fault.detected_s is not None and moved and replica["state"] == "ready":
                    fault.recovered_s, fault.new_pid = t, replica["pid"]
                    break
            if fault.detected_s is None and t >= self.args.detect_timeout:
                if fault.signal == "SIGSTOP" and fault.pid is not None:
                    self.resume(fault.pid)
                    fault.resumed_s = t
                break
        fault.window_end_s = round(self.now(), 2)

    async def faults_loop(self, http: httpx.AsyncClient) -> None:
        round_no = 0
        while (at := (round_no + 1) * self.args.fault_every) + self.args.detect_timeout <= self.duration:
            await asyncio.sleep(max(0.0, at - self.now()))
            kill = await self.inject(http, signal.SIGKILL, *KILLS[round_no % len(KILLS)])
            stop = await self.inject(http, signal.SIGSTOP, *STOPS[round_no % len(STOPS)])
            log(
                f"fault round {round_no}: SIGKILL {kill.model}[{kill.replica}] pid {kill.pid}, "
                f"SIGSTOP {stop.model}[{stop.replica}] pid {stop.pid}"
            )
            self.faults += [kill, stop]
            await asyncio.gather(*(self.watch(http, f) for f in (kill, stop) if f.skipped is None))
            for f in (kill, stop):
                log(
                    f"  {f.signal} {f.model}[{f.replica}]: detected {f.detected_s} s ({f.seen}), "
                    f"recovered {f.recovered_s} s, resumed {f.resumed_s}, skipped {f.skipped}"
                )
            round_no += 1

    def resume(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        self.stopped.discard(pid)

    def resume_all(self) -> None:
        for pid in list(self.stopped):
            self.resume(pid)

    # ---- stalled connections and sampling -----------------------------------------------------

    async def stall(self, slot: int) -> None:
        host, port = self.base_url.removeprefix("http://").split(":")
        kind = list(STALLS)[slot % len(STALLS)]
        while True:
            try:
                reader, writer = await asyncio.open_connection(host, int(port), local_addr=(STALL_FROM, 0))
            except OSError as exc:
                self.stalled.open_errors[type(exc).__name__] += 1
                await asyncio.sleep(1)
                continue
            self.stalled.opened += 1
            self.stalled.open_now += 1
            opened = time.monotonic()
            try:
                writer.write(STALLS[kind])
                await writer.drain()
                first = await reader.readline()
                said = first.decode(errors="replace").strip()[:60] if first else "(closed)"
                while first and await reader.read(4096):
                    pass
                self.stalled.closed(kind, time.monotonic() - opened, said)
            except OSError as exc:  # a reset is a close by the server too
                self.stalled.closed(kind, time.monotonic() - opened, f"({type(exc).__name__})")
            finally:
                self.stalled.open_now -= 1
                writer.close()
            await asyncio.sleep(0.05)

    async def sampler(self) -> None:
        next_log = 60.0
        while (sample := proc_sample(self.gateway_pid)) is not None:
            self.samples.append((round(self.now(), 1), *sample))
            if self.now() >= next_log:
                errors = sum(o.error is not None for o in self.outcomes)
                log(
                    f"{self.now():.0f} s: {len(self.outcomes)} requests, {errors} failed, fds {sample[0]}, "
                    f"rss {sample[1] / 1024:.0f} MiB, stalled open {self.stalled.open_now}"
                )
                next_log += 60
            await asyncio.sleep(SAMPLE_EVERY_S)

    # ---- the run ------------------------------------------------------------------------------

    async def run(self, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        await wait_http(self.base_url, "/health", proc, log_path)
        for kind, launch in MODELS.items():
            log(f"launching {launch['model_name']} x{launch['replica']}")
            self.uids[kind] = (await post_checked(self.base_url, "/v1/models", launch, f"launch {kind}"))[
                "model_uid"
            ]
        limits = httpx.Limits(max_connections=self.args.clients, max_keepalive_connections=self.args.clients)
        timeout = httpx.Timeout(self.args.request_timeout + 10)  # the asyncio.timeout fires first
        async with (
            httpx.AsyncClient(
                base_url=self.base_url, limits=limits, timeout=timeout, trust_env=False
            ) as http,
            httpx.AsyncClient(base_url=self.base_url, timeout=5, trust_env=False) as monitor,
        ):
            for kind in self.uids:
                await self.describe(monitor, kind)
            log(
                f"{self.args.clients} clients, {self.args.stalled} stalled connections, "
                f"{self.args.minutes} min, faults every {self.args.fault_every} s"
            )
            self.t0 = time.monotonic()
            background = [asyncio.create_task(self.sampler())]
            background += [asyncio.create_task(self.stall(s)) for s in range(self.args.stalled)]
            try:
                await asyncio.gather(
                    self.faults_loop(monitor), *(self.client(http, w) for w in range(self.args.clients))
                )
            finally:
                self.traffic_s = round(self.now(), 1)
                self.stalled.open_at_end = self.stalled.open_now
                if sample := proc_sample(self.gateway_pid):
                    self.samples.append((self.traffic_s, *sample))
                self.resume_all()
                for task in background:
                    task.cancel()
                await asyncio.gather(*background, return_exceptions=True)

    # ---- report -------------------------------------------------------------------------------

    def fault_of(self, o: Outcome) -> Fault | None:
        """The fault a request overlapped on its model (on the replica that answered, when known): the one
        whose window holds the request's end, else the latest that began before the request ended."""
        hits = [f for f in self.faults if f.skipped is None and f.model == o.model and f.at_s <= o.end]
        hits = [f for f in hits if o.start <= f.window_end_s + SLACK_S]
        hits = [f for f in hits if f.replica == o.replica] or hits
        ending = [f for f in hits if o.end <= f.window_end_s + SLACK_S]
        return (ending or hits)[-1] if hits else None

    def attribute(self, o: Outcome, f: Fault | None) -> str:
        if f is None:
            return "unattributed"
        if o.replica is None:
            return "fault_window_no_replica_header"
        return "on_faulted_replica" if o.replica == f.replica else "other_replica_during_fault"

    def answer_times(self, failed: list[Outcome], owner: dict[int, Fault | None]) -> dict[str, Any]:
        """Per signal: seconds from the fault (or from the request's start, if later) to the failed
        answer, for each failure on the faulted replica, against the liveness deadline (a stopped
        runner is killed once its pings go unanswered for SHOAL_LIVENESS_TIMEOUT; pings go out every
        SHOAL_LIVENESS_INTERVAL)."""
        deadline = self.liveness["timeout_s"] + self.liveness["interval_s"]
        out: dict[str, Any] = {"liveness_deadline_s": deadline, **self.liveness}
        for sig in ("SIGKILL", "SIGSTOP"):
            waits = []
            for o in failed:
                f = owner[id(o)]
                if f is not None and f.signal == sig:
                    waits.append(o.end - max(o.start, f.at_s))
            out[sig] = {
                "failed": len(waits),
                "max_s": round(max(waits), 2) if waits else None,
                "p50_s": percentile(waits, 50),
                "over_deadline": sum(w > deadline for w in waits),
            }
        return out

    def report(self) -> dict[str, Any]:
        by_endpoint: dict[str, Any] = {}
        for endpoint in MIX:
            done = [o for o in self.outcomes if o.endpoint == endpoint]
            ok_ms = [(o.end - o.start) * 1000 for o in done if o.error is None]
            ms = {f"p{q}": percentile(ok_ms, q) for q in (50, 99, 100)}
            by_endpoint[endpoint] = {
                "requests": len(done),
                "failed": len(done) - len(ok_ms),
                "ok_latency_ms": ms,
            }
        owner = {id(o): self.fault_of(o) for o in self.outcomes}
        affected: dict[int, list[Outcome]] = {id(f): [] for f in self.faults}
        for o in self.outcomes:
            if (f := owner[id(o)]) is not None and o.replica in (f.replica, None):
                affected[id(f)].append(o)
        failed = [o for o in self.outcomes if o.error is not None]
        attribution: dict[str, Counter[str]] = {}
        latency: dict[str, list[float]] = {}
        for o in failed:
            where = self.attribute(o, owner[id(o)])
            attribution.setdefault(where, Counter())[o.error or ""] += 1
            latency.setdefault(where, []).append(o.end - o.start)
        samples = sorted(failed, key=lambda o: (owner[id(o)] is not None, o.start))[:20]
        on_faulted = [o for o in failed if self.attribute(o, owner[id(o)]) == "on_faulted_replica"]
        fds = [s[1] for s in self.samples]
        rss = [round(s[2] / 1024, 1) for s in self.samples]
        st = self.stalled
        return {
            "requests": len(self.outcomes),
            "requests_per_s": round(len(self.outcomes) / max(self.traffic_s, 1e-9), 2),
            "by_endpoint": by_endpoint,
            "errors": dict(Counter(o.error for o in failed)),
            "failed": {
                "total": len(failed),
                "by_attribution": {k: dict(v) for k, v in attribution.items()},
                "max_seconds_by_attribution": {k: round(max(v), 2) for k, v in latency.items()},
                "samples": [{**asdict(o), "attribution": self.attribute(o, owner[id(o)])} for o in samples],
                "on_faulted_replica_answered_after_fault": self.answer_times(on_faulted, owner),
            },
            "faults": [{**asdict(f), "affected": summary(affected[id(f)])} for f in self.faults],
            "faults_detected": f"{sum(f.detected_s is not None for f in self.faults)}/"
            f"{sum(f.skipped is None for f in self.faults)}",
            "stalled": {
                # not asdict(): it rebuilds a Counter from (key, count) pairs, making tuples its keys
                "opened": st.opened,
                "closed_by_server": st.closed_by_server,
                "server_said": dict(st.server_said),
                "open_errors": dict(st.open_errors),
                "open_at_end": st.open_at_end,
                "target": self.args.stalled,
                "from": STALL_FROM,
                "kinds": list(STALLS),
                "open_s_when_closed": {
                    kind: {f"p{q}": percentile(st.open_s.get(kind, []), q) for q in (0, 50, 100)}
                    for kind in STALLS
                },
            },
            "gateway": {
                "pid": self.gateway_pid,
                "fds": {"start": fds[0], "peak": max(fds), "end": fds[-1]} if fds else None,
                "rss_mib": {"start": rss[0], "peak": max(rss), "end": rss[-1]} if rss else None,
                "per_minute": [
                    {"t_s": s[0], "fds": s[1], "rss_mib": round(s[2] / 1024, 1)}
                    for s in self.samples
                    if s[0] % 60 < SAMPLE_EVERY_S or s is self.samples[-1]
                ],
            },
        }


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_server(proc: subprocess.Popen[bytes], runner_pids: set[int]) -> dict[str, Any]:
    """SIGINT the server and wait; server_process() then kills whatever is left of its process group."""
    start = time.monotonic()
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
    waited = round(time.monotonic() - start, 2)
    time.sleep(1)  # runners die with the gateway (PR_SET_PDEATHSIG); give them a moment
    return {"exit_code": proc.poll(), "seconds": waited, "runners_left": sorted(filter(alive, runner_pids))}


OPTIONS = [
    ("--minutes", float, 10, "duration of the traffic"),
    ("--clients", int, 100, "concurrent clients"),
    ("--stalled", int, 200, "stalled connections held open"),
    ("--fault-every", float, 60, "seconds between fault rounds"),
    ("--detect-timeout", float, 30, "seconds after which a fault counts as not detected"),
    ("--request-timeout", float, 120, "client-side limit on one request, seconds"),
    ("--port", int, 0, "port for the server"),
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for flag, kind, default, text in OPTIONS:
        parser.add_argument(
            flag, type=kind, default=default, help=f"{text} (default {default or 'a free one'})"
        )
    args = parser.parse_args()
    if min(args.minutes, args.fault_every, args.detect_timeout, args.request_timeout, args.clients) <= 0:
        parser.error("--minutes, --fault-every, --detect-timeout, --request-timeout, --clients: positive")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the finally blocks run
    env = dict(os.environ)
    if env.get("PYTHONPATH"):  # the runners start elsewhere too: absolute paths
        env["PYTHONPATH"] = os.pathsep.join(
            str(Path(p).resolve()) for p in env["PYTHONPATH"].split(os.pathsep)
        )
    port = args.port or free_port()
    with tempfile.TemporaryDirectory(prefix="shoal-soak-") as tmp:
        log_path = Path(tmp) / "server.log"
        command = [
            sys.executable,
            *f"-m shoal.cli serve --host 127.0.0.1 --port {port} --log-level warning".split(),
        ]
        command += ["--data-dir", str(Path(tmp) / "data")]
        log(f"starting shoal on 127.0.0.1:{port} ({Path(shoal.__file__).parent})")
        with server_process(command, log_path, env) as proc:
            soak = Soak(f"http://127.0.0.1:{port}", proc.pid, args)
            try:
                asyncio.run(soak.run(proc, log_path))
            finally:
                soak.resume_all()
                shutdown = stop_server(proc, soak.runner_pids)
                log(f"server stopped: {shutdown}")
        server_log = log_path.read_text(errors="replace") if log_path.exists() else ""
    report = {
        "benchmark": "shoal-soak",
        "machine": machine_info(),
        "git": {
            "commit": git("rev-parse HEAD"),
            "dirty": bool(git("status --porcelain --untracked-files=no")),
        },
        "shoal_source": str(Path(shoal.__file__).parent),
        "config": {**vars(args), "models": MODELS, "mix": MIX, "chat_max_tokens": MAX_TOKENS},
        "duration_s": soak.traffic_s,
        **soak.report(),
        "shutdown": shutdown,
        "server_log": {"bytes": len(server_log), "tracebacks": server_log.count("Traceback")},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
