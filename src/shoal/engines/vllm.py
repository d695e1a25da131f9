"""vLLM for Hugging Face checkpoints, through vLLM's own OpenAI server run as a child of the runner.

The runner starts `python -m vllm.entrypoints.openai.api_server` on a free loopback port and relays the
OpenAI routes to it; vLLM does the batching, the chat template, streaming and cancellation (it aborts a
request when its connection closes, which is what closing a stream here does).

GPU memory (see DESIGN.md): the scheduler's reservation arrives as the `memory_fraction` option,
reserved / device total, which is what vLLM's --gpu-memory-utilization means: a share of the whole GPU
for this one instance, weights, activations and KV cache together. vLLM takes that share of the total
its own CUDA context reports; under CUDA MPS with CUDA_MPS_PINNED_DEVICE_MEM_LIMIT that total may be the
cap rather than the GPU's, so there the runner asks CUDA once, in a short child process with the same
environment, and passes reserved / that total instead, at most the free share vLLM checks at start
(mps_utilization; not run on a GPU yet: vLLM was not on the lent GPU machines). vLLM measures free
memory while it starts and fails when another instance starts at the same moment, so starts are
serialised across every runner on the machine with an exclusive flock (`start_lock`), held from the
spawn until vLLM's /health answers.

The child runs in its own process group (vLLM forks an engine-core process, and workers under tensor
parallelism, and those hold the GPU memory) and gets PR_SET_PDEATHSIG=SIGKILL, so it dies with the
runner; a small watcher process kills the rest of the group when the runner dies, and close() ends the
whole group. If vLLM dies while the runner serves, the runner exits too, so the supervisor sees a
crashed replica and restarts it instead of routing requests to a dead backend.

Tool calling: with the launch option `tool_call_parser` (a vLLM parser name: hermes, llama3_json,
mistral, pythonic, ...) vLLM is started with --enable-auto-tool-choice and parses tool calls itself, and
the engine says so (`native_tools`), so Shoal's tool layer passes tools through. `chat_template` (the
template's text) is written to a file the engine owns and passed as --chat-template, because vLLM
decodes backslash escapes in a template given inline.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson

from shoal.engines.base import ESTIMATE_DEFAULTS, FOREIGN_IDS, Engine, cap_fraction
from shoal.engines.options import ENGINE_OPTIONS
from shoal.errors import InvalidRequest, ShoalError

# The gateway's estimate falls back to the transformers defaults for an engine without its own entry;
# the command uses the same numbers so that what was reserved is what vLLM is told to fit.
_DEFAULTS = ESTIMATE_DEFAULTS.get("vllm", ESTIMATE_DEFAULTS["transformers"])
DEFAULT_CONTEXT: int = int(_DEFAULTS["context"])  # --max-model-len, capped by the model's own
DEFAULT_MAX_NUM_SEQS: int = int(_DEFAULTS["parallel"])
DEFAULT_START_TIMEOUT = 900.0  # seconds for vLLM to answer /health (compiling and CUDA graphs take minutes)
START_LOCK = Path(tempfile.gettempdir()) / "shoal-vllm-start.lock"
OPTIONS = ENGINE_OPTIONS["vllm"]
DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
_PR_SET_PDEATHSIG = 1
_TERM_GRACE = 3.0  # seconds between SIGTERM and SIGKILL in close(); the gateway SIGKILLs a runner after 5
_LOG_TAIL_LINES = 20
# Sleep mode, for park and wake: vLLM serves /sleep and /wake_up only in its server's dev mode (they
# answer on loopback only, as the whole server does here). Set for vLLM's process, not the runner's.
SLEEP_ARGS = ("--enable-sleep-mode",)
SLEEP_ENV = {"VLLM_SERVER_DEV_MODE": "1"}
_PARSER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


# ---- the command ---------------------------------------------------------------------------------
def _positive_int(options: dict[str, Any], name: str, default: int) -> int:
    value = options.get(name, default)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, not {value!r}")
    return value


def _flag(options: dict[str, Any], name: str) -> bool:
    value = options.get(name, False)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise ValueError(f"{name} must be true or false, not {value!r}")


def _positive_float(options: dict[str, Any], name: str, default: float) -> float:
    value = options.get(name, default)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, not {value!r}") from None
    if isinstance(value, bool) or not number > 0 or number == float("inf"):
        raise ValueError(f"{name} must be a positive number, not {value!r}")
    return number


def memory_utilization(options: dict[str, Any]) -> str:
    """--gpu-memory-utilization from the scheduler's `memory_fraction`: required, 0 < f <= 1."""
    if options.get("memory_fraction") is None:
        raise ValueError(
            "memory_fraction is required: the scheduler sets it to the replica's reservation / the GPU's "
            "total memory, which vLLM takes as --gpu-memory-utilization"
        )
    value = options["memory_fraction"]
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"memory_fraction must be a number in (0, 1], not {value!r}") from None
    if isinstance(value, bool) or not 0 < fraction <= 1:
        raise ValueError(f"memory_fraction must be in (0, 1], not {value!r}")
    text = f"{fraction:.4f}"
    if float(text) == 0:
        raise ValueError(f"memory_fraction {value!r} is too small for vLLM (below 0.0001 of the GPU)")
    return text


def cuda_memory_seen(timeout: float = 120.0) -> tuple[int, int] | None:
    """(free, total) GPU memory as CUDA reports them to a process with this environment (MPS client
    variables included), read in a child so that the runner itself holds no CUDA context; None if it
    fails."""
    probe = "import torch; print(*torch.cuda.mem_get_info())"
    try:
        done = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            return None
        free, total = (int(v) for v in done.stdout.strip().splitlines()[-1].split())
        return free, total
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return None


def mps_utilization(reserved: int, free: int, total: int) -> float:
    """--gpu-memory-utilization under an MPS cap: the reservation's share of the total CUDA reports,
    but no more than the free share. vLLM refuses to start when utilization x total exceeds the free
    memory it finds, and where the total is the cap itself (the reservation) the reservation's share
    is 1.0 while the CUDA context has already taken some of it."""
    return min(cap_fraction(reserved, total), free / total)


def vllm_command(model_path: str | Path, served_name: str, port: int, options: dict[str, Any]) -> list[str]:
    """The argv that starts vLLM's OpenAI server for one replica. Raises ValueError on a bad option."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(
            f"unknown option(s) for engine vllm: {', '.join(unknown)}; known: {', '.join(OPTIONS)}"
        )
    dtype = str(options.get("dtype", "auto")).lower()
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {options['dtype']!r}")
    argv = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_path),
        "--served-model-name",
        served_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--gpu-memory-utilization",
        memory_utilization(options),
        "--max-model-len",
        str(_positive_int(options, "context_length", DEFAULT_CONTEXT)),
        "--max-num-seqs",
        str(_positive_int(options, "max_num_seqs", DEFAULT_MAX_NUM_SEQS)),
        "--dtype",
        dtype,
        "--tensor-parallel-size",
        str(_positive_int(options, "tensor_parallel_size", 1)),
    ]
    if options.get("quantization") is not None:
        quantization = options["quantization"]
        if not isinstance(quantization, str) or not quantization.strip() or quantization.startswith("-"):
            raise ValueError(
                f"quantization must be a vLLM method name such as awq or fp8, not {quantization!r}"
            )
        argv += ["--quantization", quantization.strip()]
    if _flag(options, "enforce_eager"):
        argv.append("--enforce-eager")
    if _flag(options, "trust_remote_code"):
        argv.append("--trust-remote-code")
    parser = options.get("tool_call_parser")
    if parser is not None:
        if not isinstance(parser, str) or not _PARSER_NAME.match(parser):
            raise ValueError(
                f"tool_call_parser must be a vLLM parser name such as hermes or llama3_json, not {parser!r}"
            )
        argv += ["--enable-auto-tool-choice", "--tool-call-parser", parser]
    template = options.get("chat_template")
    if template is not None:
        if not isinstance(template, str) or not template.strip():
            raise ValueError("chat_template must be a Jinja chat template (its text), not empty")
        argv += ["--chat-template", template]
    _positive_float(options, "start_timeout", DEFAULT_START_TIMEOUT)  # the runner's, not vLLM's: checked here
    return argv


# ---- starting and stopping -----------------------------------------------------------------------
@contextlib.contextmanager
def start_lock(
    path: str | Path = START_LOCK, timeout: float | None = None, waiting: str = ""
) -> Iterator[None]:
    """Hold an exclusive flock on `path` (one vLLM start at a time on this machine).

    Waits up to `timeout` seconds (None: for ever) and raises TimeoutError after. The kernel drops
    the lock when the holder's process dies, however it dies, so a crashed start never blocks the next.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)  # flock needs no write access
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"another vLLM start held {path} for more than {timeout:.0f} s"
                    ) from None
                if waiting and not told:
                    print(f"{waiting}: waiting for another vLLM start to finish ({path})", file=sys.stderr)
                    told = True
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _visible_gpus() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    return len([d for d in visible.split(",") if d.strip()]) if visible else 1


def _child_setup(parent: int) -> Callable[[], None]:
    def setup() -> None:  # in the child, between fork and exec
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        # Sent when the *thread* that forked exits: load() runs on the runner's main thread, which
        # lives as long as the runner does.
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the runner died before prctl took effect
            os._exit(1)

    return setup


# A small watcher beside vLLM: PR_SET_PDEATHSIG reaches only the process it was set on, and vLLM's
# engine-core process (which holds the GPU memory) would outlive a SIGKILLed runner. The watcher gets
# SIGTERM when the runner dies, however it dies, kills vLLM's whole process group and removes its log
# file; it leaves by itself once the group is gone. SIGTERM is blocked from the fork until its handler
# is in place.
_GUARD = """
import os, signal, sys, time
group, runner, log = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def end(*_):
    try:
        os.killpg(group, signal.SIGKILL)
    except OSError:
        pass
    if os.getppid() != runner:  # the runner is gone: nobody else removes vLLM's log file
        try:
            os.unlink(log)
        except OSError:
            pass
    os._exit(0)
signal.signal(signal.SIGTERM, end)
signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])
if os.getppid() != runner:
    end()
while True:
    time.sleep(2)
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        os._exit(0)
"""


def _guard_setup() -> None:  # in the watcher, between fork and exec (the mask survives exec)
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class _LogFollower(threading.Thread):
    """vLLM writes to a file (a pipe that nobody drains blocks the writer); this copies it into the
    runner's own log as it grows, and keeps the file for the tail that a failure reports."""

    def __init__(self, path: Path) -> None:
        super().__init__(name="vllm-log", daemon=True)
        self.path = path
        self._stop_event = threading.Event()

    def run(self) -> None:
        sink = getattr(sys.stderr, "buffer", None)
        with open(self.path, "rb") as log:
            while True:
                data = log.read(1 << 16)
                if not data:
                    if self._stop_event.is_set():  # stopped and drained
                        return
                    self._stop_event.wait(0.5)
                    continue
                try:
                    if sink is not None:
                        sink.write(data)
                    else:
                        sys.stderr.write(data.decode(errors="replace"))
                    sys.stderr.flush()
                except (OSError, ValueError):  # the runner's stderr is closed: keep the file only
                    pass

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=2)

    def tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        try:
            with open(self.path, "rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - (1 << 16)))
                text = log.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join([ln for ln in text.splitlines() if ln.strip()][-lines:])


class _PortTaken(Exception):
    pass


# ---- relaying ------------------------------------------------------------------------------------
def _error_message(content: bytes) -> str:
    """vLLM's error bodies: {"error": {"message"}} (newer), {"message"} (older), {"detail"} (FastAPI)."""
    try:
        data = orjson.loads(content)
    except orjson.JSONDecodeError:
        return content.decode(errors="replace").strip() or "no message"
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        for key in ("message", "detail", "error"):
            if data.get(key):
                return str(data[key])
    return str(data)


def _raise_for(status: int, content: bytes) -> None:
    if status < 400:
        return
    message = _error_message(content)
    if status < 500:
        raise InvalidRequest(message)
    raise ShoalError(f"vLLM: {message}")


def _raise_in_band(chunk: dict[str, Any]) -> None:
    """vLLM reports an error after the headers as an event of its own: `{"error": {...}}` (newer) or
    `{"object": "error", "message", "code"}` (older)."""
    if "choices" in chunk:
        return
    if isinstance(chunk.get("error"), dict):
        error = chunk["error"]
    elif chunk.get("object") == "error":
        error = chunk
    elif chunk.get("error") is not None:
        error = {"message": chunk["error"]}
    else:
        return
    message = str(error.get("message") or error)
    code = error.get("code")
    if isinstance(code, int) and 400 <= code < 500:
        raise InvalidRequest(message)
    raise ShoalError(f"vLLM: {message}")


def parse_metrics(text: str) -> dict[str, float]:
    """vLLM's Prometheus text as {name: value} for its own (`vllm:`) series. Labels other than the
    model's name stay in the key, so histogram buckets and per-reason counters stay apart."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        if "{" in line:
            name, _, rest = line.partition("{")
            labels, _, value_part = rest.rpartition("}")
            kept = [
                part for part in labels.split(",") if part and not part.startswith(("model_name=", "engine="))
            ]
            key = name + ("{" + ",".join(kept) + "}" if kept else "")
        else:
            key, _, value_part = line.partition(" ")
        fields = value_part.split()
        if not fields:
            continue
        try:
            values[key.removeprefix("vllm:")] = float(fields[0])
        except ValueError:
            continue
    return values


def embedding_body(body: dict[str, Any]) -> dict[str, Any]:
    """The embeddings request vLLM is sent. Token ids are refused: vLLM embeds whatever ids it gets,
    and those LangChain sends at its defaults are another tokenizer's, so they would embed as other
    words. TEI's `truncate: true` becomes vLLM's `truncate_prompt_tokens: -1` (cut at the model's own
    length); without it vLLM refuses an input past that length."""
    raw = body.get("input")
    if isinstance(raw, list) and raw and not all(isinstance(x, str) for x in raw):
        raise InvalidRequest(
            "token ids as an embedding input are not supported on vLLM, which cannot tell this model's "
            "own ids from another tokenizer's: send the text. " + FOREIGN_IDS
        )
    out = {k: v for k, v in body.items() if k != "truncate"}
    if body.get("truncate") is True:
        out["truncate_prompt_tokens"] = -1
    return out


class VllmEngine(Engine):
    name = "vllm"
    can_park = True  # sleep mode level 1 (written against vLLM's documented API; not run here without a GPU)

    def load(self) -> None:
        opts = self.pop_options()
        if self.config.device != "cuda":
            raise RuntimeError(
                f"vLLM needs an NVIDIA GPU, and model {self.config.model_uid!r} was placed on "
                f"{self.config.device!r}: launch it on a GPU, or use the transformers or llama.cpp engine"
            )
        if importlib.util.find_spec("vllm") is None:
            raise RuntimeError(
                f"vLLM is not installed in the Python that runs Shoal ({sys.executable}): "
                "pip install 'shoal[vllm]'"
            )
        model_context = self.config.context_length
        opts.setdefault("context_length", min(DEFAULT_CONTEXT, model_context or DEFAULT_CONTEXT))
        opts.setdefault("tensor_parallel_size", _visible_gpus())
        timeout = _positive_float(opts, "start_timeout", DEFAULT_START_TIMEOUT)
        vllm_command(self.config.model_path, self.config.model_uid, 0, opts)  # refuse bad options first
        if self.config.memory_bytes and os.environ.get("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"):
            seen = cuda_memory_seen()
            if seen:  # else the share of NVML's total stands, which is right where CUDA agrees
                opts["memory_fraction"] = mps_utilization(self.config.memory_bytes, *seen)
        self.native_tools = opts.get("tool_call_parser") is not None

        self._closing = False
        self._template: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._guard: subprocess.Popen[bytes] | None = None
        fd, log_name = tempfile.mkstemp(prefix=f"shoal-vllm-{os.getpid()}-", suffix=".log")
        os.close(fd)
        self._log = _LogFollower(Path(log_name))
        self._log.start()
        try:
            if opts.get("chat_template") is not None:
                opts = {**opts, "chat_template": str(self._write_template(str(opts["chat_template"])))}
            with start_lock(START_LOCK, timeout=timeout, waiting=f"vllm {self.config.model_uid}"):
                try:
                    self._start(opts, timeout)
                except BaseException:
                    self.close()  # before the lock goes: the next start must not see this one's memory
                    raise
        except BaseException:
            self.close()
            raise
        self._client = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{self.port}",
            timeout=httpx.Timeout(None, connect=10),  # generations take as long as they take
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            trust_env=False,  # never send loopback traffic through a proxy from the environment
        )
        threading.Thread(target=self._watch, name="vllm-watch", daemon=True).start()

    def _write_template(self, text: str) -> Path:
        fd, name = tempfile.mkstemp(prefix=f"shoal-vllm-{os.getpid()}-", suffix=".jinja")
        self._template = Path(name)
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        return self._template

    def _start(self, opts: dict[str, Any], timeout: float) -> None:
        for attempt in range(3):  # the free port can be taken between choosing it and vLLM's bind
            self.port = _free_port()
            argv = vllm_command(self.config.model_path, self.config.model_uid, self.port, opts)
            self._spawn([*argv, *SLEEP_ARGS])
            try:
                self._wait_ready(timeout)
                return
            except _PortTaken:
                self._signal_group(signal.SIGKILL)  # whatever that try had started
                if attempt == 2:
                    raise RuntimeError(f"vLLM could not bind a loopback port: {self._log.tail()}") from None

    def _spawn(self, argv: list[str]) -> None:
        with open(self._log.path, "ab") as log:
            self._proc = subprocess.Popen(
                argv,
                env={**os.environ, **SLEEP_ENV},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: close() ends vLLM's children too
                preexec_fn=_child_setup(os.getpid()),
                close_fds=True,  # the start lock's descriptor above all: a child holding it blocks starts
            )
        self._end_guard()
        self._guard = subprocess.Popen(
            [sys.executable, "-S", "-c", _GUARD, str(self._proc.pid), str(os.getpid()), str(self._log.path)],
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # outside vLLM's group, so killing that group leaves it be
            preexec_fn=_guard_setup,
            close_fds=True,
        )

    def _end_guard(self) -> None:
        guard, self._guard = getattr(self, "_guard", None), None
        if guard is not None:
            guard.terminate()  # it kills vLLM's group (if anything is left of it) and exits
            with contextlib.suppress(subprocess.TimeoutExpired):
                guard.wait(timeout=5)

    def _wait_ready(self, timeout: float) -> None:
        """Until /health answers and /v1/models names this replica (not another server on the port)."""
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=5, trust_env=False) as http:
            while True:
                code = self._proc.poll()
                if code is not None:
                    tail = self._log.tail()
                    if "address already in use" in tail.lower():
                        raise _PortTaken()
                    raise RuntimeError(
                        f"vLLM exited with code {code} while loading {self.config.model_path}; "
                        f"its last lines:\n{tail}"
                    )
                try:
                    if http.get("/health").status_code == 200:
                        models = http.get("/v1/models").json().get("data", [])
                        if any(m.get("id") == self.config.model_uid for m in models):
                            return
                except (httpx.HTTPError, ValueError, AttributeError):
                    pass
                if time.monotonic() >= deadline:
                    raise RuntimeError(
                        f"vLLM did not become ready within {timeout:.0f} s (option start_timeout); "
                        f"its last lines:\n{self._log.tail()}"
                    )
                time.sleep(0.5)

    def _watch(self) -> None:
        """vLLM gone while serving: end the runner too, so the supervisor restarts the replica."""
        proc = self._proc
        assert proc is not None
        code = proc.wait()
        if self._closing:
            return
        self._signal_group(signal.SIGKILL)  # what is left of it (engine core, workers) holds GPU memory
        self._log.stop()
        print(f"vLLM error: its server exited with code {code}; the runner exits with it", file=sys.stderr)
        sys.stderr.flush()
        os._exit(3)

    def _signal_group(self, sig: int) -> None:
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, sig)  # start_new_session: the group's id is the child's pid

    def park(self) -> None:
        """Sleep level 1: vLLM copies the weights to host RAM and drops the KV cache."""
        self._control("/sleep", {"level": "1"})

    def wake(self) -> None:
        self._control("/wake_up", {})

    def _control(self, path: str, params: dict[str, str]) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=120, trust_env=False) as http:
            response = http.post(path, params=params)
        if response.status_code != 200:
            raise RuntimeError(f"vLLM {path} answered {response.status_code}: {response.text[:300]}")

    def close(self) -> None:
        self._closing = True
        proc = getattr(self, "_proc", None)
        if proc is not None:
            if proc.poll() is None:
                self._signal_group(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=_TERM_GRACE)
            self._signal_group(signal.SIGKILL)  # the server and anything it left behind
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            self._proc = None
        self._end_guard()
        log = getattr(self, "_log", None)
        if log is not None:
            log.stop()
            log.path.unlink(missing_ok=True)  # its content is in the runner's log by now
        template = getattr(self, "_template", None)
        if template is not None:
            template.unlink(missing_ok=True)

    # ---- requests --------------------------------------------------------------------------------
    def _body(self, body: dict[str, Any], stream: bool | None = None) -> dict[str, Any]:
        body = {**body, "model": self.config.model_uid}
        if stream is not None:
            body["stream"] = stream
        return body

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = await self._client.post(path, content=orjson.dumps(self._body(body)))
        except httpx.TransportError as exc:
            raise ShoalError(f"vLLM did not answer: {type(exc).__name__}: {exc}") from exc
        _raise_for(response.status_code, response.content)
        result = orjson.loads(response.content)
        if not isinstance(result, dict):
            raise ShoalError(f"vLLM answered {path} with {type(result).__name__}, not an object")
        return result

    async def _stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        request = self._client.build_request(
            "POST",
            path,
            content=orjson.dumps(self._body(body, stream=True)),
            headers={"content-type": "application/json", "accept": "text/event-stream"},
        )
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TransportError as exc:
            raise ShoalError(f"vLLM did not answer: {type(exc).__name__}: {exc}") from exc
        try:
            if response.status_code >= 400:
                _raise_for(response.status_code, await response.aread())
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments, event names
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                if not data:
                    continue
                chunk = orjson.loads(data)
                if isinstance(chunk, dict):
                    _raise_in_band(chunk)
                    yield chunk
        except httpx.TransportError as exc:
            raise ShoalError(f"vLLM broke off the stream: {type(exc).__name__}: {exc}") from exc
        finally:
            await response.aclose()  # the caller left (or the stream ended): vLLM aborts the request

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self._post("/v1/chat/completions", body)

    def chat_stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        return self._stream("/v1/chat/completions", body)

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self._post("/v1/completions", body)

    def complete_stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        return self._stream("/v1/completions", body)

    async def embed(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self._post("/v1/embeddings", embedding_body(body))

    def metrics(self) -> dict[str, float]:
        """vLLM's own Prometheus series (requests running and waiting, tokens, KV cache use), as numbers."""
        try:
            response = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=2, trust_env=False)
        except httpx.TransportError as exc:
            raise ShoalError(f"vLLM did not answer /metrics: {exc}") from exc
        _raise_for(response.status_code, response.content)
        return parse_metrics(response.text)
