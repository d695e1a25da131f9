"""The GPU check's park/wake and move sections (docs/gpu-check.md), run by scripts/gpu_check.py on
its server once the placement checks are done (or alone with `--only park`).

Park and wake: a ~0.75 B transformers LLM and a sentence-transformers encoder are launched and
asked once, then a pinned filler that fits only if both park; their runners' NVML use is printed
while parked; the filler goes, and one request to each wakes it: the wake time, that request's
latency and the next one's are printed, and the pid must be the same (woken in its own process).
Move (two GPUs or more): an idle model on one GPU, a pinned filler on the other that leaves room
for it, then a launch that fits only where the idle model was: it must move, in a new runner.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

GiB = 1024**3


def _clear(http: httpx.Client) -> None:
    for model in http.get("/v1/models").json()["data"]:
        http.delete(f"/v1/models/{model['id']}")


def _replica(http: httpx.Client, uid: str) -> dict[str, Any]:
    return dict(http.get(f"/v1/models/{uid}").json()["replicas"][0])


def _device(http: httpx.Client, device: str) -> dict[str, Any]:
    return dict(next(d for d in http.get("/v1/cluster/devices").json() if d["id"] == device))


def _ask(http: httpx.Client, uid: str) -> tuple[int, float]:
    started = time.monotonic()
    if uid.endswith(("emb", "small")):  # the embedding models here
        r = http.post("/v1/embeddings", json={"model": uid, "input": ["parked weights", "wake up"] * 8})
    else:
        body = {
            "model": uid,
            "max_tokens": 8,
            "temperature": 0,
            "messages": [{"role": "user", "content": "hi"}],
        }
        r = http.post("/v1/chat/completions", json=body)
    return r.status_code, time.monotonic() - started


def park_and_wake(
    http: httpx.Client, log: Callable[[str], None], nvml: Callable[[], dict[int, int]], failures: list[str]
) -> dict[str, Any]:
    _clear(http)
    result: dict[str, Any] = {}
    launches = {
        "park-llm": {
            "model_name": "gc-llm-b",
            "model_engine": "transformers",
            "context_length": 2048,
            "max_batch_size": 4,
        },
        "park-emb": {"model_name": "gc-emb"},
    }
    for uid, body in launches.items():
        r = http.post("/v1/models", json={**body, "model_uid": uid, "gpu_idx": [0], "keep_alive": 0})
        if r.status_code != 200:
            failures.append(f"park: launch {uid}: {r.status_code}")
            log(f"park: LAUNCH FAILED {uid}: {r.text[:1000]}")
            return result
        status, _ = _ask(http, uid)
        log(f"park: launched {uid}, first request {status}")
    pids = {uid: _replica(http, uid)["pid"] for uid in launches}
    before = nvml()
    free = _device(http, "gpu:0")["free_bytes"]
    held = sum(_replica(http, uid)["reserved_bytes"] for uid in launches)
    filler = free + held - int(0.25 * GiB)  # fits only once both have given their room back
    started = time.monotonic()
    r = http.post(
        "/v1/models",
        json={
            "model_name": "gc-llm-a",
            "model_uid": "park-filler",
            "model_engine": "transformers",
            "gpu_memory": filler,
            "gpu_idx": [0],
            "context_length": 512,
            "max_batch_size": 1,
            "pinned": True,
        },
    )
    states = {uid: _replica(http, uid)["state"] for uid in launches}
    took = time.monotonic() - started
    log(f"park: filler of {filler / GiB:.2f} GiB: {r.status_code} in {took:.1f} s; {states}")
    if r.status_code != 200 or set(states.values()) != {"parked"}:
        failures.append(f"park: filler {r.status_code}, states {states}")
        return result
    parked = nvml()
    for uid, pid in pids.items():
        ready_use, parked_use = before.get(pid, 0) / GiB, parked.get(pid, 0) / GiB
        log(f"park: {uid} pid {pid} NVML {ready_use:.2f} GiB ready -> {parked_use:.2f} GiB parked")
    http.delete("/v1/models/park-filler")
    for uid, pid in pids.items():
        status, first = _ask(http, uid)
        rep = _replica(http, uid)
        _, second = _ask(http, uid)
        wake = rep.get("last_wake_seconds")
        log(
            f"park: {uid} woke in {wake if wake is None else round(wake, 3)} s; the request that woke it "
            f"{first * 1000:.0f} ms ({status}), the next {second * 1000:.0f} ms; "
            f"pid {rep['pid']} (was {pid}), "
            f"NVML {nvml().get(pid, 0) / GiB:.2f} GiB"
        )
        result[uid] = {
            "wake_seconds": wake,
            "first_request_seconds": first,
            "next_request_seconds": second,
            "same_pid": rep["pid"] == pid,
            "status": status,
        }
        if status != 200 or rep["pid"] != pid or rep["state"] != "ready":
            failures.append(
                f"park: wake {uid}: status {status}, pid {rep['pid']} (was {pid}), {rep['state']}"
            )
    _clear(http)
    return result


def defragment(http: httpx.Client, log: Callable[[str], None], failures: list[str]) -> dict[str, Any]:
    gpus = [d for d in http.get("/v1/cluster/devices").json() if d["kind"] == "gpu"]
    if len(gpus) < 2:
        log("move: SKIPPED, it needs two GPUs and this machine has one")
        return {"skipped": "one GPU"}
    _clear(http)
    r = http.post("/v1/models", json={"model_name": "gc-emb", "model_uid": "mv-small", "keep_alive": 300})
    small = _replica(http, "mv-small")
    here = small["device"]
    other = next(d for d in gpus if d["id"] != here)
    room = small["reserved_bytes"] + int(0.5 * GiB)
    fixed = _device(http, other["id"])["free_bytes"] - room
    r = http.post(
        "/v1/models",
        json={
            "model_name": "gc-llm-a",
            "model_uid": "mv-fixed",
            "pinned": True,
            "model_engine": "transformers",
            "gpu_memory": fixed,
            "gpu_idx": [other["index"]],
            "context_length": 512,
            "max_batch_size": 1,
        },
    )
    big = _device(http, here)["free_bytes"] + small["reserved_bytes"] // 2
    started = time.monotonic()
    r = http.post(
        "/v1/models",
        json={
            "model_name": "gc-llm-a",
            "model_uid": "mv-big",
            "keep_alive": -1,
            "model_engine": "transformers",
            "gpu_memory": big,
            "context_length": 512,
            "max_batch_size": 1,
        },
    )
    launched = time.monotonic() - started
    while _replica(http, "mv-small")["state"] != "ready" and time.monotonic() - started < 300:
        time.sleep(0.05)
    moved = _replica(http, "mv-small")
    status, latency = _ask(http, "mv-small")
    log(
        f"move: big launch {r.status_code} in {launched:.1f} s; mv-small {here} -> {moved['device']} "
        f"(pid {small['pid']} -> {moved['pid']}) ready {time.monotonic() - started:.1f} s after, "
        f"request {status} in {latency * 1000:.0f} ms"
    )
    if r.status_code != 200 or moved["device"] != other["id"] or status != 200:
        failures.append(f"move: big {r.status_code}, mv-small on {moved['device']}, request {status}")
    _clear(http)
    return {"from": here, "to": moved["device"], "launch_seconds": launched, "request_status": status}
