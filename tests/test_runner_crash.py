"""A runner that dies: its model answers 503 promptly, other models keep serving, and it comes back."""

from __future__ import annotations

import os
import signal
import threading
import time

import openai
import pytest

from conftest import CHAT_MODEL, EMBED_MODEL, ShoalServer, pids_of, wait_until_ready


def test_killed_runner_gives_503_then_restarts(chat_server: ShoalServer, embed_server: ShoalServer) -> None:
    server = chat_server
    [pid] = pids_of(server, CHAT_MODEL)
    os.kill(pid, signal.SIGKILL)
    # Until the supervisor notices, the dead socket refuses; afterwards the replica is restarting.
    r = server.http.post(
        "/v1/chat/completions",
        json={"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    assert r.status_code == 503, r.text
    assert int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["code"] == "model_unavailable"
    # The other model never stops answering.
    r = server.http.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": "still here"})
    assert r.status_code == 200
    deadline = time.monotonic() + 120
    while (described := wait_until_ready(server, CHAT_MODEL))["replicas"][0]["pid"] == pid:
        assert time.monotonic() < deadline, "the runner was not restarted"
        time.sleep(0.1)
    assert described["replicas"][0]["restarts"] == 1
    r = server.http.post(
        "/v1/chat/completions",
        json={"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    assert r.status_code == 200


def test_kill_during_stream_fails_the_stream(chat_server: ShoalServer, openai_client) -> None:
    server = chat_server
    [pid] = pids_of(server, CHAT_MODEL)
    stream = openai_client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "Write a very long story."}],
        max_tokens=2000,
        temperature=0,
        stream=True,
    )
    killed = threading.Event()
    with pytest.raises(openai.APIError):
        for i, _ in enumerate(stream):
            if i == 3 and not killed.is_set():
                os.kill(pid, signal.SIGKILL)
                killed.set()
    assert killed.is_set()
    deadline = time.monotonic() + 120
    while wait_until_ready(server, CHAT_MODEL)["replicas"][0]["pid"] == pid:
        assert time.monotonic() < deadline, "the runner was not restarted"
        time.sleep(0.1)
