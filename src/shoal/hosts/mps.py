"""CUDA MPS (Multi-Process Service), optional (`shoal serve --mps`): a hard memory cap for every engine.

With MPS on, Shoal starts the control daemon (`nvidia-cuda-mps-control -d`) with its pipe and log
folders under the data dir, and every GPU runner joins it through the same two variables. Each
runner also gets CUDA_MPS_PINNED_DEVICE_MEM_LIMIT set to its reservation, so an allocation past it
fails in that runner whatever the engine (llama.cpp and vLLM included, which torch's per-process
fraction does not reach), and CUDA_MPS_ACTIVE_THREAD_PERCENTAGE from the launch's `gpu_compute`.

Where MPS cannot run (no daemon binary, fake GPUs, no GPU, MIG on, a compute mode that forbids it,
the daemon refusing to start), `MpsStatus.reason` says why and Shoal serves without it.
`mps_env` and `why_not` are pure; `MpsControl` runs the daemon.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("shoal.mps")

CONTROL = "nvidia-cuda-mps-control"
MiB = 1024**2
START_TIMEOUT = 15.0  # seconds for the daemon to start or to answer a command


@dataclass(frozen=True)
class MpsStatus:
    enabled: bool
    reason: str  # why it is off, or where it runs
    pipe_dir: str | None = None
    log_dir: str | None = None
    requested: bool = True  # asked for (--mps, SHOAL_MPS=1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


OFF = MpsStatus(False, "not asked for (shoal serve --mps, or SHOAL_MPS=1)", requested=False)


@dataclass(frozen=True)
class GpuFacts:
    """What decides whether MPS can run on one GPU (read from NVML)."""

    index: int
    mig: bool  # MIG mode enabled: MPS does not run on MIG devices here
    compute_mode: str  # "default", "exclusive_thread", "prohibited", "exclusive_process"


def mps_env(
    pipe_dir: str, log_dir: str, reservation_bytes: int, n_devices: int, gpu_compute: int | None = None
) -> dict[str, str]:
    """The environment a GPU runner joins MPS with: the daemon's folders, its memory cap on each of
    its devices (ordinals as the runner sees them, after CUDA_VISIBLE_DEVICES), and its share of the
    SMs. The cap is rounded down to whole MiB, so it never exceeds the reservation."""
    limit = f"{max(1, reservation_bytes // MiB)}M"
    env = {
        "CUDA_MPS_PIPE_DIRECTORY": pipe_dir,
        "CUDA_MPS_LOG_DIRECTORY": log_dir,
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": ",".join(f"{i}={limit}" for i in range(n_devices)),
    }
    if gpu_compute is not None:
        env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(gpu_compute)
    return env


def why_not(fake: bool, ray: bool, binary: str | None, gpus: list[GpuFacts]) -> str | None:
    """Why MPS cannot run here, or None when nothing stands in its way before the daemon is tried."""
    if fake:
        return "fake GPUs (SHOAL_FAKE_GPUS) are declared: MPS needs real NVIDIA GPUs"
    if ray:
        return "Ray cluster mode: MPS is run on one machine only (not built for Ray nodes)"
    if binary is None:
        return f"{CONTROL} is not on PATH (it comes with the NVIDIA driver)"
    if not gpus:
        return "no NVIDIA GPU (NVML lists none)"
    for gpu in gpus:
        if gpu.mig:
            return f"MIG is enabled on GPU {gpu.index}: Shoal runs MPS only on GPUs without MIG"
        if gpu.compute_mode in ("prohibited", "exclusive_thread"):
            return f"GPU {gpu.index} is in compute mode {gpu.compute_mode}, which refuses MPS clients"
    return None


_COMPUTE_MODES = {0: "default", 1: "exclusive_thread", 2: "prohibited", 3: "exclusive_process"}


def gpu_facts() -> list[GpuFacts]:
    """MIG and compute mode of each NVIDIA GPU; [] without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return []
    try:
        facts = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            try:
                mig = bool(pynvml.nvmlDeviceGetMigMode(handle)[0])
            except pynvml.NVMLError:  # a GPU without MIG support
                mig = False
            mode = _COMPUTE_MODES.get(int(pynvml.nvmlDeviceGetComputeMode(handle)), "default")
            facts.append(GpuFacts(i, mig, mode))
        return facts
    finally:
        pynvml.nvmlShutdown()


class MpsControl:
    """The MPS control daemon of this server: started at `start`, told to quit at `stop`."""

    def __init__(self, data_dir: Path, fake: bool, cluster: bool) -> None:
        self.pipe_dir = data_dir / "mps" / "pipe"
        self.log_dir = data_dir / "mps" / "log"
        self.fake, self.cluster = fake, cluster  # cluster: the Host runs runners on other machines
        self.status = OFF
        self._started = False

    def _env(self) -> dict[str, str]:
        import os

        return {
            **os.environ,
            "CUDA_MPS_PIPE_DIRECTORY": str(self.pipe_dir),
            "CUDA_MPS_LOG_DIRECTORY": str(self.log_dir),
        }

    def _control(self, *args: str, command: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [CONTROL, *args],
            input=command,
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            check=False,
        )

    def _log_tail(self) -> str:
        try:
            lines = (self.log_dir / "control.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1] if lines else ""

    def start(self) -> MpsStatus:
        """Start the daemon (blocking: call it off the event loop); the status says why not."""
        reason = why_not(self.fake, self.cluster, shutil.which(CONTROL), [] if self.fake else gpu_facts())
        if reason is None:
            reason = self._start_daemon()
        if reason is not None:
            log.warning("CUDA MPS is off, serving without it: %s", reason)
            self.status = MpsStatus(False, reason)
        else:
            log.info("CUDA MPS control daemon running (pipe %s, logs %s)", self.pipe_dir, self.log_dir)
            self.status = MpsStatus(True, "running", str(self.pipe_dir), str(self.log_dir))
        return self.status

    def _start_daemon(self) -> str | None:
        self.pipe_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            started = self._control("-d")
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{CONTROL} -d failed: {exc}"
        said = (started.stderr or started.stdout).strip()
        if started.returncode != 0 and "already" not in said.lower():
            return f"{CONTROL} -d exited {started.returncode}: {said or self._log_tail() or 'no message'}"
        self._started = True
        try:  # a daemon that started but cannot serve (not permitted, no GPU access) says so here
            answer = self._control(command="get_server_list\n")
        except (OSError, subprocess.TimeoutExpired) as exc:
            self.stop()
            return f"the MPS daemon does not answer: {exc}"
        if answer.returncode != 0:
            self.stop()
            message = (answer.stderr or answer.stdout).strip() or self._log_tail()
            return f"the MPS daemon refused a command: {message or 'no message'}"
        return None

    def env(self, reservation_bytes: int, n_devices: int, gpu_compute: int | None) -> dict[str, str]:
        """A GPU runner's MPS variables; {} while MPS is off."""
        if not self.status.enabled:
            return {}
        return mps_env(str(self.pipe_dir), str(self.log_dir), reservation_bytes, n_devices, gpu_compute)

    def stop(self) -> None:
        """Tell the daemon to quit (its MPS servers end once their clients have)."""
        if not self._started:
            return
        self._started = False
        try:
            self._control(command="quit\n")
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("could not stop the MPS daemon: %s", exc)
        self.status = MpsStatus(False, "stopped")
