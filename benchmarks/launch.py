"""Launch time against load time, with and without warm spare runners (issue 14, item 3).

For each model (all-MiniLM-L6-v2 on sentence-transformers, smollm2-135m-instruct on llama.cpp, CPU):

- `load_s`: the engine's `load()` plus its warm-up inference, timed in a fresh child process that
  imported the engine's libraries first: what loading the model itself costs;
- `cold`: a Shoal server with `SHOAL_WARM_SPARES=none`; `launch_s` is POST /v1/models until it
  answers (the model is ready then), `--repeats` launches, each deleted before the next;
- `spares`: the same with `SHOAL_WARM_SPARES=all`; before each launch the benchmark waits until the
  model's family has a spare that finished its imports (its "ready" line in the spare log), so this
  is the steady state; `first_after_start` is one launch sent as soon as the server answers, while
  the spares are still importing.

Each side reports the median and every launch, and the runner's own figures (import, load, warm-up
seconds, prewarmed). Phases run one after another, never two servers at once. Prints one JSON document.

    PYTHONPATH=src .venv/bin/python benchmarks/launch.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from common import free_port, machine_info, server_process, wait_ok  # benchmarks/common.py

MODELS = {"all-MiniLM-L6-v2": "torch", "smollm2-135m-instruct": "llama.cpp"}
FAMILIES = ("torch", "llama.cpp", "onnx")  # the spares SHOAL_WARM_SPARES=all starts here


def log(message: str) -> None:
    print(f"[launch {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def spare_ready_count(data: Path, family: str) -> int:
    path = data / "logs" / f"spare-{family}.log"
    return path.read_text(errors="replace").count(": ready (pid") if path.exists() else 0


async def launch_once(client: httpx.AsyncClient, name: str, uid: str) -> dict[str, Any]:
    started = time.monotonic()
    response = await client.post("/v1/models", json={"model_name": name, "model_uid": uid, "n_gpu": None})
    launch_s = time.monotonic() - started
    if response.status_code != 200:
        raise RuntimeError(f"launch {name} failed: {response.status_code} {response.text}")
    metrics = (await client.get(f"/v1/models/{uid}/engine_metrics")).json()
    runner = {k.removeprefix("runner_"): round(v, 3) for k, v in metrics.items() if k.startswith("runner_")}
    await client.delete(f"/v1/models/{uid}")
    return {"launch_s": round(launch_s, 3), "runner": runner}


async def bench_server(spares: str, repeats: int) -> dict[str, Any]:
    port = free_port()
    env = {**os.environ, "SHOAL_WARM_SPARES": spares}
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="shoal-launch-") as tmp:
        data = Path(tmp)
        log_path = data / "gateway.log"
        command = [sys.executable, "-m", "shoal.cli", "serve", "--port", str(port), "--data-dir", tmp,
                   "--log-level", "warning"]  # fmt: skip
        with server_process(command, log_path, env) as proc:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
                await wait_ok(client, "/health", proc, log_path, 120, 0.05)
                used = dict.fromkeys(FAMILIES, 0)  # spares taken so far, by family
                if spares != "none":  # the first launch while the spares still import
                    result["first_after_start"] = await launch_once(client, "all-MiniLM-L6-v2", "first")
                    used["torch"] += 1
                for name, family in MODELS.items():
                    runs = []
                    for i in range(repeats):
                        if spares != "none":  # steady state: every family's spare done importing
                            for f in FAMILIES:
                                await wait_spare(data, f, used[f] + 1)
                        log(f"{spares}: launch {name} ({i + 1}/{repeats})")
                        runs.append(await launch_once(client, name, f"m{i}"))
                        used[family] += 1
                    result[name] = {
                        "launch_s_median": round(statistics.median(r["launch_s"] for r in runs), 3),
                        "runs": runs,
                    }
    return result


async def wait_spare(data: Path, family: str, ready: int) -> None:
    """Until the family's spare log shows `ready` spares that finished importing."""
    deadline = time.monotonic() + 300
    while spare_ready_count(data, family) < ready:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {family} spare ready")
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)  # it is reading stdin now


def bench_load(name: str, family: str, repeats: int) -> dict[str, Any]:
    """The model's load (+ warm-up) in a fresh process that imported the family's libraries first."""
    runs = []
    script = Path(__file__).with_name("launch_load.py")
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, str(script), name, family], capture_output=True, text=True, check=True
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {
        "load_s_median": round(statistics.median(r["load_s"] for r in runs), 3),
        "load_and_warm_up_s_median": round(statistics.median(r["load_s"] + r["warm_up_s"] for r in runs), 3),
        "runs": runs,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"machine": machine_info(), "repeats": args.repeats}
    report["load"] = {}
    for name, family in MODELS.items():
        log(f"in-process load of {name}")
        report["load"][name] = bench_load(name, family, args.repeats)
    report["cold"] = await bench_server("none", args.repeats)
    report["spares"] = await bench_server("all", args.repeats)
    report["launch_minus_load_s"] = {
        side: {
            name: round(report[side][name]["launch_s_median"] - report["load"][name]["load_s_median"], 3)
            for name in MODELS
        }
        for side in ("cold", "spares")
    }
    return report


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--repeats", type=int, default=3, help="launches per model and side (default 3)")
    print(json.dumps(asyncio.run(run(parser.parse_args())), indent=2))


if __name__ == "__main__":
    main()
