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

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from gpu_check_goals import Goals

GiB = 1024**3
WORDS = (
    "the a model memory gpu shares placed reserve measure estimate evict idle request answer token cache "
    "layer head weight batch context user assistant system hello world server shoal fish sea wave"
).split()


def drive_peak(http: httpx.Client, uid: str, batch: int, context: int, embedding: bool) -> list[int]:
    """Requests at the launch's largest batch x context, all at once (what a profile run drives), so
    that NVML afterwards shows what the model needs at worst; returns their statuses. The check's
    tokenizer makes one token of each word, so `context - 32` words leave room for the template."""
    if os.environ.get("GPU_CHECK_DRY") == "1":
        context = min(context, 512)  # the rehearsal computes on two CPU cores: the path, not the size
    prompt = " ".join(WORDS[i % len(WORDS)] for i in range(max(1, context - 32)))
    if embedding:
        r = http.post("/v1/embeddings", json={"model": uid, "input": [prompt] * batch})
        return [r.status_code]
    body = {
        "model": uid,
        "max_tokens": 8,
        "temperature": 0,
        "messages": [{"role": "user", "content": prompt}],
    }
    with ThreadPoolExecutor(batch) as pool:
        return list(
            pool.map(lambda _: http.post("/v1/chat/completions", json=body).status_code, range(batch))
        )


def estimate_goal(
    http: httpx.Client, goals: Goals, nvml: Callable[[], dict[int, int]], uid: str, launch: dict[str, Any]
) -> dict[str, Any]:
    """Drive `uid` at its worst case, then check the estimate that placed it against NVML: a replica
    that ran a profile at this launch was placed by the formula (or the formula corrected by other
    models' profiles), a first launch; one without was placed on its stored profile."""
    embedding = "max_batch_size" not in launch
    batch = 32 if embedding else launch["max_batch_size"]
    statuses = drive_peak(http, uid, batch, 256 if embedding else launch["context_length"], embedding)
    if set(statuses) != {200}:
        goals.warn(f"{uid} worst case", f"requests at batch x context answered {statuses}")
    time.sleep(2.5)  # the supervisor samples NVML every 2 s
    described = http.get(f"/v1/models/{uid}").json()
    rep, est = described["replicas"][0], described["estimate"]
    first = rep["profile_bytes"] is not None  # profiled now: its placing figure came from the formula
    if first:
        source = "formula" if rep["estimate_bytes"] == est.get("formula_per_device") else "corrected"
    else:
        source = str(est.get("memory_source"))
    used = nvml().get(rep["pid"], 0)
    goals.estimate(uid, rep["estimate_bytes"], used, first, source)
    return {"uid": uid, "first": first, "source": source, "estimate": rep["estimate_bytes"], "nvml": used,
            "profile": rep["profile_bytes"], "worst_case_statuses": statuses}  # fmt: skip


def clear(http: httpx.Client) -> None:
    for model in http.get("/v1/models").json()["data"]:
        http.delete(f"/v1/models/{model['id']}")


def _replica(http: httpx.Client, uid: str) -> dict[str, Any]:
    return dict(http.get(f"/v1/models/{uid}").json()["replicas"][0])


def _device(http: httpx.Client, device: str) -> dict[str, Any]:
    return dict(next(d for d in http.get("/v1/cluster/devices").json() if d["id"] == device))


def ask(http: httpx.Client, uid: str) -> tuple[int, float]:
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
    http: httpx.Client,
    log: Callable[[str], None],
    nvml: Callable[[], dict[int, int]],
    failures: list[str],
    goals: Goals,
    check_env: Callable[[], object] = lambda: None,
) -> dict[str, Any]:
    clear(http)
    result: dict[str, Any] = {}
    launches: dict[str, dict[str, Any]] = {
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
        status, _ = ask(http, uid)
        log(f"park: launched {uid}, first request {status}")
        result.setdefault("estimates", []).append(estimate_goal(http, goals, nvml, uid, body))
    check_env()  # their runners' MPS variables, as the placement section's
    pids = {uid: _replica(http, uid)["pid"] for uid in launches}
    contexts = {uid: http.get(f"/v1/models/{uid}").json()["estimate"]["cuda_context"] for uid in launches}
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
        goals.parked(uid, parked.get(pid, 0), int(contexts[uid]))
    http.delete("/v1/models/park-filler")
    for uid, pid in pids.items():
        status, first = ask(http, uid)
        rep = _replica(http, uid)
        _, second = ask(http, uid)
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
        goals.wake(uid, wake, embedding=uid.endswith("emb"))
        if status != 200 or rep["pid"] != pid or rep["state"] != "ready":
            failures.append(
                f"park: wake {uid}: status {status}, pid {rep['pid']} (was {pid}), {rep['state']}"
            )
    clear(http)
    return result


def defragment(
    http: httpx.Client,
    log: Callable[[str], None],
    nvml: Callable[[], dict[int, int]],
    failures: list[str],
    goals: Goals,
) -> dict[str, Any]:
    gpus = [d for d in http.get("/v1/cluster/devices").json() if d["kind"] == "gpu"]
    if len(gpus) < 2:
        goals.skip("move", f"one GPU (a defragmenting move needs two; this machine has {len(gpus)})")
        return {"skipped": "one GPU"}
    clear(http)
    r = http.post("/v1/models", json={"model_name": "gc-emb", "model_uid": "mv-small", "keep_alive": 300})
    estimate = estimate_goal(http, goals, nvml, "mv-small", {"model_name": "gc-emb"})
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
    status, latency = ask(http, "mv-small")
    log(
        f"move: big launch {r.status_code} in {launched:.1f} s; mv-small {here} -> {moved['device']} "
        f"(pid {small['pid']} -> {moved['pid']}) ready {time.monotonic() - started:.1f} s after, "
        f"request {status} in {latency * 1000:.0f} ms"
    )
    goals.check(
        "move",
        r.status_code == 200 and moved["device"] == other["id"] and status == 200,
        f"big launch {r.status_code}; mv-small {here} -> {moved['device']} (goal {other['id']}), "
        f"request after the move {status}",
    )
    clear(http)
    return {"from": here, "to": moved["device"], "launch_seconds": launched, "request_status": status,
            "estimate": estimate}  # fmt: skip
