"""The vllm engine: the command it builds, its refusals, and the lock that serialises vLLM starts.

vLLM itself cannot be installed on this project's machines or CI (its wheels need CUDA and there is
no NVIDIA GPU), so the one test that runs the real vLLM server lifecycle is SKIPPED there: it runs
only where `vllm` is importable and torch sees a GPU. Nothing here stands in for vLLM: the tests that
run on every machine check the parts of the engine that do not need it (the argv, option checks, the
refusals on a CPU or without vLLM, the start lock between processes).
"""

from __future__ import annotations

import asyncio
import fcntl
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import build_tiny_llama
from shoal.engines import vllm as vllm_module
from shoal.engines.base import EngineConfig
from shoal.engines.vllm import (
    DEFAULT_CONTEXT,
    DEFAULT_MAX_NUM_SEQS,
    VllmEngine,
    embedding_body,
    memory_utilization,
    parse_metrics,
    start_lock,
    vllm_command,
)
from shoal.errors import InvalidRequest

HEAD = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]


def test_command_with_defaults() -> None:
    argv = vllm_command("/models/qwen", "qwen-1", 8123, {"memory_fraction": 0.25})
    assert argv == [
        *HEAD,
        "--model",
        "/models/qwen",
        "--served-model-name",
        "qwen-1",
        "--host",
        "127.0.0.1",
        "--port",
        "8123",
        "--gpu-memory-utilization",
        "0.2500",
        "--max-model-len",
        str(DEFAULT_CONTEXT),
        "--max-num-seqs",
        str(DEFAULT_MAX_NUM_SEQS),
        "--dtype",
        "auto",
        "--tensor-parallel-size",
        "1",
    ]


def test_command_with_every_option() -> None:
    options = {
        "memory_fraction": 0.123456,
        "context_length": 8192,
        "max_num_seqs": 32,
        "dtype": "bfloat16",
        "tensor_parallel_size": 2,
        "enforce_eager": True,
        "quantization": "awq",
        "trust_remote_code": "true",  # launch options may arrive as text (xinference-client, -o k=v)
        "start_timeout": 120,
        "tool_call_parser": "llama3_json",
        "chat_template": "/tmp/t.jinja",  # what load() passes: the file it wrote the text to
    }
    argv = vllm_command(Path("/m/llama"), "llama", 40001, options)
    assert argv == [
        *HEAD,
        "--model",
        "/m/llama",
        "--served-model-name",
        "llama",
        "--host",
        "127.0.0.1",
        "--port",
        "40001",
        "--gpu-memory-utilization",
        "0.1235",
        "--max-model-len",
        "8192",
        "--max-num-seqs",
        "32",
        "--dtype",
        "bfloat16",
        "--tensor-parallel-size",
        "2",
        "--quantization",
        "awq",
        "--enforce-eager",
        "--trust-remote-code",
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "llama3_json",
        "--chat-template",
        "/tmp/t.jinja",
    ]


def test_command_flags_off_and_text_numbers() -> None:
    argv = vllm_command(
        "/m",
        "m",
        1,
        {
            "memory_fraction": "0.5",
            "context_length": "2048",
            "enforce_eager": False,
            "trust_remote_code": "no",
            "dtype": "HALF",
        },
    )
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.5000"
    assert argv[argv.index("--max-model-len") + 1] == "2048"
    assert argv[argv.index("--dtype") + 1] == "half"
    assert "--enforce-eager" not in argv and "--trust-remote-code" not in argv
    assert "--quantization" not in argv
    assert "--enable-auto-tool-choice" not in argv and "--tool-call-parser" not in argv
    assert "--chat-template" not in argv


@pytest.mark.parametrize(
    ("fraction", "text"),
    [(1, "1.0000"), (1.0, "1.0000"), (0.9, "0.9000"), (0.33333333, "0.3333"), (0.00016, "0.0002")],
)
def test_fraction_formatting(fraction: float, text: str) -> None:
    assert memory_utilization({"memory_fraction": fraction}) == text


@pytest.mark.parametrize("fraction", [0, -0.1, 1.01, 2, "half", None, True, float("nan"), 0.00001])
def test_bad_fraction_refused(fraction: Any) -> None:
    with pytest.raises(ValueError, match="memory_fraction"):
        vllm_command("/m", "m", 1, {"memory_fraction": fraction})


def test_missing_fraction_refused() -> None:
    with pytest.raises(ValueError, match="memory_fraction is required"):
        vllm_command("/m", "m", 1, {"context_length": 4096})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"context_length": 0}, "context_length must be a positive integer"),
        ({"context_length": 4096.5}, "context_length must be a positive integer"),
        ({"max_num_seqs": -1}, "max_num_seqs must be a positive integer"),
        ({"max_num_seqs": True}, "max_num_seqs must be a positive integer"),
        ({"tensor_parallel_size": "two"}, "tensor_parallel_size must be a positive integer"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"enforce_eager": "maybe"}, "enforce_eager must be true or false"),
        ({"trust_remote_code": 2}, "trust_remote_code must be true or false"),
        ({"quantization": ""}, "quantization must be"),
        ({"quantization": "--enforce-eager"}, "quantization must be"),
        ({"start_timeout": 0}, "start_timeout must be a positive number"),
        ({"tool_call_parser": "--enforce-eager"}, "tool_call_parser must be a vLLM parser name"),
        ({"tool_call_parser": "hermes --trust-remote-code"}, "tool_call_parser must be"),
        ({"tool_call_parser": ""}, "tool_call_parser must be"),
        ({"tool_call_parser": 3}, "tool_call_parser must be"),
        ({"chat_template": " \n"}, "chat_template must be a Jinja chat template"),
        ({"gpu_memory_utilization": 0.9}, "unknown option.*gpu_memory_utilization"),
        ({"n_ctx": 2048, "tp": 2}, "unknown option.*n_ctx, tp"),
    ],
)
def test_bad_options_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        vllm_command("/m", "m", 1, {"memory_fraction": 0.5, **options})


def _engine(device: str, **options: Any) -> VllmEngine:
    return VllmEngine(EngineConfig(Path("/nonexistent/model"), "m1", "pytorch", 4096, device, None, options))


def test_load_refuses_unknown_options_first() -> None:
    with pytest.raises(ValueError, match="unknown option.*for engine vllm: n_gpu_layers"):
        _engine("cuda", memory_fraction=0.5, n_gpu_layers=10).load()


def test_load_refuses_the_cpu() -> None:
    with pytest.raises(RuntimeError, match="vLLM needs an NVIDIA GPU.*'cpu'"):
        _engine("cpu", memory_fraction=0.5).load()


def test_load_refuses_without_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:  # vLLM absent, as on this project's machines
        return None if name == "vllm" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(RuntimeError, match=r"vLLM is not installed.*pip install 'shoal\[vllm\]'"):
        _engine("cuda", memory_fraction=0.5).load()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_load_reports_the_servers_last_lines_when_it_exits(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The real command runs (`python -m vllm.entrypoints.openai.api_server ...`) and exits, as it does
    where the vllm package is missing though the cheap check passed: load() fails with its output,
    leaves no process, log file or lock behind."""
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:  # let load() past its check to the real spawn
        return real("json") if name == "vllm" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(vllm_module, "START_LOCK", tmp_path / "start.lock")
    monkeypatch.setattr(vllm_module.tempfile, "tempdir", str(tmp_path))
    engine = _engine("cuda", memory_fraction=0.5, start_timeout=60)
    with pytest.raises(
        RuntimeError, match=r"(?s)vLLM exited with code 1 while loading.*No module named 'vllm'"
    ):
        engine.load()
    assert engine._proc is None and engine._guard is None
    assert [p.name for p in tmp_path.iterdir()] == ["start.lock"]  # the log file is gone
    with start_lock(tmp_path / "start.lock", timeout=0.1):  # and the lock is free
        pass


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_load_passes_tool_options_and_removes_its_template_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """As above, with tool_call_parser and chat_template: vLLM is told to parse tool calls, gets the
    template as a file holding the text exactly (backslashes too), and the file is gone after."""
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return real("json") if name == "vllm" else real(name, *args)

    spawned: list[tuple[list[str], str]] = []
    real_command = vllm_module.vllm_command

    def command(*args: Any) -> list[str]:
        argv = real_command(*args)
        if "--chat-template" in argv and args[2]:  # the real start, not the check with port 0
            spawned.append((argv, Path(argv[argv.index("--chat-template") + 1]).read_text()))
        return argv

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(vllm_module, "vllm_command", command)
    monkeypatch.setattr(vllm_module, "START_LOCK", tmp_path / "start.lock")
    monkeypatch.setattr(vllm_module.tempfile, "tempdir", str(tmp_path))
    template = "{% for m in messages %}{{ m['content'] }}\\n{% endfor %}"
    engine = _engine(
        "cuda", memory_fraction=0.5, start_timeout=60, tool_call_parser="hermes", chat_template=template
    )
    assert not engine.native_tools
    with pytest.raises(RuntimeError, match="vLLM exited with code 1"):
        engine.load()
    assert engine.native_tools
    argv, text = spawned[0]
    assert argv[argv.index("--tool-call-parser") - 1 : argv.index("--tool-call-parser") + 2] == [
        "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
    ]  # fmt: skip
    assert text == template
    assert [p.name for p in tmp_path.iterdir()] == ["start.lock"]  # log and template removed


# A stand-in for vLLM's OpenAI server, run as the real command runs it (`python -m
# vllm.entrypoints.openai.api_server ...`, found through PYTHONPATH): it records its argv and its
# VLLM_SERVER_DEV_MODE, answers /health and /v1/models, and, as vLLM does, serves /sleep and
# /wake_up only in dev mode and only with --enable-sleep-mode.
STANDIN = """
import json, os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

argv = sys.argv[1:]
port, name = int(argv[argv.index("--port") + 1]), argv[argv.index("--served-model-name") + 1]
dev = os.environ.get("VLLM_SERVER_DEV_MODE") == "1"


def note(entry):
    with open(os.environ["VLLM_STANDIN_RECORD"], "a") as f:
        f.write(json.dumps(entry) + "\\n")


note({"argv": argv, "dev_mode": os.environ.get("VLLM_SERVER_DEV_MODE")})


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def send(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        path = urlsplit(self.path).path
        if path == "/health":
            self.send(200, {})
        elif path == "/v1/models":
            self.send(200, {"object": "list", "data": [{"id": name}]})
        else:
            self.send(404, {"detail": "Not Found"})

    def do_POST(self):
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if not dev or url.path not in ("/sleep", "/wake_up"):
            return self.send(404, {"detail": "Not Found"})
        if "--enable-sleep-mode" not in argv:
            return self.send(500, {"error": {"message": "sleep mode is not enabled"}})
        if url.path == "/sleep" and query.get("level") not in ("1", "2"):
            return self.send(400, {"error": {"message": "level must be 1 or 2"}})
        note({"post": url.path, "query": query})
        self.send(200, {})


ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


@pytest.fixture
def standin(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """STANDIN installed as `vllm` for load()'s check and for the child; returns its record file."""
    package = tmp_path / "standin" / "vllm" / "entrypoints" / "openai"
    package.mkdir(parents=True)
    for folder in (package, package.parent, package.parent.parent):
        (folder / "__init__.py").write_text("")
    (package / "api_server.py").write_text(STANDIN)
    record = tmp_path / "record.jsonl"
    monkeypatch.syspath_prepend(str(tmp_path / "standin"))  # load()'s check that vllm is installed
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(tmp_path / "standin"), os.environ.get("PYTHONPATH", "")])
    )
    monkeypatch.setenv("VLLM_STANDIN_RECORD", str(record))
    monkeypatch.delenv("VLLM_SERVER_DEV_MODE", raising=False)
    monkeypatch.setattr(vllm_module, "START_LOCK", tmp_path / "start.lock")
    return record


def test_park_and_wake_reach_vllms_sleep_routes(standin: Path) -> None:
    """The vLLM server is started with --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1 in its own
    environment (not the runner's); park() asks /sleep?level=1 and wake() /wake_up of the server the
    runner started, over loopback HTTP; a refusal there is an error that says what vLLM answered."""
    engine = _engine("cuda", memory_fraction=0.5, start_timeout=60)
    engine.load()
    try:
        assert "VLLM_SERVER_DEV_MODE" not in os.environ  # set for vLLM's process only
        started = json.loads(standin.read_text().splitlines()[0])
        assert started["argv"][-1] == "--enable-sleep-mode" and started["dev_mode"] == "1"
        assert started["argv"][started["argv"].index("--port") + 1] == str(engine.port)
        engine.park()
        engine.wake()
        posts = [json.loads(line) for line in standin.read_text().splitlines()[1:]]
        assert posts == [{"post": "/sleep", "query": {"level": "1"}}, {"post": "/wake_up", "query": {}}]
        with pytest.raises(RuntimeError, match="vLLM /sleep answered 400: .*level must be 1 or 2"):
            engine._control("/sleep", {"level": "3"})
    finally:
        engine.close()
    assert engine._proc is None


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="here CUDA can report its total: the probe would answer"
)
def test_under_an_mps_cap_a_total_cuda_cannot_report_leaves_the_share_as_given(
    monkeypatch: pytest.MonkeyPatch, standin: Path
) -> None:
    """Under CUDA_MPS_PINNED_DEVICE_MEM_LIMIT the runner asks CUDA, in a child, for the total vLLM
    will see, to take the reservation's share of it (cap_fraction); where that child cannot say
    (no GPU here), vLLM still starts, on the share of NVML's total it was given."""
    monkeypatch.setenv("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT", "0=1024M")
    options = {"memory_fraction": 0.25, "start_timeout": 60}
    config = EngineConfig(Path("/nonexistent/model"), "m1", "pytorch", 4096, "cuda", None, options, 2**30)
    engine = VllmEngine(config)
    engine.load()
    try:
        argv = json.loads(standin.read_text().splitlines()[0])["argv"]
        assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.2500"
    finally:
        engine.close()


def test_under_an_mps_cap_utilization_leaves_what_vllm_checks_free() -> None:
    """Where CUDA reports the cap (the reservation) as the total, the reservation's share is 1.0, and
    vLLM refuses to start unless utilization x total fits in the free memory it finds; where CUDA
    reports the whole GPU, the share of it stands."""
    from shoal.engines.vllm import mps_utilization

    gib = 2**30
    assert mps_utilization(4 * gib, int(3.5 * gib), 4 * gib) == 3.5 / 4
    assert mps_utilization(4 * gib, 70 * gib, 80 * gib) == 4 / 80


@pytest.mark.parametrize("ids", [[15339, 1917], [[101, 7592, 102]], [[1, 2], [3]]])
def test_embedding_token_ids_are_refused_with_the_langchain_fix(ids: Any) -> None:
    # vLLM embeds whatever ids it is sent; LangChain's defaults send OpenAI's tiktoken ids
    with pytest.raises(InvalidRequest, match="check_embedding_ctx_length=False"):
        embedding_body({"model": "m", "input": ids})


def test_embedding_text_passes_and_truncate_becomes_vllms_own_field() -> None:
    assert embedding_body({"model": "m", "input": ["a", "b"], "truncate": False}) == {
        "model": "m",
        "input": ["a", "b"],
    }
    # -1: cut at the model's own length (vLLM's truncate_prompt_tokens); usage then counts what it read
    assert embedding_body({"model": "m", "input": "a", "truncate": True}) == {
        "model": "m",
        "input": "a",
        "truncate_prompt_tokens": -1,
    }


def test_engine_is_named_vllm() -> None:
    assert VllmEngine.name == "vllm"


def test_start_lock_is_exclusive_within_a_process(tmp_path: Path) -> None:
    path = tmp_path / "start.lock"
    order: list[str] = []
    with start_lock(path):
        # flock belongs to an open file: a second open, from another thread, must wait
        with pytest.raises(TimeoutError, match="another vLLM start"):
            with start_lock(path, timeout=0.3):
                pass

        def second() -> None:
            with start_lock(path, timeout=10):
                order.append("second")

        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.5)
        order.append("first released")
    thread.join(10)
    assert order == ["first released", "second"]


def test_start_lock_is_exclusive_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "start.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from shoal.engines.vllm import start_lock\n"
            f"with start_lock({str(path)!r}):\n"
            "    print('held', flush=True); time.sleep(1.5)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        fd = os.open(path, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the other process holds it
        finally:
            os.close(fd)
        started = time.monotonic()
        with start_lock(path, timeout=30):
            waited = time.monotonic() - started
            assert holder.poll() is not None or waited > 0.5  # we got it only as the holder let go
    finally:
        holder.wait(10)
    assert waited > 0.5


def test_start_lock_is_freed_when_its_holder_is_killed(tmp_path: Path) -> None:
    path = tmp_path / "start.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from shoal.engines.vllm import start_lock\n"
            f"with start_lock({str(path)!r}):\n"
            "    print('held', flush=True); time.sleep(600)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    with pytest.raises(TimeoutError):
        with start_lock(path, timeout=0.2):
            pass
    holder.send_signal(signal.SIGKILL)  # a runner killed mid-start must not block the next start
    holder.wait(10)
    with start_lock(path, timeout=5):
        pass


def test_start_lock_default_path_is_shared() -> None:
    assert vllm_module.START_LOCK.name == "shoal-vllm-start.lock"
    assert vllm_module.START_LOCK.parent == Path(vllm_module.tempfile.gettempdir())


def test_parse_metrics() -> None:
    text = (
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{engine="0",model_name="m1"} 2.0\n'
        'vllm:num_requests_waiting{engine="0",model_name="m1"} 0.0\n'
        'vllm:generation_tokens_total{engine="0",model_name="m1"} 1234.0\n'
        'vllm:request_success_total{engine="0",finished_reason="length",model_name="m1"} 3.0\n'
        'vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="m1"} 1.0\n'
        "vllm:kv_cache_usage_perc 0.25\n"
        'python_gc_objects_collected_total{generation="0"} 99.0\n'
    )
    assert parse_metrics(text) == {
        "num_requests_running": 2.0,
        "num_requests_waiting": 0.0,
        "generation_tokens_total": 1234.0,
        'request_success_total{finished_reason="length"}': 3.0,
        'time_to_first_token_seconds_bucket{le="0.001"}': 1.0,
        "kv_cache_usage_perc": 0.25,
    }


# ---- the real thing: only where vLLM and an NVIDIA GPU exist (never on this project's CI) ----------
def _tiny_llama(folder: Path) -> Path:
    """A random-weight Llama (head size 64, which every vLLM attention backend takes) with MiniLM's
    tokenizer from the demo package; SHOAL_VLLM_TEST_MODEL names a real model folder instead."""
    if os.environ.get("SHOAL_VLLM_TEST_MODEL"):
        return Path(os.environ["SHOAL_VLLM_TEST_MODEL"])
    build_tiny_llama(folder, 256, 512)
    return folder


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None or not torch.cuda.is_available(),
    reason="needs vllm and an NVIDIA GPU",
)
def test_real_vllm_lifecycle(tmp_path: Path) -> None:
    folder = _tiny_llama(tmp_path)
    options = {"memory_fraction": 0.2, "max_num_seqs": 4, "enforce_eager": True, "start_timeout": 600}
    engine = VllmEngine(EngineConfig(folder, "tiny-vllm", "pytorch", 512, "cuda", None, options))
    engine.load()
    assert engine._proc is not None
    pgid = engine._proc.pid
    try:
        chat = {"model": "whatever", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}

        async def session() -> None:
            answer = await engine.chat({**chat, "temperature": 0})
            assert answer["model"] == "tiny-vllm" and answer["object"] == "chat.completion"
            assert answer["usage"]["completion_tokens"] <= 8
            chunks = [c async for c in engine.chat_stream({**chat, "stream": True})]
            assert chunks and all(c["object"] == "chat.completion.chunk" for c in chunks)
            text = await engine.complete({"model": "x", "prompt": "hello", "max_tokens": 4})
            assert text["choices"][0]["text"] is not None
            # closing a stream early closes vLLM's response, so vLLM aborts the request
            stream = engine.complete_stream({"model": "x", "prompt": "hi", "max_tokens": 400, "stream": True})
            first = await anext(stream)
            assert first["object"] == "text_completion"
            await stream.aclose()  # type: ignore[attr-defined]
            with pytest.raises(InvalidRequest):
                await engine.chat({**chat, "max_tokens": 100_000})  # beyond --max-model-len 512
            with pytest.raises(InvalidRequest):
                await anext(engine.chat_stream({**chat, "max_tokens": 100_000, "stream": True}))
            await asyncio.sleep(1)
            metrics = engine.metrics()
            assert metrics["num_requests_running"] == 0  # the closed stream's request was aborted
            assert metrics.get("generation_tokens_total", 1) > 0

        asyncio.run(session())
    finally:
        engine.close()
    assert not _group_alive(pgid)  # vLLM's server and its engine-core process are gone
