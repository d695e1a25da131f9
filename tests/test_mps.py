"""CUDA MPS: the runner environment and the reasons it cannot run, as pure functions; the daemon
itself where MPS exists (skipped elsewhere, saying why); and `shoal serve --mps` on this machine,
which says why MPS is off and serves anyway."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import EMBED_MODEL, ShoalServer, wait_until_ready
from shoal.hosts import mps
from shoal.hosts.mps import GpuFacts, MpsControl, mps_env, why_not

MiB = 1024**2


def test_the_runner_joins_mps_capped_at_its_reservation() -> None:
    env = mps_env("/d/pipe", "/d/log", 12345 * MiB + 7, 1)
    assert env == {
        "CUDA_MPS_PIPE_DIRECTORY": "/d/pipe",
        "CUDA_MPS_LOG_DIRECTORY": "/d/log",
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=12345M",  # rounded down: never above the reservation
    }
    two = mps_env("/p", "/l", 2048 * MiB, 2, gpu_compute=30)
    assert two["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=2048M,1=2048M"
    assert two["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "30"
    assert mps_env("/p", "/l", 10, 1)["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=1M"


def test_why_mps_cannot_run() -> None:
    ok = [GpuFacts(0, False, "default"), GpuFacts(1, False, "exclusive_process")]
    assert why_not(False, False, "/usr/bin/x", ok) is None
    assert "fake GPUs" in (why_not(True, False, "/usr/bin/x", ok) or "")
    assert "Ray" in (why_not(False, True, "/usr/bin/x", ok) or "")
    assert "not on PATH" in (why_not(False, False, None, ok) or "")
    assert "no NVIDIA GPU" in (why_not(False, False, "/usr/bin/x", []) or "")
    assert "MIG" in (why_not(False, False, "/usr/bin/x", [GpuFacts(0, True, "default")]) or "")
    assert "prohibited" in (why_not(False, False, "/usr/bin/x", [GpuFacts(0, False, "prohibited")]) or "")


def test_off_without_a_reason_to_run_gives_no_env(tmp_path: Path) -> None:
    control = MpsControl(tmp_path, fake=True, cluster=False)
    status = control.start()
    assert not status.enabled and "fake GPUs" in status.reason
    assert control.env(10**9, 1, 50) == {}
    control.stop()  # nothing was started: nothing to stop


def _here() -> str | None:
    return why_not(False, False, shutil.which(mps.CONTROL), mps.gpu_facts())


@pytest.mark.skipif(_here() is not None, reason=f"CUDA MPS cannot run here: {_here()}")
def test_the_daemon_starts_and_stops_where_mps_exists(tmp_path: Path) -> None:
    control = MpsControl(tmp_path, fake=False, cluster=False)
    status = control.start()
    try:
        assert status.enabled, status.reason
        assert (tmp_path / "mps" / "pipe").is_dir()
        answer = subprocess.run(
            [mps.CONTROL], input="get_server_list\n", env=control._env(), capture_output=True, text=True
        )
        assert answer.returncode == 0, answer.stderr
    finally:
        control.stop()
    assert not control.status.enabled


@pytest.fixture(scope="module")
def mps_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShoalServer]:
    root = tmp_path_factory.mktemp("mps")
    srv = ShoalServer(root / "data", root / "server.log", extra_args=["--mps"])
    srv.start()
    yield srv
    srv.stop()


@pytest.mark.skipif(_here() is None, reason="MPS can run here: this checks a machine where it cannot")
def test_serve_mps_says_why_not_and_serves(mps_server: ShoalServer) -> None:
    devices = mps_server.http.get("/v1/cluster/devices").json()
    status = devices[0]["mps"]
    assert status["requested"] and not status["enabled"] and status["reason"] == _here()
    assert "CUDA MPS is off, serving without it: " + status["reason"] in mps_server.log_path.read_text()
    cli = subprocess.run([sys.executable, "-m", "shoal.cli", "gpus", "--endpoint", mps_server.url],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert "CUDA MPS: off" in cli.stdout
    r = mps_server.http.post("/v1/models", json={"model_name": EMBED_MODEL, "model_uid": "e", "n_gpu": 0})
    assert r.status_code == 200, r.text
    wait_until_ready(mps_server, "e")
    embedded = mps_server.http.post("/v1/embeddings", json={"model": "e", "input": "hi"})
    assert embedded.status_code == 200 and len(embedded.json()["data"][0]["embedding"]) == 384
    assert mps_server.http.delete("/v1/models/e").status_code == 200


@pytest.mark.parametrize("value", [0, 101, "50", True, 12.5, "lots"])
def test_gpu_compute_out_of_range_is_a_400(mps_server: ShoalServer, value: object) -> None:
    r = mps_server.http.post("/v1/models", json={"model_name": EMBED_MODEL, "gpu_compute": value})
    assert r.status_code == 400, r.text
    assert "gpu_compute" in r.json()["error"]["message"]


@pytest.mark.skipif(_here() is None, reason="MPS can run here: gpu_compute is then accepted")
def test_gpu_compute_without_mps_is_a_400_that_says_why(mps_server: ShoalServer) -> None:
    r = mps_server.http.post("/v1/models", json={"model_name": EMBED_MODEL, "gpu_compute": 50})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "gpu_compute needs CUDA MPS" in message and str(_here()) in message
