"""What Shoal costs: the same engine on the same model, called in-process and through Shoal over HTTP.

Phase 1 loads each engine in this process (one at a time), measures it, and frees it. Phase 2 starts a
Shoal server on a free loopback port with a temporary data dir, launches the same models through
POST /v1/models (one at a time, same n_threads, CPU), measures the same requests over a keep-alive
httpx client, and stops the server. The two phases never overlap, so they never compete for cores.

Both phases also drive one-sentence embeddings from 1, 16 and 64 concurrent clients for --seconds
each (the in-process side through the engine's own dynamic batching, no HTTP): requests/s, p50/p99,
and on the Shoal side the gateway process's own CPU time (user + system from /proc) per request.
With --profile DIR, py-spy records the gateway (--native) during Shoal's phases, one raw collapsed
stack file per phase.

Prints one JSON document to stdout (everything else goes to stderr).

    .venv/bin/python benchmarks/overhead.py [--repeats 10] [--max-tokens 128] [--port 0]
        [--seconds 8] [--clients 1,16,64] [--parts embed,chat] [--shoal-src OTHER/src] [--profile DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from common import free_port, machine_info, settle, wait_ok  # benchmarks/common.py
from shoal.catalog import Catalog, ModelFamily
from shoal.catalog.resolve import local_path
from shoal.engines.base import EngineConfig
from shoal.engines.llamacpp import LlamaCppEngine
from shoal.engines.sentence_transformers import SentenceTransformersEngine
from shoal.state import StateStore

EMBED_MODEL = "all-MiniLM-L6-v2"
CHAT_MODEL = "smollm2-135m-instruct"
BATCH_SIZE = 64
WARMUPS = 2
PROMPT = "Explain in a few sentences why the sky is blue."
SINGLE_SENTENCE = "A quick brown fox jumps over the lazy dog near the riverbank."
_SUBJECTS = [
    "The engineer",
    "A small cat",
    "Our team",
    "The old library",
    "A passing train",
    "The committee",
    "My neighbour",
    "The server",
]
_ACTIONS = [
    "reviewed the quarterly report",
    "waited patiently by the door",
    "shipped the new release",
    "opened early on Sunday",
    "rattled past the station",
    "postponed the decision",
    "planted tomatoes in spring",
    "answered every request",
]
BATCH = [f"{_SUBJECTS[i % 8]} {_ACTIONS[(i // 8) % 8]} (sentence {i})." for i in range(BATCH_SIZE)]

Timed = Callable[[], Awaitable[Any]]


# ---- measurement helpers --------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def median(values: list[float]) -> float:
    return percentile(values, 50)


async def latencies_ms(call: Timed, warmups: int, runs: int) -> dict[str, Any]:
    for _ in range(warmups):
        await call()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - start) * 1000)
    return {
        "p50_ms": round(percentile(samples, 50), 3),
        "p95_ms": round(percentile(samples, 95), 3),
        "mean_ms": round(sum(samples) / len(samples), 3),
        "n": runs,
    }


async def concurrent(call: Timed, clients: int, seconds: float) -> dict[str, Any]:
    """`clients` loops calling call() back to back until the deadline; requests in flight then are
    waited for and counted."""
    samples: list[float] = []
    deadline = time.monotonic() + seconds

    async def client() -> None:
        while time.monotonic() < deadline:
            start = time.perf_counter()
            await call()
            samples.append((time.perf_counter() - start) * 1000)

    start = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(clients)])
    wall = time.perf_counter() - start
    return {
        "clients": clients,
        "requests": len(samples),
        "requests_per_s": round(len(samples) / wall, 1),
        "p50_ms": round(percentile(samples, 50), 3),
        "p99_ms": round(percentile(samples, 99), 3),
    }


@dataclass
class ChatRun:
    ttft_s: float  # request start to the first chunk with content
    total_s: float  # request start to the end of the stream
    decode_s: float  # first content chunk to last content chunk
    tokens: int
    text: str


class StreamTimer:
    """Fed every streamed chunk of one chat completion, in-process dicts or parsed SSE alike."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None
        self.pieces: list[str] = []
        self.usage_tokens: int | None = None

    def feed(self, chunk: dict[str, Any]) -> None:
        if "error" in chunk:
            raise RuntimeError(f"stream error: {chunk['error']}")
        now = time.perf_counter()
        for choice in chunk.get("choices") or []:
            content = (choice.get("delta") or {}).get("content")
            if content:
                self.first = self.first if self.first is not None else now
                self.last = now
                self.pieces.append(content)
        usage = chunk.get("usage")
        if usage and usage.get("completion_tokens") is not None:
            self.usage_tokens = int(usage["completion_tokens"])

    def finish(self) -> ChatRun:
        end = time.perf_counter()
        if self.first is None or self.last is None:
            raise RuntimeError("the stream carried no content")
        tokens = self.usage_tokens if self.usage_tokens is not None else len(self.pieces)
        return ChatRun(
            self.first - self.start, end - self.start, self.last - self.first, tokens, "".join(self.pieces)
        )


async def chat_runs(stream_once: Callable[[], Awaitable[ChatRun]], warmups: int, runs: int) -> list[ChatRun]:
    for _ in range(warmups):
        await stream_once()
    return [await stream_once() for _ in range(runs)]


def summarize_chat(runs: list[ChatRun]) -> dict[str, Any]:
    """tokens/s is end to end (tokens / whole request); decode tokens/s leaves out the first token."""
    decode_rates = [(r.tokens - 1) / r.decode_s for r in runs if r.decode_s > 0] or [0.0]
    return {
        "tokens_per_s_median": round(median([r.tokens / r.total_s for r in runs]), 2),
        "decode_tokens_per_s_median": round(median(decode_rates), 2),
        "ttft_ms_median": round(median([r.ttft_s * 1000 for r in runs]), 2),
        "total_ms_median": round(median([r.total_s * 1000 for r in runs]), 2),
        "completion_tokens_median": median([float(r.tokens) for r in runs]),
        "n": len(runs),
    }


def chat_body(max_tokens: int) -> dict[str, Any]:
    return {
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0,
        "seed": 1,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def embed_body(texts: str | list[str]) -> dict[str, Any]:
    return {"model": EMBED_MODEL, "input": texts, "encoding_format": "float"}


# ---- phase 1: in-process --------------------------------------------------------------------------


def engine_config(family: ModelFamily, n_threads: int) -> EngineConfig:
    """What a runner builds for a CPU replica of this catalog model (see shoal.runners.main)."""
    spec = family.pick_spec(None, None, None)  # the spec a launch without constraints gets
    assert spec.source is not None
    path = local_path(spec.source)
    assert path is not None, f"{family.model_name} is not available locally"
    return EngineConfig(
        model_path=path,
        model_uid=family.model_name,
        model_format=spec.model_format,
        context_length=family.context_length,
        device="cpu",
        n_threads=n_threads,
    )


async def inprocess_embeddings(
    config: EngineConfig, runs: int, batch_runs: int, clients: list[int], seconds: float
) -> dict[str, Any]:
    engine = SentenceTransformersEngine(config)
    engine.load()
    try:
        result: dict[str, Any] = {
            "single": await latencies_ms(lambda: engine.embed(embed_body(SINGLE_SENTENCE)), 3, runs),
            "batch64": await latencies_ms(lambda: engine.embed(embed_body(BATCH)), WARMUPS, batch_runs),
        }
        for n in clients:
            result[f"c{n}"] = await concurrent(lambda: engine.embed(embed_body(SINGLE_SENTENCE)), n, seconds)
        vector = (await engine.embed(embed_body(SINGLE_SENTENCE)))["data"][0]["embedding"]
        result["_vector"] = [float(x) for x in vector]
        return result
    finally:
        engine.close()


async def inprocess_chat(config: EngineConfig, max_tokens: int, runs: int) -> list[ChatRun]:
    engine = LlamaCppEngine(config)
    engine.load()

    async def stream_once() -> ChatRun:
        timer = StreamTimer()
        async for chunk in engine.chat_stream(chat_body(max_tokens)):
            timer.feed(chunk)
        return timer.finish()

    try:
        return await chat_runs(stream_once, WARMUPS, runs)
    finally:
        engine.close()


# ---- phase 2: through Shoal -----------------------------------------------------------------------


@contextlib.contextmanager
def shoal_server(
    port: int, data_dir: Path, extra_args: tuple[str, ...] = (), src: str | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A gateway subprocess with no models (from `src`, another tree's src/ folder, if given); its
    runners die with it (PR_SET_PDEATHSIG)."""
    log = (data_dir / "gateway.log").open("wb")
    env = {**os.environ, "PYTHONPATH": str(Path(src).resolve())} if src else None
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shoal.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
            "--log-level",
            "warning",
            *extra_args,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # graceful: the gateway stops its runners
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


async def wait_healthy(client: httpx.AsyncClient, proc: subprocess.Popen[bytes], log: Path) -> None:
    await wait_ok(client, "/health", proc, log, 60, 0.2)


@contextlib.asynccontextmanager
async def launched(client: httpx.AsyncClient, model_name: str, n_threads: int) -> AsyncIterator[str]:
    """One model on CPU with n_threads, ready when entered, terminated on exit."""
    launch = {"model_name": model_name, "n_gpu": None, "n_threads": n_threads}  # n_gpu None: CPU
    resp = await client.post("/v1/models", json=launch)
    if resp.status_code != 200:
        raise RuntimeError(f"launch {model_name} failed: {resp.status_code} {resp.text}")
    uid = resp.json()["model_uid"]
    try:
        yield uid
    finally:
        await client.delete(f"/v1/models/{uid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (not its children) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def profiled(pid: int, folder: str | None, name: str) -> Iterator[None]:
    """py-spy (from this interpreter's venv) records `pid` while the block runs, if `folder` is set."""
    if not folder:
        yield
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    py_spy = Path(sys.executable).parent / "py-spy"
    out = Path(folder) / f"{name}.txt"
    command = [str(py_spy), "record", "--native", "--rate", "200", "--format", "raw", "--output", str(out),
               "--pid", str(pid)]  # fmt: skip
    recorder = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)  # py-spy attaches
    try:
        yield
    finally:
        recorder.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        recorder.wait(timeout=60)


async def gateway_cpu(pid: int, call: Timed, clients: int, seconds: float) -> dict[str, Any]:
    """concurrent() with the gateway's own CPU time per request beside it (its idle loop included)."""
    before = cpu_seconds(pid)
    result = await concurrent(call, clients, seconds)
    result["gateway_cpu_ms_per_request"] = round((cpu_seconds(pid) - before) / result["requests"] * 1000, 3)
    return result


async def shoal_embeddings(
    client: httpx.AsyncClient,
    runs: int,
    batch_runs: int,
    gateway_pid: int,
    clients: list[int],
    seconds: float,
    profile: str | None,
) -> dict[str, Any]:
    async def embed(texts: str | list[str]) -> dict[str, Any]:
        resp = await client.post("/v1/embeddings", json=embed_body(texts))
        resp.raise_for_status()
        return resp.json()  # type: ignore[no-any-return]  # a client has to parse the answer too

    cpu_before = cpu_seconds(gateway_pid)
    single = await latencies_ms(lambda: embed(SINGLE_SENTENCE), 3, runs)
    # what the gateway process itself spends per request (its idle loops included, a few ms/s)
    gateway_cpu_ms = (cpu_seconds(gateway_pid) - cpu_before) / (runs + 3) * 1000
    result = {
        "single": {**single, "gateway_cpu_ms_per_request": round(gateway_cpu_ms, 3)},
        "batch64": await latencies_ms(lambda: embed(BATCH), WARMUPS, batch_runs),
    }
    for n in clients:
        with profiled(gateway_pid, profile, f"embed-c{n}"):
            result[f"c{n}"] = await gateway_cpu(gateway_pid, lambda: embed(SINGLE_SENTENCE), n, seconds)
    result["_vector"] = (await embed(SINGLE_SENTENCE))["data"][0]["embedding"]
    return result


async def shoal_chat(
    client: httpx.AsyncClient, max_tokens: int, runs: int, gateway_pid: int, profile: str | None
) -> tuple[list[ChatRun], float]:
    """The runs, and the gateway's CPU ms per streamed chunk over them."""

    async def stream_once() -> ChatRun:
        timer = StreamTimer()
        async with client.stream("POST", "/v1/chat/completions", json=chat_body(max_tokens)) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"chat failed: {resp.status_code} {(await resp.aread()).decode()}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    break
                timer.feed(json.loads(data))
        return timer.finish()

    for _ in range(WARMUPS):
        await stream_once()
    before = cpu_seconds(gateway_pid)
    with profiled(gateway_pid, profile, "chat"):
        timed = [await stream_once() for _ in range(runs)]
    tokens = sum(run_.tokens for run_ in timed) or 1  # one SSE event per token
    return timed, (cpu_seconds(gateway_pid) - before) / tokens * 1000


# ---- report ---------------------------------------------------------------------------------------


def embed_comparison(inproc: dict[str, Any], shoal: dict[str, Any]) -> dict[str, Any]:
    return {
        "inprocess": inproc,
        "shoal": shoal,
        "delta_p50_ms": round(shoal["p50_ms"] - inproc["p50_ms"], 3),
        "delta_p95_ms": round(shoal["p95_ms"] - inproc["p95_ms"], 3),
    }


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b else None


def embed_report(inproc: dict[str, Any], shoal: dict[str, Any], clients: list[int]) -> dict[str, Any]:
    vec_in, vec_sh = inproc.pop("_vector"), shoal.pop("_vector")
    report = {
        "single": embed_comparison(inproc["single"], shoal["single"]),
        "batch64": embed_comparison(inproc["batch64"], shoal["batch64"]),
        "max_abs_diff_vector": max(abs(a - b) for a, b in zip(vec_in, vec_sh, strict=True)),
    }
    for n in clients:
        report[f"c{n}"] = {
            "inprocess": inproc[f"c{n}"],
            "shoal": shoal[f"c{n}"],
            "requests_per_s_ratio": ratio(
                shoal[f"c{n}"]["requests_per_s"], inproc[f"c{n}"]["requests_per_s"]
            ),
        }
    return report


def chat_report(
    inproc_runs: list[ChatRun], shoal_runs: list[ChatRun], cpu_ms_per_token: float
) -> dict[str, Any]:
    chat_in, chat_sh = summarize_chat(inproc_runs), summarize_chat(shoal_runs)
    return {
        "inprocess": chat_in,
        "shoal": {**chat_sh, "gateway_cpu_ms_per_token": round(cpu_ms_per_token, 4)},
        "tokens_per_s_ratio": ratio(chat_sh["tokens_per_s_median"], chat_in["tokens_per_s_median"]),
        "decode_tokens_per_s_ratio": ratio(
            chat_sh["decode_tokens_per_s_median"], chat_in["decode_tokens_per_s_median"]
        ),
        "ttft_ratio": ratio(chat_sh["ttft_ms_median"], chat_in["ttft_ms_median"]),
        "ttft_delta_ms": round(chat_sh["ttft_ms_median"] - chat_in["ttft_ms_median"], 2),
        # temperature 0 and a fixed seed: both sides should generate the very same text
        "same_output": inproc_runs[-1].text == shoal_runs[-1].text,
    }


def build_report(
    args: argparse.Namespace, n_threads: int, timings: dict[str, Any], load: dict[str, list[float]]
) -> dict[str, Any]:
    report: dict[str, Any] = {
        "benchmark": "shoal-overhead",
        "machine": {**machine_info(), "loadavg_1m": load},
        "config": {
            "n_threads": n_threads,
            "repeats": args.repeats,
            "warmups": WARMUPS,
            "max_tokens": args.max_tokens,
            "embedding_model": EMBED_MODEL,
            "chat_model": CHAT_MODEL,
            "batch_size": BATCH_SIZE,
            "single_sentence_runs": args.repeats * 10,
            "batch_runs": args.repeats * 2,
            "clients": args.clients,
            "seconds_per_concurrency_phase": args.seconds,
            "shoal_src": args.shoal_src or "this checkout",
            "chat_prompt": PROMPT,
            "temperature": 0,
            "seed": 1,
            "order": "in-process first, then Shoal",
            "settled_s": timings.get("settled_s"),  # after each launch, until the server was quiet
        },
    }
    summary: dict[str, Any] = {}
    if "embed" in args.parts:
        emb = embed_report(timings["embed_inprocess"], timings["embed_shoal"], args.clients)
        report["embeddings"] = emb
        summary["embed_single_delta_p50_ms"] = emb["single"]["delta_p50_ms"]
        summary["gateway_cpu_ms_per_embed_request"] = {
            "sequential": emb["single"]["shoal"]["gateway_cpu_ms_per_request"],
            **{f"c{n}": emb[f"c{n}"]["shoal"]["gateway_cpu_ms_per_request"] for n in args.clients},
        }
        summary["embed_batch64_delta_p50_ms"] = emb["batch64"]["delta_p50_ms"]
    if "chat" in args.parts:
        chat = chat_report(timings["chat_inprocess"], *timings["chat_shoal"])
        report["chat"] = chat
        summary["chat_tokens_per_s_ratio"] = chat["tokens_per_s_ratio"]
        summary["chat_ttft_delta_ms"] = chat["ttft_delta_ms"]
        summary["gateway_cpu_ms_per_chat_token"] = chat["shoal"]["gateway_cpu_ms_per_token"]
    report["summary"] = summary
    return report


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Engines and libraries may print; only the JSON report belongs on stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def log(message: str) -> None:
    print(f"[overhead {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def in_child(phase: str, args: argparse.Namespace) -> Any:
    command = [
        sys.executable,
        __file__,
        "--phase",
        phase,
        "--repeats",
        str(args.repeats),
        "--max-tokens",
        str(args.max_tokens),
        "--threads",
        str(args.threads),
        "--seconds",
        str(args.seconds),
        "--clients",
        ",".join(map(str, args.clients)),
    ]
    return json.loads(subprocess.run(command, stdout=subprocess.PIPE, check=True).stdout)


async def child_phase(args: argparse.Namespace) -> Any:
    """One in-process measurement, run inside the child process started by in_child()."""
    n_threads = args.threads
    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as tmp:
        catalog = Catalog(StateStore(Path(tmp) / "state.db"))
        if args.phase == "embed":
            config = engine_config(catalog.get(EMBED_MODEL), n_threads)
            return await inprocess_embeddings(
                config, args.repeats * 10, args.repeats * 2, args.clients, args.seconds
            )
        config = engine_config(catalog.get(CHAT_MODEL), n_threads)
        return [asdict(run) for run in await inprocess_chat(config, args.max_tokens, args.repeats)]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    n_threads = args.threads
    single_runs, batch_runs = args.repeats * 10, args.repeats * 2
    timings: dict[str, Any] = {}
    load: dict[str, list[float]] = {"start": list(os.getloadavg())}
    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as tmp:
        data_dir = Path(tmp)

        # Each in-process phase runs in a fresh child process, as a runner does: no engine shares a
        # process (or torch's thread pool) with another, or with the benchmark's own client code.
        if "embed" in args.parts:
            log(f"in-process embeddings ({single_runs} single, {batch_runs} batches of {BATCH_SIZE})")
            timings["embed_inprocess"] = in_child("embed", args)
        if "chat" in args.parts:
            log(f"in-process chat ({args.repeats} runs of up to {args.max_tokens} tokens)")
            timings["chat_inprocess"] = [ChatRun(**run) for run in in_child("chat", args)]
        load["after_inprocess"] = list(os.getloadavg())

        port = args.port or free_port()
        log(f"starting shoal on 127.0.0.1:{port}")
        with shoal_server(port, data_dir, src=args.shoal_src) as proc:
            limits = httpx.Limits(max_connections=128, max_keepalive_connections=128)
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}",
                timeout=httpx.Timeout(600),
                trust_env=False,
                limits=limits,
            ) as client:
                await wait_healthy(client, proc, data_dir / "gateway.log")
                if "embed" in args.parts:
                    async with launched(client, EMBED_MODEL, n_threads):
                        timings.setdefault("settled_s", []).append(await settle(proc.pid))  # spares
                        log("shoal embeddings")
                        timings["embed_shoal"] = await shoal_embeddings(
                            client,
                            single_runs,
                            batch_runs,
                            proc.pid,
                            args.clients,
                            args.seconds,
                            args.profile,
                        )
                if "chat" in args.parts:
                    async with launched(client, CHAT_MODEL, n_threads):
                        timings.setdefault("settled_s", []).append(await settle(proc.pid))  # spares
                        log("shoal chat")
                        timings["chat_shoal"] = await shoal_chat(
                            client, args.max_tokens, args.repeats, proc.pid, args.profile
                        )
        load["end"] = list(os.getloadavg())
    return build_report(args, n_threads, timings, load)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=10,
        help="timed chat runs per side (after 2 warm-ups); embeddings time 10x this many "
        "single sentences and 2x this many 64-sentence batches (default 10)",
    )
    parser.add_argument("--max-tokens", type=int, default=128, help="max_tokens per chat run (default 128)")
    parser.add_argument("--port", type=int, default=0, help="port for the Shoal server (default: a free one)")
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="engine threads, both sides (default: all cores)",
    )
    parser.add_argument(
        "--seconds", type=float, default=8, help="seconds per concurrent-clients phase (default 8)"
    )
    parser.add_argument(
        "--clients",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[1, 16, 64],
        help="concurrent one-sentence clients, one phase each (default 1,16,64)",
    )
    parser.add_argument(
        "--parts",
        type=lambda text: set(text.split(",")),
        default={"embed", "chat"},
        help="what to measure: embed, chat or both (default embed,chat)",
    )
    parser.add_argument("--shoal-src", help="serve Shoal from another tree's src/ folder (before/after)")
    parser.add_argument("--profile", help="a folder for py-spy's raw stacks of the gateway, per phase")
    # internal: the child process that runs one in-process phase
    parser.add_argument("--phase", choices=["embed", "chat"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if not args.parts <= {"embed", "chat"}:
        parser.error("--parts takes embed, chat or embed,chat")
    with stdout_to_stderr():
        report = asyncio.run(child_phase(args) if args.phase else run(args))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
