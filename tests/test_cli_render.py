"""`shoal gpus` rendering, from hand-written GET /v1/cluster/devices and GET /v1/workers answers: flat
on one machine, grouped by node on a Ray cluster (a node that left the cluster still shown). The same
answers feed the UI's GPUs page in test_ui_browser.py."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console

from shoal import cli
from shoal.cli import devices_table, group_by_node

GIB = 1024**3
COLUMNS = ["DEVICE", "NAME", "TOTAL GiB", "OTHERS GiB", "RESERVED GiB", "FREE GiB", "MODELS"]


def _device(
    node: str | None, local: str, total: int, models: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    reserved = sum(m["reserved_bytes"] for m in models or [])
    return {
        "id": f"{node}/{local}" if node else local,
        "node": node,
        "kind": "cpu" if local == "cpu" else "gpu",
        "index": 0 if local == "cpu" else int(local.split(":")[1]),
        "name": "CPU" if local == "cpu" else "Fake GPU",
        "total_bytes": total,
        "used_by_others_bytes": 0,
        "reserved_bytes": reserved,
        "headroom_bytes": 0,
        "free_bytes": total - reserved,
        "cores": 8 if local == "cpu" else None,
        "fake": local != "cpu",
        "models": models or [],
    }


def _replica(uid: str, index: int, reserved: int) -> dict[str, Any]:
    return {"model_uid": uid, "index": index, "state": "ready", "reserved_bytes": reserved,
            "estimate_bytes": reserved, "measured_bytes": None, "over_reservation": False, "in_flight": 0,
            "idle_seconds": 5.0, "breakdown": {"weights": reserved, "total": reserved}}  # fmt: skip


def _worker(node: str, ip: str, alive: bool, devices: list[str], runners: int) -> dict[str, Any]:
    return {"node": node, "node_id": node.removeprefix("node-") * 7, "worker_ip": ip, "alive": alive,
            "devices": devices, "runners": runners}  # fmt: skip


# Two nodes up (one with a replica on its GPU) and one that left: its devices are gone from the list.
RAY_DEVICES = [
    _device("node-aa11aa11", "gpu:0", 24 * GIB, [_replica("chat", 0, 6 * GIB)]),
    _device("node-aa11aa11", "cpu", 64 * GIB),
    _device("node-bb22bb22", "gpu:0", 16 * GIB, [_replica("chat", 1, 6 * GIB)]),
    _device("node-bb22bb22", "gpu:1", 16 * GIB),
]
RAY_WORKERS = [
    _worker("node-aa11aa11", "10.0.0.1", True, ["node-aa11aa11/gpu:0", "node-aa11aa11/cpu"], 1),
    _worker("node-cc33cc33", "10.0.0.3", False, ["node-cc33cc33/gpu:0"], 0),
    _worker("node-bb22bb22", "10.0.0.2", True, ["node-bb22bb22/gpu:0", "node-bb22bb22/gpu:1"], 1),
]
LOCAL_DEVICES = [
    _device(None, "gpu:0", 24 * GIB, [_replica("chat", 0, 6 * GIB)]),
    _device(None, "cpu", 64 * GIB),
]
LOCAL_WORKERS = [{"node": "local", "node_id": None, "worker_ip": "127.0.0.1", "alive": True,
                  "devices": ["gpu:0", "cpu"], "runners": 1}]  # fmt: skip


def _text(devices: list[dict[str, Any]], workers: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(devices_table(devices, workers))
    return out.getvalue()


def test_gpus_groups_devices_by_node_and_keeps_a_node_that_left() -> None:
    groups = group_by_node(RAY_DEVICES, RAY_WORKERS)
    assert groups is not None
    # In the workers' order, each device under its node by its id on that node.
    assert [(g.node, g.worker_ip, g.state) for g in groups] == [
        ("node-aa11aa11", "10.0.0.1", "up"),
        ("node-cc33cc33", "10.0.0.3", "down"),
        ("node-bb22bb22", "10.0.0.2", "up"),
    ]
    assert [[local for local, _ in g.devices] for g in groups] == [["gpu:0", "cpu"], [], ["gpu:0", "gpu:1"]]
    assert [d["id"] for _, d in groups[2].devices] == ["node-bb22bb22/gpu:0", "node-bb22bb22/gpu:1"]
    assert groups[1].empty_note == "left the cluster"

    text = _text(RAY_DEVICES, RAY_WORKERS)
    header = text.splitlines()[1]
    assert header.split("┃")[1].strip() == "NODE" and "DEVICE" in header
    assert "node-aa11aa11/" not in text  # the node is in its own column, not in the device id
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if line.startswith("│")}
    assert "gpu:0" in rows["node-aa11aa11"] and "chat/0 6.00" in rows["node-aa11aa11"]
    assert "left the cluster" in rows["node-cc33cc33"]
    assert "10.0.0.3 down" in rows and "10.0.0.1 up" in rows and "10.0.0.2 up" in rows
    assert text.index("node-aa11aa11") < text.index("node-cc33cc33") < text.index("node-bb22bb22")


def test_gpus_device_of_a_node_not_yet_among_the_workers_gets_its_own_group() -> None:
    joined = _device("node-dd44dd44", "gpu:0", 8 * GIB)
    groups = group_by_node([*RAY_DEVICES, joined], RAY_WORKERS)
    assert groups is not None
    assert (groups[-1].node, groups[-1].worker_ip, groups[-1].state) == ("node-dd44dd44", None, "up")
    assert [local for local, _ in groups[-1].devices] == ["gpu:0"]
    # Every node down: no devices left, the nodes are still listed.
    dead = [{**w, "alive": False} for w in RAY_WORKERS]
    groups = group_by_node([], dead)
    assert groups is not None and [g.devices for g in groups] == [[], [], []]
    assert "left the cluster" in _text([], dead)


def test_gpus_on_one_machine_is_one_flat_table() -> None:
    assert group_by_node(LOCAL_DEVICES, LOCAL_WORKERS) is None
    assert group_by_node(LOCAL_DEVICES, []) is None
    text = _text(LOCAL_DEVICES, LOCAL_WORKERS)
    assert [c.strip() for c in text.splitlines()[1].split("┃")[1:-1]] == COLUMNS
    rows = [line.split("│")[1:-1] for line in text.splitlines() if line.startswith("│")]
    assert [[c.strip() for c in r[:2]] for r in rows] == [["gpu:0", "Fake GPU (fake)"], ["cpu", "CPU"]]
    assert rows[0][-1].strip() == "chat/0 6.00"
    assert "NODE" not in text and "local" not in text


def test_ps_renders_every_state() -> None:
    """A launch that could not be placed has replicas with no device and no pid; ps still renders."""
    from shoal.cli import models_table

    failed = {"id": "big", "model_name": "m", "model_type": "LLM", "model_engine": "llama.cpp",
              "status": "failed", "replica": 2,
              "replicas": [{"index": 0, "state": "failed", "device": None, "pid": None},
                           {"index": 1, "state": "starting", "device": "gpu:0", "pid": 42}]}  # fmt: skip
    sparse = {"id": "x", "status": "loading", "replicas": []}
    out = io.StringIO()
    Console(file=out, width=200).print(models_table([failed, sparse]))
    text = out.getvalue()
    assert "big" in text and "failed" in text and "-,gpu:0" in text and "-,42" in text
    assert "loading" in text


def test_ps_shows_parked_replicas_and_their_last_wake() -> None:
    from shoal.cli import models_table

    parked = {"id": "emb", "status": "parked", "replicas": [
        {"index": 0, "state": "parked", "device": None, "parked_from": "gpu:1", "pid": 7,
         "last_wake_seconds": 0.214, "last_woken": 0.0}]}  # fmt: skip
    out = io.StringIO()
    Console(file=out, width=200).print(models_table([parked]))
    text = out.getvalue()
    assert "parked" in text and "RAM (from gpu:1)" in text and "0.21 s at" in text


def test_launch_shows_the_copies_to_nodes_under_way() -> None:
    copying = {"status": "copying", "node": "node-b", "completed_bytes": 3 * 2**20, "total_bytes": 12 * 2**20,
               "rate_bytes_per_s": 2**21}  # fmt: skip
    state = {"replicas": [{"files": copying}, {"files": None}, {"files": {**copying, "status": "copied"}}]}
    assert cli._copies(state) == " (copying to node-b: 25%, 2 MiB/s)"
    assert cli._copies({"replicas": [{"files": None}]}) == ""
    downloading = {**copying, "status": "downloading", "node": "node-c", "rate_bytes_per_s": None}
    assert cli._copies({"replicas": [{"files": downloading}]}) == " (downloading on node-c: 25%)"
