"""The gateway's HTTP client to its runners (shoal.runners.client), against a real uvicorn server on a
Unix socket and on TCP: keep-alive reuse, streamed pieces as they come, big answers, timeouts, a
server that drops the connection, a caller that leaves. The end-to-end suites drive it through real
runners; these are the cases a runner rarely shows on demand."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from shoal.runners.client import RunnerClient

BIG = bytes(range(256)) * (5 * 4096)  # 5 MiB: more than the client buffers before it pauses reading
release = threading.Event()


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    path = scope["path"]
    headers = [(b"content-type", b"application/json; charset=utf-8")]
    if path == "/echo":
        params = dict(scope["headers"]).get(b"x-params", b"")
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send(
            {"type": "http.response.body", "body": body + b"|" + params + b"|" + scope["method"].encode()}
        )
    elif path == "/big":
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": BIG})
    elif path == "/stream":  # chunked: one piece now, the rest once the test lets it go
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        while not release.is_set():
            await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b"data: 2\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    elif path == "/slow":
        await asyncio.sleep(3)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"late"})
    elif path == "/broken":  # the answer starts, then the app fails: uvicorn drops the connection
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"100")]})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise RuntimeError("the runner failed mid-answer")
    else:
        await send({"type": "http.response.start", "status": 404, "headers": headers})
        await send({"type": "http.response.body", "body": b'{"error": "no such path"}'})


def _serve(config: uvicorn.Config) -> Iterator[uvicorn.Server]:
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the test server did not start"
        time.sleep(0.02)
    yield server
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def unix_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = str(tmp_path_factory.mktemp("client") / "runner.sock")
    config = uvicorn.Config(app, uds=path, log_level="error", lifespan="off", timeout_keep_alive=600)
    for _ in _serve(config):
        yield path


@pytest.fixture(scope="module")
def tcp_server() -> Iterator[int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="off")
    for _ in _serve(config):
        yield port


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_requests_reuse_one_connection_and_carry_body_headers_and_method(unix_server: str) -> None:
    async def go() -> None:
        client = RunnerClient(socket=unix_server)
        for i in range(20):
            status, body = await client.call("POST", "/echo", {"i": i})
            assert (status, body) == (200, b'{"i":%d}||POST' % i)
        assert len(client._all) == 1  # keep-alive: one connection for 20 requests in a row
        answer = await client.request("PUT", "/echo", b"raw", {"x-params": '{"a": 1}'})
        assert answer.content_type == "application/json"
        assert await answer.read() == b'raw|{"a": 1}|PUT'
        # concurrent requests open a connection each, then reuse them
        results = await asyncio.gather(*(client.call("POST", "/echo", {"n": n}) for n in range(8)))
        assert [r[1] for r in results] == [b'{"n":%d}||POST' % n for n in range(8)]
        opened = len(client._all)
        assert 1 <= opened <= 8
        await asyncio.gather(*(client.call("POST", "/echo", {"n": n}) for n in range(8)))
        assert len(client._all) == opened
        status, body = await client.call("GET", "/nowhere")
        assert status == 404 and b"no such path" in body
        await client.close()

    run(go())


def test_a_header_with_a_line_break_is_refused(unix_server: str) -> None:
    async def go() -> None:
        client = RunnerClient(socket=unix_server)
        with pytest.raises(ValueError, match="line break"):
            await client.request("POST", "/echo", b"", {"x-params": "a\r\nx-evil: 1"})
        await client.close()

    run(go())


def test_big_answers_come_whole_through_the_read_pause(unix_server: str) -> None:
    async def go() -> None:
        client = RunnerClient(socket=unix_server)
        for _ in range(2):  # the second on the reused connection: it must not stay paused
            status, body = await client.call("GET", "/big")
            assert status == 200 and body == BIG
        await client.close()

    run(go())


def test_streamed_pieces_arrive_before_the_answer_ends(unix_server: str) -> None:
    async def go() -> None:
        release.clear()
        client = RunnerClient(socket=unix_server)
        answer = await client.request("POST", "/stream")
        assert answer.content_type == "text/event-stream"
        pieces = answer.chunks()
        assert await anext(pieces) == b"data: 1\n\n"  # while the server still holds the rest
        release.set()
        assert b"".join([piece async for piece in pieces]) == b"data: 2\n\n"
        status, _ = await client.call("POST", "/echo")  # the connection is reusable after the stream
        assert status == 200 and len(client._all) == 1
        await client.close()

    run(go())


def test_no_first_byte_in_time_is_a_timeout_and_the_connection_is_not_reused(unix_server: str) -> None:
    async def go() -> None:
        client = RunnerClient(socket=unix_server)
        with pytest.raises(TimeoutError):
            await client.request("GET", "/slow", first_byte=0.2)
        with pytest.raises(TimeoutError):
            await client.request("GET", "/slow", timeout=0.3)
        await asyncio.sleep(0.05)
        assert not client._all  # both dropped: a late answer never lands on the next request
        assert await client.call("POST", "/echo") == (200, b"||POST")
        await client.close()

    run(go())


def test_a_runner_that_drops_the_connection_mid_answer_is_a_connection_error(unix_server: str) -> None:
    async def go() -> None:
        client = RunnerClient(socket=unix_server)
        answer = await client.request("GET", "/broken")
        assert answer.status == 200
        with pytest.raises(ConnectionError, match="before its answer was complete"):
            await answer.read()
        assert await client.call("POST", "/echo") == (200, b"||POST")
        await client.close()

    run(go())


def test_leaving_a_stream_drops_its_connection(unix_server: str) -> None:
    async def go() -> None:
        release.clear()
        client = RunnerClient(socket=unix_server)
        answer = await client.request("POST", "/stream")
        assert await anext(answer.chunks()) == b"data: 1\n\n"
        answer.close()
        answer.close()  # idempotent
        await asyncio.sleep(0.05)
        assert not client._all
        release.set()
        await client.close()

    run(go())


def test_no_runner_and_a_closed_client_are_connection_errors(tmp_path: Path, unix_server: str) -> None:
    async def go() -> None:
        with pytest.raises(OSError):
            await RunnerClient(socket=str(tmp_path / "absent.sock")).call("GET", "/health")
        client = RunnerClient(socket=unix_server)
        release.clear()
        answer = await client.request("POST", "/stream")
        await client.close()  # a node lost: requests in flight fail, new ones too
        with pytest.raises(ConnectionError):
            await answer.read()
        with pytest.raises(ConnectionError, match="closed"):
            await client.call("POST", "/echo")
        release.set()

    run(go())


def test_tcp_runners_on_a_node(tcp_server: int) -> None:
    async def go() -> None:
        client = RunnerClient(host="127.0.0.1", port=tcp_server)
        assert await client.call("POST", "/echo", [1]) == (200, b"[1]||POST")
        assert (await client.call("GET", "/big"))[1] == BIG
        await client.close()
        with pytest.raises(ValueError):
            RunnerClient()

    run(go())
