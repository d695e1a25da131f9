"""A client that misbehaves costs it, not the server: stalled and idle connections are closed, too
many are refused with a 503, a hang-up is one 499 line, unknown names never become metric labels,
and an error answer (4xx or 500) leaves the connection usable.

Raw sockets against a real `shoal serve` with small timeouts and caps; no model except where a
request must be in flight when the client leaves. Bound a client socket to 127.0.0.N to be
another client address (Linux routes all of 127.0.0.0/8 to loopback).
"""

from __future__ import annotations

import json
import logging
import re
import select
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import CHAT_MODEL, ShoalServer
from shoal.gateway.server import ConnectionLimits, local_reserve

HEADER_TIMEOUT, BODY_TIMEOUT, IDLE_TIMEOUT = 2, 2, 4
MAX_CONNECTIONS, PER_CLIENT = 40, 8
MSG = [{"role": "user", "content": "tell me a long story"}]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShoalServer]:
    root = tmp_path_factory.mktemp("hostile")
    env = {
        "SHOAL_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
        "SHOAL_BODY_TIMEOUT": str(BODY_TIMEOUT),
        "SHOAL_IDLE_TIMEOUT": str(IDLE_TIMEOUT),
        "SHOAL_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        "SHOAL_MAX_CONNECTIONS_PER_CLIENT": str(PER_CLIENT),
    }
    srv = ShoalServer(root / "data", root / "server.log", env=env)
    srv.start()
    yield srv
    srv.stop()


def connect(server: ShoalServer, source: str = "127.0.0.1", timeout: float = 10) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", server.port))
    return sock


def request(
    method: str,
    path: str,
    body: bytes = b"",
    length: int | None = None,
    content_type: str = "application/json",
) -> bytes:
    """One HTTP/1.1 request; `length` (more than the body) leaves the body unfinished."""
    lines = [f"{method} {path} HTTP/1.1", "Host: shoal"]
    if body or method == "POST":
        lines += [
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body) if length is None else length}",
        ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One whole answer with a content-length (every error and /health answer has one)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed mid-answer"
        body += chunk
    return int(status_line.split()[1]), headers, body[:length]


def closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """(True, what came before EOF) if the server closed the connection within `seconds`."""
    sock.settimeout(seconds)
    received = b""
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                return True, received
            received += chunk
    except TimeoutError:
        return False, received
    except ConnectionResetError:
        return True, received
    return False, received


def openai_error(body: bytes) -> dict:
    error = json.loads(body)["error"]
    assert set(error) >= {"message", "type", "code", "param"} and error["message"], error
    return error


def new_log(server: ShoalServer, mark: int) -> str:
    return server.log_path.read_text()[mark:]


def log_mark(server: ShoalServer) -> int:
    return len(server.log_path.read_text())


def test_a_silent_connection_is_closed_after_the_header_timeout(hostile: ShoalServer) -> None:
    sock = connect(hostile)
    closed, received = closed_within(sock, 3 * HEADER_TIMEOUT)
    assert closed and received == b""  # nothing was asked, nothing is answered
    sock.close()


def test_headers_sent_a_byte_at_a_time_still_time_out(hostile: ShoalServer) -> None:
    """The deadline is for the whole head: a trickle of bytes does not extend it."""
    sock = connect(hostile)
    sock.settimeout(0.2)
    head = b"GET /health HTTP/1.1\r\nHost: shoal\r\nX-Padding: " + b"p" * 100  # never finished
    start, closed, received = time.monotonic(), False, b""
    for byte in head:
        try:
            sock.send(bytes([byte]))
            chunk = sock.recv(65536)
            received += chunk
            if not chunk:
                closed = True
                break
        except TimeoutError:
            pass
        except OSError:  # reset: the server closed while we were still sending
            closed = True
            break
    elapsed = time.monotonic() - start
    sock.close()
    assert closed and elapsed < 3 * HEADER_TIMEOUT
    if received:
        status, _, body = read_response_bytes(received)
        assert status == 408 and openai_error(body)["code"] == "header_timeout"


def read_response_bytes(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return int(status_line.split()[1]), headers, body


def test_a_stalled_head_gets_408(hostile: ShoalServer) -> None:
    sock = connect(hostile)
    sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: shoal\r\nContent-Ty")
    closed, received = closed_within(sock, 3 * HEADER_TIMEOUT)
    assert closed
    status, headers, body = read_response_bytes(received)
    assert status == 408 and headers["connection"] == "close"
    assert openai_error(body)["code"] == "header_timeout"
    sock.close()


@pytest.mark.parametrize("path", ["/v1/embeddings", "/v1/models"])  # raw body; FastAPI's own parsing
def test_a_stalled_body_gets_408_and_the_connection_closes(hostile: ShoalServer, path: str) -> None:
    mark = log_mark(hostile)
    sock = connect(hostile)
    sock.sendall(request("POST", path, b'{"model": "x", ', length=100))  # 15 of 100 bytes, then nothing
    sock.settimeout(3 * BODY_TIMEOUT)
    status, headers, body = read_response(sock)
    assert status == 408 and headers["connection"] == "close"
    error = openai_error(body)
    assert error["code"] == "body_timeout" and error["type"] == "invalid_request_error"
    closed, _ = closed_within(sock, 5)
    assert closed
    sock.close()
    time.sleep(0.2)
    log = new_log(hostile, mark)
    assert '"status": 408' in log and "Traceback" not in log and "ERROR" not in log


def test_an_idle_keep_alive_connection_is_closed(hostile: ShoalServer) -> None:
    sock = connect(hostile)
    sock.sendall(request("GET", "/health"))
    assert read_response(sock)[0] == 200
    sock.sendall(request("GET", "/health"))  # kept alive: the same connection answers again
    assert read_response(sock)[0] == 200
    closed, received = closed_within(sock, 3 * IDLE_TIMEOUT)
    assert closed and received == b""
    sock.close()


def test_error_answers_keep_the_connection_usable(hostile: ShoalServer) -> None:
    sock = connect(hostile)
    asks = [
        (
            request("POST", "/v1/chat/completions", json.dumps({"model": "ghost", "messages": MSG}).encode()),
            404,
        ),
        (request("POST", "/v1/chat/completions", b"{not json"), 400),
        (request("POST", "/v1/embeddings", b"[1, 2]"), 400),
        (request("PUT", "/v1/chat/completions", b"{}"), 405),
        (request("GET", "/v1/nothing-here"), 404),
        (request("GET", "/v1/models/ghost"), 404),
        (request("GET", "/health"), 200),
    ]
    for raw, expected in asks:
        sock.sendall(raw)
        status, headers, body = read_response(sock)
        assert status == expected, body
        assert headers.get("connection") != "close"
        if status >= 400:
            openai_error(body)
    sock.close()


def test_one_client_past_its_cap_gets_503_and_others_are_served(hostile: ShoalServer) -> None:
    held = []
    for _ in range(PER_CLIENT):
        sock = connect(hostile, "127.0.0.2")
        sock.sendall(request("GET", "/health"))
        assert read_response(sock)[0] == 200  # admitted; kept alive for IDLE_TIMEOUT
        held.append(sock)
    extra = connect(hostile, "127.0.0.2")
    extra.sendall(request("POST", "/v1/embeddings", b'{"model": "x", "input": "y"}'))
    status, headers, body = read_response(extra)
    assert status == 503 and headers["retry-after"] == "1" and headers["connection"] == "close"
    assert openai_error(body)["code"] == "too_many_connections"
    assert closed_within(extra, 5)[0]
    extra.close()
    assert hostile.http.get("/health").status_code == 200  # from 127.0.0.1
    assert httpx.get(hostile.url + "/ready", timeout=10).status_code == 200
    for sock in held:
        sock.close()
    deadline = time.monotonic() + 10
    while True:  # the counts are given back as the connections close
        again = connect(hostile, "127.0.0.2")
        again.sendall(request("GET", "/health"))
        status = read_response(again)[0]
        again.close()
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert status == 200
    assert 'shoal_connections_refused_total{reason="per_client"}' in hostile.http.get("/metrics").text


def test_the_total_cap_refuses_rather_than_running_out(hostile: ShoalServer) -> None:
    held: list[socket.socket] = []
    refused = None
    try:
        for n in range(2 * MAX_CONNECTIONS):
            sock = connect(hostile, f"127.0.1.{n // (PER_CLIENT - 1) + 1}")
            sock.sendall(request("GET", "/health"))
            status, _, body = read_response(sock)
            if status == 503:
                refused = openai_error(body)
                sock.close()
                break
            held.append(sock)
        assert refused is not None and f"cap of {MAX_CONNECTIONS} connections" in refused["message"]
        reserve = local_reserve(MAX_CONNECTIONS)
        assert reserve > 0 and len(held) == MAX_CONNECTIONS - reserve
        # the host itself (127.0.0.1 to 127.0.0.1) still gets in, on the reserve: /health, /ready
        # and /metrics answer while other hosts fill the total
        for path in ("/health", "/ready", "/metrics"):
            assert httpx.get(hostile.url + path, timeout=10).status_code == 200, path
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10
    while hostile_health(hostile) != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert hostile_health(hostile) == 200
    assert 'shoal_connections_refused_total{reason="total"}' in hostile.http.get("/metrics").text


def hostile_health(server: ShoalServer) -> int:
    try:
        return httpx.get(server.url + "/health", timeout=10).status_code
    except httpx.TransportError:
        return 0


def test_hanging_up_mid_body_is_one_499_line(hostile: ShoalServer) -> None:
    for path, content_type, part in (
        ("/v1/embeddings", "application/json", b'{"model"'),
        ("/v1/models", "application/json", b'{"model_name"'),
        ("/v1/audio/transcriptions", "multipart/form-data; boundary=xx", b"--xx\r\n"),
    ):
        mark = log_mark(hostile)
        sock = connect(hostile)
        sock.sendall(request("POST", path, part, length=1000, content_type=content_type))
        time.sleep(0.3)
        sock.close()
        time.sleep(0.5)
        log = new_log(hostile, mark)
        lines = [line for line in log.splitlines() if "shoal.access" in line and path in line]
        assert len(lines) == 1 and '"status": 499' in lines[0] and " INFO " in lines[0], log
        assert "Traceback" not in log and "ERROR" not in log, log
    assert 'status="500"' not in hostile.http.get("/metrics").text


def test_hanging_up_during_the_answer_is_one_499_line(hostile: ShoalServer) -> None:
    hostile.ensure(CHAT_MODEL, n_parallel=1, n_ctx=512)
    from conftest import wait_until_ready

    wait_until_ready(hostile, CHAT_MODEL)
    for stream, wait_for_first_bytes in ((False, False), (True, False), (True, True)):
        mark = log_mark(hostile)
        body = {"model": CHAT_MODEL, "messages": MSG, "max_tokens": 300, "ignore_eos": True, "stream": stream}
        sock = connect(hostile)
        sock.sendall(request("POST", "/v1/chat/completions", json.dumps(body).encode()))
        if wait_for_first_bytes:
            assert sock.recv(100).startswith(b"HTTP/1.1 200")
        else:
            time.sleep(0.5)
        sock.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "/v1/chat/completions" not in new_log(hostile, mark):
            time.sleep(0.2)
        time.sleep(0.3)
        log = new_log(hostile, mark)
        lines = [line for line in log.splitlines() if "shoal.access" in line and "chat/completions" in line]
        assert len(lines) == 1 and '"status": 499' in lines[0], (stream, wait_for_first_bytes, log)
        assert "Traceback" not in log and "ERROR" not in log, log
    metrics = hostile.http.get("/metrics").text
    assert (
        f'shoal_requests_total{{model="{CHAT_MODEL}",route="/v1/chat/completions",status="499"}} 3.0'
        in metrics
    )
    assert 'status="500"' not in metrics


def test_unknown_names_do_not_grow_metrics(hostile: ShoalServer) -> None:
    client = httpx.Client(base_url=hostile.url, timeout=60)
    huge = "m" * 100_000

    def ask(n: int) -> httpx.Response:
        kind = n % 6
        if kind == 0:
            return client.post("/v1/chat/completions", json={"model": f"{huge}{n}", "messages": MSG})
        if kind == 1:
            return client.post(
                "/v1/chat/completions", json={"model": f"nulmark\x00{n}\x01\n", "messages": MSG}
            )
        if kind == 2:
            return client.post("/v1/embeddings", json={"model": str(uuid.uuid4()), "input": "x"})
        if kind == 3:
            return client.get(f"/v1/models/{uuid.uuid4()}")
        if kind == 4:
            return client.get(f"/v1/{uuid.uuid4()}/{'p' * 2000}")
        return client.post("/v1/rerank", json={"model": str(uuid.uuid4()), "query": "q", "documents": ["d"]})

    for n in range(6):  # every series these requests touch exists before the first measure
        ask(n)
    client.get("/metrics")
    mark = log_mark(hostile)
    before = len(client.get("/metrics").content)
    for n in range(3000):
        r = ask(n)
        assert r.status_code == 404, r.text[:200]
    text = client.get("/metrics").text
    client.close()
    assert len(text.encode()) - before < 2_000  # counters grow by digits, not by series
    assert "mmmmmmmmmm" not in text and "nulmark" not in text and "ppppp" not in text
    assert 'route="unmatched"' in text
    time.sleep(0.3)
    lines = [line for line in new_log(hostile, mark).splitlines() if "shoal.access" in line]
    assert len(lines) >= 3000
    assert max(len(line) for line in lines) < 1500  # names and paths are clipped in the log
    assert not any("\x00" in line for line in lines)
    assert any('"model_requested": "nulmark\\u0000' in line for line in lines)


def test_the_last_connections_are_kept_for_the_host_itself() -> None:
    limits = ConnectionLimits(total=40, per_client=8, header_timeout=1)
    assert limits.reserve == local_reserve(40) == 5 and local_reserve(10_000) == 16 and local_reserve(7) == 0
    for n in range(35):  # other hosts fill all but the reserve
        assert limits.admit(f"10.0.{n // 7}.1") is None
    assert limits.admit("10.0.9.1") == "total"
    for _ in range(5):  # the host itself may use the reserve, within its own per-client cap
        assert limits.admit("127.0.0.1", local=True) is None
    assert limits.admit("127.0.0.1", local=True) == "total" and limits.open == 40
    limits.release("10.0.0.1")
    assert limits.admit("10.0.9.1") is None  # given back: another host gets in again
    limits.release("127.0.0.1", local=True)
    assert limits.admit("10.0.9.1") == "total"  # a slot of the reserve: still not for other hosts
    assert limits.admit("127.0.0.1", local=True) is None


def test_caps_leave_a_reserve_of_descriptors() -> None:
    from shoal.gateway.server import connection_caps
    from shoal.settings import ServerSettings

    def caps(descriptors: int, total: int | None = None, per_client: int | None = None) -> tuple[int, int]:
        settings = ServerSettings(
            data_dir=Path("/nonexistent"), max_connections=total, max_connections_per_client=per_client
        )
        return connection_caps(settings, descriptors)

    assert caps(1_048_576) == (10_000, 2_500)
    assert caps(20_000) == (10_000, 2_500)
    assert caps(4096) == (3584, 896)
    assert caps(1024) == (512, 128)
    assert caps(1024, total=5000)[0] == 512  # past the limit: clamped, with a warning
    assert caps(20_000, total=100, per_client=0) == (100, 100)
    assert caps(20_000, total=100, per_client=7) == (100, 7)


def test_the_soft_descriptor_limit_is_raised_to_the_hard_one() -> None:
    code = (
        "import resource; from shoal.gateway.server import raise_descriptor_limit;"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE);"
        "print(soft, raise_descriptor_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)"
    )

    def lower() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, preexec_fn=lower
    ).stdout.split()
    soft_before, returned, soft_after, hard = map(int, out)
    assert soft_before == 256 and returned == soft_after == hard


# The same limits on both of uvicorn's protocols, and the 500 path, in process: the gateway's own
# middleware and handlers over a small app, served by the real server module on a real socket.
# (Every 500 a client could cause is a bug being fixed, so no Shoal route is known to raise.)


def _small_app():  # type: ignore[no-untyped-def]
    import asyncio

    from fastapi import FastAPI

    from shoal.gateway import errors
    from shoal.gateway.middleware import BodyTimeout, RequestLog, UnexpectedErrors

    app = FastAPI()
    errors.install(app)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("kaput")

    @app.get("/fine")
    async def fine() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/slow")
    async def slow() -> dict[str, bool]:
        await asyncio.sleep(1)
        return {"ok": True}

    app.add_middleware(UnexpectedErrors)
    app.add_middleware(BodyTimeout, seconds=5)
    app.add_middleware(RequestLog)
    return app


@pytest.fixture(params=["httptools", "h11"])
def in_process(request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture) -> Iterator[int]:
    """The port of a uvicorn server in a thread: 1 s header timeout, 2 connections per client."""
    import uvicorn

    from conftest import free_port
    from shoal.gateway.server import protocol_class

    port = free_port()
    limits = ConnectionLimits(total=10, per_client=2, header_timeout=1)
    config = uvicorn.Config(
        _small_app(),
        host="127.0.0.1",
        port=port,
        log_config=None,
        lifespan="off",
        http=protocol_class(limits, request.param),
        ws="none",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    caplog.set_level(logging.INFO)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield port
    server.should_exit = True
    thread.join(timeout=10)


def test_an_unexpected_error_is_a_500_logged_once_on_a_connection_that_stays(
    in_process: int, caplog: pytest.LogCaptureFixture
) -> None:
    sock = socket.create_connection(("127.0.0.1", in_process), timeout=10)
    sock.sendall(b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = read_response(sock)
    assert status == 500 and headers.get("connection") != "close"
    error = openai_error(body)
    assert error["type"] == "server_error" and "kaput" in error["message"]
    sock.sendall(b"GET /fine HTTP/1.1\r\nHost: x\r\n\r\n")  # the same connection
    assert read_response(sock)[0] == 200
    sock.close()
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and tracebacks[0].name == "shoal.gateway"
    access = [r.getMessage() for r in caplog.records if r.name == "shoal.access"]
    assert any(re.search(r'"path": "/boom".*"status": 500', line) for line in access)


def test_both_protocols_apply_the_limits(in_process: int, caplog: pytest.LogCaptureFixture) -> None:
    def dial() -> socket.socket:
        return socket.create_connection(("127.0.0.1", in_process), timeout=10)

    silent = dial()
    assert closed_within(silent, 3) == (True, b"")
    stalled = dial()
    stalled.sendall(b"GET /fine HTTP/1.1\r\nHo")
    closed, received = closed_within(stalled, 3)
    assert closed and read_response_bytes(received)[0] == 408
    first, second = dial(), dial()
    for sock in (first, second):
        sock.sendall(b"GET /fine HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock)[0] == 200
    third = dial()
    third.sendall(b"GET /fine HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = read_response(third)
    assert status == 503 and headers["retry-after"] == "1"
    assert openai_error(body)["code"] == "too_many_connections"
    for sock in (first, second, silent, stalled, third):
        sock.close()
    time.sleep(0.2)
    leaving = dial()  # admitted again now that the others closed
    leaving.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.2)
    leaving.close()  # before the answer
    time.sleep(1.5)
    access = [r.getMessage() for r in caplog.records if r.name == "shoal.access"]
    assert any(re.search(r'"path": "/slow".*"status": 499', line) for line in access), access
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def answered_or_not(socks: list[socket.socket]) -> tuple[list[socket.socket], list[bytes]]:
    """(the connections still waiting for a request, the answers the others got and closed on).
    A refused connection is answered 503 at once; an admitted one waits for its request."""
    readable: set[socket.socket] = set()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # until no more answers come for half a second
        time.sleep(0.5)
        poll = select.poll()  # not select.select: these descriptors may be past 1024
        for sock in socks:
            poll.register(sock, select.POLLIN)
        ready = {fd for fd, _ in poll.poll(0)}
        now = {sock for sock in socks if sock.fileno() in ready}
        if now == readable:
            break
        readable = now
    waiting, answers = [], []
    for sock in socks:
        if sock in readable:
            answers.append(sock.recv(200))
            sock.close()
        else:
            waiting.append(sock)
    assert all(a.startswith(b"HTTP/1.1 503") for a in answers), answers[:3]
    return waiting, answers


def open_files(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def test_a_flood_under_a_low_descriptor_limit_leaves_supervision_working(tmp_path: Path) -> None:
    """1,024 open files: the caps come out at 512 in all and 128 per client; a flood from one
    address and then from many is refused with 503s, the process never runs out of descriptors,
    and a runner killed during the flood is restarted."""
    import os
    import signal

    from conftest import pids_of, wait_until_ready

    srv = ShoalServer(
        tmp_path / "data", tmp_path / "server.log", env={"SHOAL_HEADER_TIMEOUT": "60"}, open_files=1024
    )
    srv.start()
    held: list[socket.socket] = []
    try:
        assert "connections: at most 512 (128 per client; the last 16 only" in srv.log_path.read_text()
        body = {"model_name": CHAT_MODEL, "model_uid": "flooded", "n_parallel": 1, "n_ctx": 512}
        assert srv.http.post("/v1/models", json=body).status_code == 200
        [pid] = pids_of(srv, "flooded")
        assert srv.proc is not None
        flood = [connect(srv, "127.0.0.2") for _ in range(600)]  # one client: 128 admitted
        held, refused = answered_or_not(flood)
        assert len(held) == 128 and len(refused) == 600 - 128
        assert srv.http.get("/health").status_code == 200  # another client is served
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while pids_of(srv, "flooded") == [pid]:
            assert time.monotonic() < deadline, "the killed runner was not restarted"
            time.sleep(0.1)
        wait_until_ready(srv, "flooded", timeout=120)
        chat = {"model": "flooded", "messages": MSG, "max_tokens": 2}
        assert srv.http.post("/v1/chat/completions", json=chat).status_code == 200
        srv.http.close()  # its kept-alive connection would hold one of the host's reserved slots
        peak = 0
        for n in range(1500):  # many clients: the total cap refuses, the descriptors last
            held.append(connect(srv, f"127.0.2.{n // 100 + 1}"))
            if n % 100 == 0:
                peak = max(peak, open_files(srv.proc.pid))
        held, refused = answered_or_not(held)
        assert len(held) == 512 - local_reserve(512) and peak < 1024
        assert srv.proc.poll() is None
        outsider = connect(srv, "127.0.3.1")
        outsider.sendall(request("GET", "/health"))
        status, headers, _ = read_response(outsider)  # another host: a clean 503, not a reset
        assert status == 503 and headers["retry-after"] == "1"
        outsider.close()
        for path in ("/health", "/ready"):  # the host itself: on the reserve
            probe = connect(srv)
            probe.sendall(request("GET", path))
            assert read_response(probe)[0] == 200, path
            probe.close()
    finally:
        for sock in held:
            sock.close()
        held.clear()
    deadline = time.monotonic() + 10
    while hostile_health(srv) != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert hostile_health(srv) == 200
    assert srv.stop() == 0
    log = srv.log_path.read_text()
    assert "Traceback" not in log and "Too many open files" not in log, log[-3000:]
