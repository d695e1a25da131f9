"""A warm spare runner: `python -m shoal.runners.spare FAMILY READY_FD`.

Most of a cold launch is the runner importing its engine's libraries (torch and transformers: seconds;
the model itself often loads in a fraction of that). A spare is a runner that did those imports ahead
of time and waits on stdin for one launch, a JSON line {"config", "env", "log", "cpus"}; it then
becomes that runner in the same process, so the gateway's handle on it is the spare's own child
process (pid, exit code, SIGTERM/SIGKILL and PR_SET_PDEATHSIG work as for a cold runner).

At the handoff the spare writes its output to the runner's log, takes the launch's cores (every
thread, since the imports started some) and its CUDA_VISIBLE_DEVICES, then loads the model; the
engine sets torch's thread count at load, as in a cold runner. Nothing here initialises CUDA, and a
GPU launch is served warm only if the CUDA driver has still not started. A launch with environment
variables of its own (`envs`) is run cold, by exec in the same process: libraries read some variables
at import.

The gateway's side (the pool that starts, replaces and stops spares) is shoal.hosts.spares.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass

# Variables a warm runner may take at the handoff: read when CUDA initialises, not at import.
WARM_ENV = frozenset({"CUDA_VISIBLE_DEVICES"})


@dataclass(frozen=True)
class Family:
    engines: tuple[str, ...]  # engine names (shoal.engines.registry) one spare of this family serves
    imports: tuple[str, ...]  # libraries imported ahead, each only when installed


FAMILIES: dict[str, Family] = {
    "torch": Family(
        ("sentence_transformers", "transformers", "cross_encoder", "embedding_rerank"),
        ("torch", "transformers", "sentence_transformers", "transformers.models.auto.modeling_auto"),
    ),
    "llama.cpp": Family(("llama.cpp", "llm_rerank"), ("xllamacpp", "httpx")),
    "onnx": Family(
        ("faster_whisper", "piper", "hibari", "rapidocr"),
        ("onnxruntime", "faster_whisper", "piper", "hibari", "rapidocr_onnxruntime"),
    ),
}
# diffusers and vLLM always start cold: diffusers is rare and heavy to import; vLLM runs its own server.


def family_of(engine: str) -> str | None:
    return next((name for name, family in FAMILIES.items() if engine in family.engines), None)


def installed(family: str) -> bool:
    """Whether any engine of the family can run here (cheap: no import)."""
    from shoal.engines.registry import REQUIRES

    engines = FAMILIES[family].engines
    return any(importlib.util.find_spec(REQUIRES[engine][0]) is not None for engine in engines)


def warm_imports(family: str) -> None:
    """Import what a runner of this family imports before it loads a model."""
    from shoal.engines.registry import REQUIRES, load_class

    for module in FAMILIES[family].imports:
        if importlib.util.find_spec(module.split(".")[0]) is not None:
            importlib.import_module(module)
    for engine in FAMILIES[family].engines:
        if importlib.util.find_spec(REQUIRES[engine][0]) is not None:
            load_class(engine)
    importlib.import_module("shoal.runners.main")
    importlib.import_module("shoal.runners.app")
    importlib.import_module("uvicorn")


def cold_reason(env: dict[str, str]) -> str | None:
    """Why this launch cannot be served by the imports already done, or None."""
    own = sorted(k for k in env if k not in WARM_ENV and os.environ.get(k) != env[k])
    if own:
        return f"the launch sets its own environment ({', '.join(own)})"
    if env.get("CUDA_VISIBLE_DEVICES") and cuda_initialised():
        return "CUDA was initialised before the launch"  # its device list is fixed already
    return None


def cuda_initialised() -> bool:
    """Whether the CUDA driver has started in this process: cuInit opens /dev/nvidiactl (and reads
    CUDA_VISIBLE_DEVICES then), merely loading libcuda does not."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("/dev/nvidia"):
                return True
        except OSError:
            continue
    return False


def take_cores(cpus: set[int]) -> None:
    """Pin every thread, not only this one: the imports started threads that would keep the old set."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, OSError):
            pass  # a thread that ended meanwhile


def redirect_output(log: str) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)


def main(family: str, ready_fd: int) -> int:
    warm_imports(family)
    print(f"shoal spare {family}: ready (pid {os.getpid()})", flush=True)
    try:
        os.write(ready_fd, b"ready\n")  # the gateway starts the next family's spare now
    except BrokenPipeError:
        pass  # the gateway handed this spare a launch while it imported, and stopped listening
    os.close(ready_fd)
    line = sys.stdin.buffer.readline()
    if not line.strip():
        return 0  # the gateway closed the pool
    started = time.monotonic()
    launch = json.loads(line)
    env: dict[str, str] = launch["env"]
    redirect_output(launch["log"])
    if launch["cpus"]:
        take_cores(set(launch["cpus"]))
    reason = cold_reason(env)
    if reason is not None:
        print(f"shoal runner: starting cold: {reason}", flush=True)
        argv = [sys.executable, "-m", "shoal.runners.main", launch["config"]]
        os.execve(sys.executable, argv, {**os.environ, **env})
    os.environ.update(env)
    from shoal.runners.main import main as run_runner

    return run_runner(launch["config"], started=started, prewarmed=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
