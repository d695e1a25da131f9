"""How long the pure scheduler takes: place 1,000 models one by one on 64 GPUs of 80 GiB, with
random sizes, then again with every GPU full so each launch must plan an eviction. Prints JSON.

    .venv/bin/python benchmarks/placement.py [--models 1000] [--gpus 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time

from shoal.scheduler import Demand, DeviceState, Evict, Holding, Place, Policy, place

GiB = 1024**3


def run(n_models: int, n_gpus: int, policy: Policy) -> dict[str, object]:
    rng = random.Random(1)
    devices = [DeviceState(f"gpu:{i}", "gpu", 80 * GiB, 0) for i in range(n_gpus)]
    held: list[Holding] = []
    start = time.perf_counter()
    placed = 0
    for i in range(n_models):
        need = int(rng.uniform(0.5, 8.0) * GiB)
        decision = place(Demand(need), devices, held, policy, now=float(i))
        if isinstance(decision, Place):
            placed += 1
            held.append(Holding(f"m{i}/0", decision.devices[0], need, float(i), float(i), 0.0))
    first = time.perf_counter() - start
    # Every GPU now near full: each further launch must choose LRU victims.
    start = time.perf_counter()
    evictions = 0
    for i in range(100):
        decision = place(Demand(20 * GiB), devices, held, policy, now=1e9 + i)
        if isinstance(decision, Evict):
            evictions += 1
    second = time.perf_counter() - start
    return {
        "policy": policy.name, "models": n_models, "gpus": n_gpus, "placed": placed,
        "seconds_for_all": round(first, 4), "ms_per_placement": round(first / n_models * 1000, 4),
        "eviction_plans": evictions, "ms_per_eviction_plan": round(second / 100 * 1000, 4),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=int, default=1000)
    parser.add_argument("--gpus", type=int, default=64)
    args = parser.parse_args()
    results = [run(args.models, args.gpus, Policy(name)) for name in ("binpack", "spread")]  # type: ignore[arg-type]
    machine = {"cpu_count": os.cpu_count(), "python": platform.python_version(), "date": time.strftime("%F")}
    print(json.dumps({"benchmark": "placement", "machine": machine, "results": results}, indent=2))


if __name__ == "__main__":
    main()
