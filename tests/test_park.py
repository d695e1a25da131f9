"""Park, wake, the host-RAM budget and defragmenting moves, end to end: a real server on two declared
fake GPUs, real runners on the CPU with real small models (MiniLM through sentence-transformers, a
tiny random Llama through transformers, SmolLM2 GGUF through llama.cpp, which cannot park).

On a fake GPU the weights already live in host RAM, so a runner's park and wake move nothing; what
is real here is the control path: the reservation released, the process kept, the request that
wakes it waiting, the replica placed again (same process on the GPU it left, a new one elsewhere).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from conftest import CHAT_MODEL, EMBED_MODEL, ShoalServer, alive, build_tiny_llama, pids_of, wait_until_ready

GiB = 1024**3
TINY = "tiny-park"


@pytest.fixture(scope="module")
def park_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShoalServer]:
    root = tmp_path_factory.mktemp("park")
    # 2 × 4 GiB (3.8 free after headroom); host RAM for at most one parked 2.5 GiB replica
    srv = ShoalServer(
        root / "data", root / "server.log", ["--fake-gpus", "2x4GiB"], env={"SHOAL_PARK_MEMORY": "3GiB"}
    )
    srv.start()
    folder = root / "tiny"
    folder.mkdir()
    build_tiny_llama(folder, 64, 256)
    spec = {"model_format": "pytorch", "model_uri": str(folder)}
    model = {"model_name": TINY, "model_ability": ["chat"], "context_length": 256, "model_specs": [spec]}
    assert srv.http.post("/v1/model_registrations/LLM", json={"model": model}).status_code == 200
    yield srv
    srv.stop()


def launch(server: ShoalServer, name: str, uid: str, **extra: object) -> None:
    body = {"model_name": name, "model_uid": uid, "n_threads": 1, **extra}
    if name == TINY:
        body["model_engine"] = "transformers"
    r = server.http.post("/v1/models", json=body)
    assert r.status_code == 200, r.text


def described(server: ShoalServer, uid: str) -> dict:
    return server.http.get(f"/v1/models/{uid}").json()


def replica(server: ShoalServer, uid: str) -> dict:
    return described(server, uid)["replicas"][0]


def embed(server: ShoalServer, uid: str) -> None:
    r = server.http.post("/v1/embeddings", json={"model": uid, "input": "parked weights wake up"})
    assert r.status_code == 200, r.text
    assert len(r.json()["data"][0]["embedding"]) == 384


def chat(server: ShoalServer, uid: str) -> None:
    body = {"model": uid, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = server.http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text


def metric(server: ShoalServer, name: str) -> float:
    for line in server.http.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def clear(server: ShoalServer) -> None:
    for model in server.http.get("/v1/models").json()["data"]:
        server.http.delete(f"/v1/models/{model['id']}")


def test_park_on_pressure_wake_on_request_and_the_host_ram_budget(park_server: ShoalServer) -> None:
    srv = park_server
    launch(srv, EMBED_MODEL, "emb-a", gpu_memory="2.5GiB", keep_alive=0)
    launch(srv, CHAT_MODEL, "filler", gpu_memory="2.5GiB", keep_alive=-1, n_parallel=1, n_ctx=256)
    assert {replica(srv, "emb-a")["device"], replica(srv, "filler")["device"]} == {"gpu:0", "gpu:1"}
    left = replica(srv, "emb-a")["device"]
    [emb_pid] = pids_of(srv, "emb-a")

    # The transformers model fits only if emb-a makes room: emb-a is parked, its process stays.
    launch(srv, TINY, "tiny", gpu_memory="2.5GiB", keep_alive=0)
    assert replica(srv, "tiny")["device"] == left
    parked = replica(srv, "emb-a")
    assert described(srv, "emb-a")["status"] == "parked"
    assert parked["state"] == "parked" and parked["device"] is None and parked["parked_from"] == left
    assert parked["parked_bytes"] == int(2.5 * GiB) and parked["pid"] == emb_pid and alive(emb_pid)
    devices = {d["id"]: d for d in srv.http.get("/v1/cluster/devices").json()}
    assert [m["model_uid"] for m in devices[left]["models"]] == ["tiny"]
    assert metric(srv, "shoal_parked_replicas") == 1

    # A request for it waits while it wakes, and succeeds: same process, same GPU; tiny parks now.
    embed(srv, "emb-a")
    woken = replica(srv, "emb-a")
    assert woken["state"] == "ready" and woken["device"] == left and woken["pid"] == emb_pid
    assert woken["last_wake_seconds"] is not None and woken["last_woken"] is not None
    assert described(srv, "tiny")["status"] == "parked"
    assert metric(srv, "shoal_wake_seconds_count") >= 1
    [tiny_pid] = pids_of(srv, "tiny")

    # Host RAM holds one parked replica (3 GiB): parking emb-a again stops tiny, used less recently.
    launch(srv, CHAT_MODEL, "chat-b", gpu_memory="2.5GiB", keep_alive=0, n_parallel=1, n_ctx=256)
    assert described(srv, "emb-a")["status"] == "parked"
    assert described(srv, "tiny")["status"] == "evicted" and not alive(tiny_pid)
    assert metric(srv, "shoal_parked_replicas") == 1
    # ... and a request brings the stopped one back (a new process); chat-b (llama.cpp) cannot park,
    # so it is stopped to make room.
    chat(srv, "tiny")
    assert replica(srv, "tiny")["state"] == "ready" and pids_of(srv, "tiny") != [tiny_pid]
    assert described(srv, "chat-b")["status"] == "evicted"
    # The filler (llama.cpp, keep_alive -1) was never touched.
    assert replica(srv, "filler")["state"] == "ready"


def test_a_wake_goes_to_the_other_gpu_in_a_new_runner(park_server: ShoalServer) -> None:
    """Woken where there is room now: emb-a (parked by the test above, its process on the GPU it
    left, which tiny holds) wakes onto the other GPU once that is free, rather than park tiny: a new
    runner there, and the parked process is stopped. It leaves one model parked for the next test."""
    srv = park_server
    parked = replica(srv, "emb-a")
    assert parked["state"] == "parked", "the test above leaves emb-a parked"
    left, [old_pid] = parked["parked_from"], pids_of(srv, "emb-a")
    assert replica(srv, "tiny")["device"] == left
    other = replica(srv, "filler")["device"]
    assert srv.http.delete("/v1/models/filler").status_code == 200
    embed(srv, "emb-a")  # the request waits while it is placed again, on the free GPU
    woken = replica(srv, "emb-a")
    assert woken["state"] == "ready" and woken["device"] == other != left
    assert woken["pid"] != old_pid and woken["last_wake_seconds"] is not None
    assert described(srv, "tiny")["status"] == "ready"  # nothing was parked to make room
    gone_by = time.monotonic() + 30
    while alive(old_pid) and time.monotonic() < gone_by:
        time.sleep(0.1)
    assert not alive(old_pid)
    # a pinned launch that fits only if one of them parks: the next test needs a parked model
    launch(srv, CHAT_MODEL, "filler", gpu_memory="2.5GiB", keep_alive=-1, n_parallel=1, n_ctx=256)
    statuses = {uid: described(srv, uid)["status"] for uid in ("emb-a", "tiny")}
    assert sorted(statuses.values()) == ["parked", "ready"], statuses


def test_parked_model_survives_a_gateway_restart(park_server: ShoalServer) -> None:
    """The desired state keeps a parked model: after a restart it is launched again; its next
    request answers."""
    srv = park_server
    parked = [m["id"] for m in srv.http.get("/v1/models").json()["data"] if m["status"] == "parked"]
    assert parked, "the test above leaves one model parked"
    for model in srv.http.get("/v1/models").json()["data"]:
        if model["id"] not in parked:
            srv.http.delete(f"/v1/models/{model['id']}")
    srv.stop()
    srv.start()
    for uid in parked:  # alone now, it is placed again on a GPU
        assert wait_for(srv, uid, ("ready",)) == "ready"
    for uid in parked:
        if uid.startswith("emb"):
            embed(srv, uid)
        else:
            chat(srv, uid)
        assert replica(srv, uid)["state"] == "ready"
    clear(srv)


def wait_for(server: ShoalServer, uid: str, states: tuple[str, ...], timeout: float = 120) -> str:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = server.http.get(f"/v1/models/{uid}")
        if r.status_code == 200 and r.json()["status"] in states:
            return str(r.json()["status"])
        time.sleep(0.1)
    raise AssertionError(f"{uid} not in {states} within {timeout} s: {described(server, uid)}")


def test_a_defragmenting_move_between_two_gpus(park_server: ShoalServer) -> None:
    srv = park_server
    clear(srv)
    # gpu:0 holds a small idle model (within its keep-alive: never evicted); gpu:1 a
    # pinned-by-index LLM. A 3 GiB launch fits on neither, but does once the small one moves over.
    launch(srv, CHAT_MODEL, "small", gpu_memory="1GiB", keep_alive=300, n_parallel=1, n_ctx=256)
    launch(srv, CHAT_MODEL, "fixed", gpu_memory="2.5GiB", keep_alive=-1, gpu_idx=1, n_parallel=1, n_ctx=256)
    first = replica(srv, "small")
    assert first["device"] == "gpu:0" and replica(srv, "fixed")["device"] == "gpu:1"
    launch(srv, CHAT_MODEL, "big", gpu_memory="3GiB", keep_alive=-1, n_parallel=1, n_ctx=256)
    assert replica(srv, "big")["device"] == "gpu:0"
    wait_until_ready(srv, "small")
    moved = replica(srv, "small")
    assert moved["device"] == "gpu:1" and moved["pid"] != first["pid"]  # a new runner on the other GPU
    assert metric(srv, "shoal_moves_total") >= 1
    chat(srv, "small")
    devices = {d["id"]: d for d in srv.http.get("/v1/cluster/devices").json()}
    assert all(d["free_bytes"] >= 0 for d in devices.values())
    clear(srv)


def test_no_move_and_no_park_means_507_with_the_numbers(park_server: ShoalServer) -> None:
    """Within its keep-alive and with no GPU to move to, nothing makes room: the launch says why."""
    srv = park_server
    launch(srv, CHAT_MODEL, "stay", gpu_memory="3GiB", keep_alive=300, n_parallel=1, n_ctx=256)
    launch(srv, CHAT_MODEL, "fixed", gpu_memory="3GiB", keep_alive=-1, n_parallel=1, n_ctx=256)
    r = srv.http.post(
        "/v1/models", json={"model_name": CHAT_MODEL, "model_uid": "none", "gpu_memory": "3GiB"}
    )
    assert r.status_code == 507, r.text
    assert "stay/0 (idle" in r.json()["error"]["message"]
    assert described(srv, "stay")["status"] == "ready"
    clear(srv)
