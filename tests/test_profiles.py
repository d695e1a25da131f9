"""Measured memory profiles: the pure rules (key, freshness, correction, which figure places a launch)
on values, then a real server (`--profile all`, so CPU runners are profiled here too) with a real
embedding model: the profile is stored after a launch, a relaunch is placed on it, a stale one is not
used."""

from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import EMBED_MODEL, ShoalServer, wait_until_ready
from shoal import devices
from shoal.services import profiles
from shoal.services.ledger import Reservation
from shoal.services.plan import LaunchPlan
from shoal.state import StateStore, StoredProfile

VERSIONS = {"torch": "2.13.0", "transformers": "5.0"}
MiB = 1024**2


def stored(engine: str = "transformers", device: str = "H200", estimate: int = 1000, peak: int = 700,
           versions: dict[str, str] | None = None, key: str = "k") -> StoredProfile:  # fmt: skip
    return StoredProfile(key, "m", engine, device, {}, versions or VERSIONS, estimate, peak,
                         profiles.reservation_from_peak(peak, 0.05), 0.05, 0.0)  # fmt: skip


def plan(
    per_device: int = 1000, kind: str = "gpu", declared: int | None = None, fake: bool = False
) -> LaunchPlan:
    breakdown = {"per_device": declared or per_device, "formula_per_device": per_device, "declared": declared}
    return LaunchPlan(kind, 1, None, declared or per_device, breakdown, 0, fake)  # type: ignore[arg-type]


# ---- pure rules ---------------------------------------------------------------------------------


def test_correction_is_the_bounded_median_of_fresh_profiles_of_the_same_engine_and_device() -> None:
    seen = [stored(peak=600), stored(peak=700), stored(peak=900),
            stored(engine="vllm", peak=100),  # another engine
            stored(device="cpu", peak=100),  # another device model
            stored(peak=100, versions={"torch": "1.0"})]  # stale  # fmt: skip
    assert profiles.correction(seen, "transformers", "H200", VERSIONS) == pytest.approx(0.7)
    assert profiles.correction(seen, "llama.cpp", "H200", VERSIONS) is None
    assert profiles.correction([stored(peak=100)], "transformers", "H200", VERSIONS) == 0.5  # bounded
    assert profiles.correction([stored(peak=5000)], "transformers", "H200", VERSIONS) == 1.5


def test_a_fresh_profile_places_the_launch_a_stale_one_does_not() -> None:
    profile = stored(peak=700)
    placed = profiles.apply(plan(1000), profile, VERSIONS, None, 0.05)
    assert placed.per_device == profile.reserved == math.ceil(700 * 1.05)
    assert placed.breakdown["memory_source"] == "profile"
    assert placed.breakdown["formula_per_device"] == 1000 and not placed.breakdown["profile"]["stale"]
    stale = profiles.apply(plan(1000), profile, {"torch": "2.14.0"}, None, 0.05)
    assert stale.per_device == 1000 and stale.breakdown["memory_source"] == "formula"
    assert stale.breakdown["profile"]["stale"]


def test_a_first_launch_uses_the_formula_corrected_and_a_declared_size_wins() -> None:
    corrected = profiles.apply(plan(1000), None, VERSIONS, 0.7, 0.05)
    assert corrected.per_device == math.ceil(1000 * 0.7 * 1.05)
    assert corrected.breakdown["memory_source"] == "corrected" and corrected.breakdown["correction"] == 0.7
    declared = profiles.apply(plan(1000, declared=5000), stored(), VERSIONS, 0.7, 0.05)
    assert declared.per_device == 5000 and declared.breakdown["memory_source"] == "declared"
    assert profiles.apply(plan(1000), None, VERSIONS, None, 0.05).per_device == 1000


def test_which_launches_run_a_profile() -> None:
    gpu, cpu, fake = plan(), plan(kind="cpu"), plan(fake=True)
    assert profiles.wants_profile_run("gpu", gpu)
    assert not profiles.wants_profile_run("gpu", cpu) and not profiles.wants_profile_run("gpu", fake)
    assert profiles.wants_profile_run("all", cpu) and profiles.wants_profile_run("all", fake)
    assert not profiles.wants_profile_run("off", gpu)
    on_profile = profiles.apply(gpu, stored(), VERSIONS, None, 0.05)
    assert not profiles.wants_profile_run("all", on_profile)  # placed on a fresh profile: not again


def test_the_key_changes_with_memory_settings_only() -> None:
    model = {"model_name": "m", "model_format": "gguf"}
    breakdown = {"context_length": 4096, "parallel": 4, "dtype": "q4"}
    base = profiles.memory_settings(model, "llama.cpp", 1, breakdown, {"n_ctx": 4096})
    threads = profiles.memory_settings(model, "llama.cpp", 1, breakdown, {"n_ctx": 4096, "n_threads": 2})
    longer = profiles.memory_settings(model, "llama.cpp", 1, {**breakdown, "context_length": 8192}, {})
    assert profiles.profile_key(base, "H200") == profiles.profile_key(threads, "H200")
    assert profiles.profile_key(base, "H200") != profiles.profile_key(longer, "H200")
    assert profiles.profile_key(base, "H200") != profiles.profile_key(base, "A100")
    named = profiles.memory_settings(model, "llama.cpp", 1, breakdown, {})  # as `shoal estimate -c` says it
    assert profiles.profile_key(base, "H200") == profiles.profile_key(named, "H200")


def test_a_profiled_reservation_replaces_the_estimate_until_use_goes_past_it() -> None:
    r = Reservation(("gpu:0",), estimate=1000, breakdown={})
    r.profile = 700
    assert r.reserved == 700 and not r.over
    assert r.record(800) and r.reserved == 800 and r.over


def test_the_book_learns_from_a_stored_profile(tmp_path: Path) -> None:
    """ProfileBook over a real store: a second model of the same engine gets the first one's ratio."""
    store = StateStore(tmp_path / "shoal.db")
    book = profiles.ProfileBook(store, "all", 0.05)
    cpu = [devices.cpu_device()]
    first = book.place(plan(1000, kind="cpu"), {"model_name": "a"}, "sentence_transformers", {}, cpu)
    assert first.breakdown["memory_source"] == "formula"
    book.record(first, "sentence_transformers", "cpu", 800)
    other = book.place(plan(2000, kind="cpu"), {"model_name": "b"}, "sentence_transformers", {}, cpu)
    assert other.breakdown["memory_source"] == "corrected"
    assert other.per_device == math.ceil(2000 * 0.8 * 1.05)
    again = book.place(plan(1000, kind="cpu"), {"model_name": "a"}, "sentence_transformers", {}, cpu)
    assert again.breakdown["memory_source"] == "profile" and again.per_device == math.ceil(800 * 1.05)


def test_a_cpu_peak_is_the_process_trees_rss_high_water_mark() -> None:
    snapshot = devices.read("")
    peak = snapshot.peak(snapshot.devices[0], os.getpid())
    rss = devices.rss_bytes(os.getpid())
    assert peak is not None and rss is not None and peak >= rss
    assert os.getpid() in devices.process_tree(os.getppid())


# ---- a real server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def profiling(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShoalServer]:
    root = tmp_path_factory.mktemp("profiles")
    srv = ShoalServer(root / "data", root / "server.log", extra_args=["--profile", "all"])
    srv.start()
    yield srv
    srv.stop()


def rows(server: ShoalServer) -> list[dict]:
    with sqlite3.connect(server.data_dir / "shoal.db") as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM profiles")]


def hwm(pid: int) -> int:
    return sum(devices.rss_peak_bytes(p) or 0 for p in devices.process_tree(pid))


def estimate(server: ShoalServer) -> dict:
    r = server.http.post("/v1/models/estimate", json={"model_name": EMBED_MODEL, "n_gpu": 0})
    assert r.status_code == 200, r.text
    return r.json()["estimate"]


def test_profiles_on_a_real_server(profiling: ShoalServer) -> None:
    """One launch is profiled, stored and shown; the relaunch is placed on the profile; a stale
    profile is ignored. (One test: the three steps build on each other's state.)"""
    r = profiling.http.post("/v1/models", json={"model_name": EMBED_MODEL, "model_uid": "p", "n_gpu": 0})
    assert r.status_code == 200, r.text
    replica = wait_until_ready(profiling, "p")["replicas"][0]
    [row] = rows(profiling)
    assert (row["engine"], row["device_model"], row["model"]) == ("sentence_transformers", "cpu", EMBED_MODEL)
    assert row["reserved"] == math.ceil(row["peak"] * 1.05) == replica["profile_bytes"]
    assert 0 < row["peak"] <= hwm(replica["pid"])  # the runner's RSS high-water mark, read after its run
    assert json.loads(row["versions"])["sentence-transformers"] != "absent"
    assert replica["reserved_bytes"] >= replica["profile_bytes"]
    assert row["estimate"] == replica["estimate_bytes"]  # placed by the formula the first time
    memory = {
        line.split('kind="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in profiling.http.get("/metrics").text.splitlines()
        if line.startswith("shoal_replica_memory_bytes{") and 'model="p"' in line
    }
    assert memory["profile"] == row["reserved"] and memory["formula"] == row["estimate"]
    assert memory["estimate"] == row["estimate"]
    cli = subprocess.run([sys.executable, "-m", "shoal.cli", "gpus", "--endpoint", profiling.url],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert "profile" in cli.stdout and "estimate" in cli.stdout

    # The relaunch is placed on the stored profile (and runs no second profile run).
    assert profiling.http.delete("/v1/models/p").status_code == 200
    est = estimate(profiling)
    assert est["memory_source"] == "profile" and est["per_device"] == row["reserved"]
    assert est["formula_per_device"] == row["estimate"]
    r = profiling.http.post("/v1/models", json={"model_name": EMBED_MODEL, "model_uid": "p", "n_gpu": 0})
    again = wait_until_ready(profiling, "p")["replicas"][0]
    assert again["estimate_bytes"] == row["reserved"] and again["profile_bytes"] is None
    assert len(rows(profiling)) == 1
    command = [sys.executable, "-m", "shoal.cli", "estimate", EMBED_MODEL, "--n-gpu", "0"]
    cli = subprocess.run([*command, "--endpoint", profiling.url], capture_output=True, text=True, check=True)
    assert "measured profile on cpu" in cli.stdout and "(used)" in cli.stdout

    # Library versions changed since: the profile is stale and the formula places it again.
    with sqlite3.connect(profiling.data_dir / "shoal.db") as db:
        db.execute("UPDATE profiles SET versions = ?", (json.dumps({"torch": "0.0.1"}),))
    est = estimate(profiling)
    assert est["memory_source"] == "formula" and est["profile"]["stale"]
    assert est["per_device"] == row["estimate"]
    assert profiling.http.delete("/v1/models/p").status_code == 200
    deadline = time.monotonic() + 5
    while profiling.http.get("/v1/models").json()["data"] and time.monotonic() < deadline:
        time.sleep(0.1)


def test_the_cli_shows_estimate_profile_and_measured_side_by_side() -> None:
    from shoal.cli import _memory_sides, mps_line, profile_line

    m = {"estimate_bytes": 2 * 1024**3, "profile_bytes": 1024**3, "reserved_bytes": 1024**3,
         "measured_bytes": 1024**3 // 2, "breakdown": {"memory_source": "corrected"}}  # fmt: skip
    assert _memory_sides(m) == " (estimate 2.00 corrected, profile 1.00, measured 0.50)"
    profile = {"device_model": "H200", "peak_bytes": 1024**3, "reserved_bytes": 1024**3, "stale": True}
    stale = {"profile": profile}
    assert "stale (library versions changed), not used" in profile_line(stale)
    assert "formula × 0.7" in profile_line({"profile": None, "correction": 0.7})
    off = {"enabled": False, "reason": "no NVIDIA GPU", "requested": True}
    assert mps_line([{"kind": "cpu", "mps": off}]) == "CUDA MPS: off (no NVIDIA GPU)"
    assert mps_line([{"kind": "cpu", "mps": {**off, "requested": False}}]) is None


def test_the_runner_moves_its_torch_cap_only_on_a_gpu_and_refuses_a_bad_fraction(tmp_path: Path) -> None:
    """The route the gateway calls after a profile: on the CPU there is no torch CUDA cap to move."""
    from starlette.testclient import TestClient

    from shoal.engines.base import Engine, EngineConfig
    from shoal.runners.app import build_runner_app

    engine = Engine(EngineConfig(model_path=tmp_path, model_uid="m", model_format="x", context_length=None))
    with TestClient(build_runner_app(engine, warm=False)) as client:
        assert client.post("/memory_fraction", json={"fraction": 0.5}).json() == {"applied": False}
        for bad in (0, 1.5, "half", True, None):
            r = client.post("/memory_fraction", json={"fraction": bad})
            assert r.status_code == 400 and "fraction" in r.json()["error"]["message"]
        assert client.post("/memory_fraction", json={"fraction": 0.5, "bytes": 2**30}).json() == {
            "applied": False
        }
        for bad in (0, -1, 1.5, "1GiB", True):
            r = client.post("/memory_fraction", json={"fraction": 0.5, "bytes": bad})
            assert r.status_code == 400 and "bytes must be a positive integer" in r.json()["error"]["message"]


GiB = 1024**3


@pytest.mark.parametrize(
    ("reserved", "visible_total", "fraction"),
    [
        (5 * GiB, 80 * GiB, 5 / 80),  # no MPS: CUDA reports the whole GPU, as NVML does
        (5 * GiB, 5 * GiB, 1.0),  # MPS reporting its pinned cap as the total: the cap is the reservation
        (5 * GiB, 5 * GiB - 2**20, 1.0),  # a cap rounded down to whole MiB: never above 1
        (80 * GiB, 80 * GiB, 1.0),
    ],
)
def test_the_torch_cap_is_the_reservation_of_the_total_cuda_reports(
    reserved: int, visible_total: int, fraction: float
) -> None:
    """The runner's share is of the total its own CUDA context sees: fraction × that total is the
    reservation (or all of it), never reserved² / NVML total as a share of NVML's total would give
    under a CUDA_MPS_PINNED_DEVICE_MEM_LIMIT that CUDA reports as the device's total."""
    from shoal.engines.base import cap_fraction

    assert cap_fraction(reserved, visible_total) == pytest.approx(fraction)
    assert cap_fraction(reserved, visible_total) * visible_total == pytest.approx(
        min(reserved, visible_total)
    )
    nvml_total = 80 * GiB
    old_share = reserved / nvml_total  # what a share of NVML's total caps at, under an MPS-sized total
    if visible_total < nvml_total:
        assert old_share * visible_total < 0.1 * reserved  # the bug: reserved² / total
        assert cap_fraction(reserved, visible_total) * visible_total >= visible_total


@pytest.mark.parametrize(("reserved", "visible_total"), [(0, GiB), (GiB, 0), (-1, GiB)])
def test_cap_fraction_refuses_what_is_not_a_size(reserved: int, visible_total: int) -> None:
    from shoal.engines.base import cap_fraction

    with pytest.raises(ValueError, match="must be positive"):
        cap_fraction(reserved, visible_total)


PROFILE_RUN = """
import asyncio, json, os, sys
from pathlib import Path
from shoal import devices
from shoal.engines.base import EngineConfig
from shoal.engines.transformers import TransformersEngine

options = {"max_batch_size": 8, "context_length": 512}
engine = TransformersEngine(EngineConfig(Path(sys.argv[1]), "tiny", "pytorch", None, "cpu", 1, options))
engine.load()
asyncio.run(engine.warm_up())
before = devices.rss_peak_bytes(os.getpid()) or 0
asyncio.run(engine.profile_run())
after = devices.rss_peak_bytes(os.getpid()) or 0
answer = asyncio.run(engine.chat({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}))
print(json.dumps({"before": before, "after": after, "shape": [engine.max_batch_size, engine.context],
                  "completion_tokens": answer["usage"]["completion_tokens"]}))
engine.close()
"""


def test_the_transformers_profile_run_prefills_a_full_batch_at_full_context(tmp_path: Path) -> None:
    """The prefill of a full batch (8 × 512 tokens) runs and raises the process's RSS high-water mark
    past what the one-token warm-up reached; the engine serves normally after it. In a process of
    its own, as a runner is: the test process's high-water mark is already past it."""
    from conftest import build_tiny_llama

    build_tiny_llama(tmp_path, 64, 512)
    done = subprocess.run(
        [sys.executable, "-c", PROFILE_RUN, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["shape"] == [8, 512]
    assert seen["after"] > seen["before"] > 0
    assert seen["completion_tokens"] >= 1
