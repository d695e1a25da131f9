"""The CLI and xinference-client against a real server."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import CHAT_MODEL, ShoalServer, alive, pids_of


def shoal(server: ShoalServer, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SHOAL_ENDPOINT": server.url, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "shoal.cli", *args], env=env, capture_output=True, text=True, timeout=300
    )


def test_cli_launch_ps_stop(server: ShoalServer) -> None:
    launched = shoal(
        server, "launch", CHAT_MODEL, "--uid", "cli-chat", "-o", "n_parallel=1", "-o", "n_ctx=512"
    )
    assert launched.returncode == 0, launched.stdout + launched.stderr
    assert "cli-chat" in launched.stdout and "ready" in launched.stdout
    pids = pids_of(server, "cli-chat")
    listed = shoal(server, "ps")
    assert listed.returncode == 0 and "cli-chat" in listed.stdout and "ready" in listed.stdout
    stopped = shoal(server, "stop", "cli-chat")
    assert stopped.returncode == 0, stopped.stderr
    assert "cli-chat" not in shoal(server, "ps").stdout
    assert not any(alive(p) for p in pids)


def test_cli_reports_errors(server: ShoalServer) -> None:
    result = shoal(server, "stop", "ghost")
    assert result.returncode == 1 and "404" in result.stdout
    result = shoal(server, "launch", "no-such-model")
    assert result.returncode == 1 and "not in the catalog" in result.stdout


def test_cli_models_lists_catalog(server: ShoalServer) -> None:
    result = shoal(server, "models")
    assert result.returncode == 0 and CHAT_MODEL in result.stdout
    result = shoal(server, "models", "--type", "embedding")
    assert "all-MiniLM-L6-v2" in result.stdout


def test_cli_chat_streams_an_answer(chat_server: ShoalServer) -> None:
    env = {**os.environ, "SHOAL_ENDPOINT": chat_server.url, "COLUMNS": "200"}
    result = subprocess.run(
        [sys.executable, "-m", "shoal.cli", "chat", CHAT_MODEL, "--max-tokens", "8"],
        input="Hello!\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.replace("you>", "").strip()) > 0


def test_xinference_client_drives_shoal(server: ShoalServer) -> None:
    from xinference_client import RESTfulClient

    client = RESTfulClient(server.url)
    uid = client.launch_model(
        model_name=CHAT_MODEL,
        model_type="LLM",
        model_engine="llama.cpp",
        model_uid="xinf-chat",
        n_parallel=1,
        n_ctx=512,
    )
    assert uid == "xinf-chat"
    try:
        assert "xinf-chat" in client.list_models()
        model = client.get_model(uid)
        answer = model.chat(
            messages=[{"role": "user", "content": "Hello"}], generate_config={"max_tokens": 8}
        )
        assert answer["choices"][0]["message"]["content"]
        chunks = list(
            model.chat(
                messages=[{"role": "user", "content": "Hello"}],
                generate_config={"max_tokens": 8, "stream": True},
            )
        )
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        assert client.describe_model(uid)["model_name"] == CHAT_MODEL
    finally:
        client.terminate_model(uid)
    assert "xinf-chat" not in client.list_models()


def test_python_client(chat_server: ShoalServer, embed_server: ShoalServer) -> None:
    from shoal import Client

    with Client(chat_server.url) as client:
        assert {m["id"] for m in client.list_models()} >= {CHAT_MODEL, "all-MiniLM-L6-v2"}
        chat = client.model(CHAT_MODEL)
        assert chat.chat([{"role": "user", "content": "hi"}], max_tokens=4)["choices"][0]["message"][
            "content"
        ]
        assert "".join(
            e["choices"][0]["delta"].get("content") or ""
            for e in chat.chat_stream([{"role": "user", "content": "hi"}], max_tokens=4)
            if e["choices"]
        )
        vectors = client.model("all-MiniLM-L6-v2").embed(["a", "b"])["data"]
        assert len(vectors) == 2 and len(vectors[0]["embedding"]) == 384
        assert client.describe(CHAT_MODEL)["status"] == "ready"
