"""Model files for Ray nodes (shoal.cluster.files) without Ray: the manifest, the chunks, and a node
cache that finds, receives and completes a copy; and a node's agent (a plain class here) fetching a
hub model itself from tests/hubserver.py on loopback, with the gateway's endpoint."""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from shoal.catalog.specs import Source
from shoal.cluster import files
from shoal.cluster.agent import NodeAgent
from shoal.hub.download import HubFiles
from shoal.hub.remote import RemoteFile
from shoal.runners.config import RunnerConfig
from shoal.settings import ServerSettings
from test_hubs import GGUF, GGUF_NAME, Hub, make_repos


def make_model(root: Path) -> Path:
    folder = root / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text('{"a": 1}')
    (folder / "sub" / "weights.bin").write_bytes(os.urandom(files.CHUNK * 2 + 5))
    (folder / "empty.txt").write_bytes(b"")
    return folder


def send(cache: Path, m: files.Manifest, seen_as: files.Manifest | None = None) -> str:
    """What the gateway and a node's agent do; `seen_as`: the manifest as a node that cannot see
    the gateway's path gets it (same files, another root)."""
    target = seen_as or m
    for rel, offset, data in files.chunks(m):
        files.write_chunk(cache, target, rel, offset, data)
    return files.finish(cache, target)


def test_a_folder_is_copied_whole_and_found_again(tmp_path: Path) -> None:
    folder = make_model(tmp_path)
    m = files.manifest(folder)
    assert {rel for rel, _, _ in m.files} == {"config.json", "sub/weights.bin", "empty.txt"}
    assert [offset for rel, offset, _ in files.chunks(m) if rel == "sub/weights.bin"] == [
        0, files.CHUNK, 2 * files.CHUNK,
    ]  # fmt: skip
    # A node that sees the same files (this host) loads them in place.
    assert files.find(tmp_path / "cache", m) == str(folder)
    # A node that does not: nothing in its cache yet, then a whole copy.
    hidden = files.Manifest(str(tmp_path / "elsewhere" / "model"), m.files, m.key)
    cache = tmp_path / "cache"
    assert files.find(cache, hidden) is None
    copy = Path(send(cache, m, seen_as=hidden))
    for rel, _, _ in m.files:
        assert (copy / rel).read_bytes() == (folder / rel).read_bytes()
    assert files.find(cache, hidden) == str(copy)


def test_a_changed_file_gets_a_new_key_and_a_single_file_works(tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + os.urandom(100))
    first = files.manifest(gguf)
    assert [rel for rel, _, _ in first.files] == [""]
    copy = Path(send(tmp_path / "cache", first))
    assert copy.name == "model.gguf" and copy.read_bytes() == gguf.read_bytes()
    gguf.write_bytes(b"GGUF" + os.urandom(100))
    os.utime(gguf, ns=(1, 1))
    assert files.manifest(gguf).key != first.key


def test_an_incomplete_copy_is_refused(tmp_path: Path) -> None:
    folder = make_model(tmp_path)
    m = files.manifest(folder)
    rel, offset, data = next(files.chunks(m))
    files.write_chunk(tmp_path / "cache", m, rel, offset, data)
    with pytest.raises(OSError, match="incomplete"):
        files.finish(tmp_path / "cache", m)
    assert files.find(tmp_path / "cache", files.Manifest("/nonexistent/model", m.files, m.key)) is None


def test_the_cache_listing_shows_finished_and_unfinished_copies(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert files.listing(cache) == []  # no cache folder yet
    folder = make_model(tmp_path)
    m = files.manifest(folder)
    copied = send(cache, m)
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF" + os.urandom(1000))
    o = files.manifest(other)
    rel, offset, data = next(files.chunks(o))
    files.write_chunk(cache, o, rel, offset, data[:10])  # a copy still arriving
    listed = {entry["key"]: entry for entry in files.listing(cache)}
    assert listed[m.key] == {
        "key": m.key, "source": str(folder), "path": copied, "bytes": m.total_bytes, "complete": True,
    }  # fmt: skip
    assert listed[o.key]["complete"] is False and listed[o.key]["source"] is None
    assert listed[o.key]["bytes"] == 10 and listed[o.key]["path"] is None


def test_a_new_copy_of_changed_files_removes_the_old_one_unless_in_use(tmp_path: Path) -> None:
    cache, model = tmp_path / "cache", tmp_path / "model.gguf"
    model.write_bytes(b"GGUF" + os.urandom(100))
    first = files.manifest(model)
    old = send(cache, first)
    model.write_bytes(b"GGUF" + os.urandom(200))  # the file changed: a new copy
    second = files.manifest(model)
    assert second.key != first.key
    new = send(cache, second)
    assert files.prune(cache, second, in_use={old}) == []  # a runner still loads the old one
    assert files.prune(cache, second, in_use=set()) == [old]
    assert [entry["path"] for entry in files.listing(cache)] == [new]
    assert files.find(cache, second) == str(model)  # this host sees the files in place


def test_copy_progress_reports_bytes_rate_and_eta() -> None:
    progress = files.CopyProgress("node-a", "/models/m", total=100, started=time.monotonic() - 1)
    progress.done = 25
    shown = progress.progress()
    assert shown["status"] == "copying" and shown["node"] == "node-a"
    assert (shown["completed_bytes"], shown["total_bytes"]) == (25, 100)
    assert shown["rate_bytes_per_s"] > 0 and shown["eta_s"] > 0
    progress.done, progress.ended = 100, progress.started + 2
    done = progress.progress()
    assert (done["status"], done["rate_bytes_per_s"], done["eta_s"], done["seconds"]) == (
        "copied",
        50,
        0.0,
        2.0,
    )
    progress.error = "OSError: disk full"
    assert progress.progress()["status"] == "failed"


def test_a_node_agent_fetches_a_hub_model_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_repos(tmp_path / "repos")
    hub = Hub(tmp_path / "repos", tmp_path / "hub.log")
    hub.start()
    monkeypatch.setenv("SHOAL_MODEL_CACHE", str(tmp_path / "node"))
    agent = NodeAgent("127.0.0.1")
    try:
        info = httpx.get(f"{hub.url}/api/models/test-org/smollm2-gguf", trust_env=False).json()
        readme = next(s for s in info["siblings"] if s["rfilename"] == "README.md")
        want = HubFiles("hf.co/test-org/smollm2-gguf", "huggingface", "test-org/smollm2-gguf", info["sha"],
                        "main", "README.md", (RemoteFile("README.md", readme["size"]),), hub.url, None,
                        offline=False, disk_headroom=0, probe_timeout=5.0)  # fmt: skip
        path, how, why = agent.fetch_hub(want, None)
        assert (how, why) == ("hub", "")
        snapshot = tmp_path / "node" / "hub" / "models--test-org--smollm2-gguf" / "snapshots" / info["sha"]
        assert path == str(snapshot / "README.md") and Path(path).read_text() == "SmolLM2 135M, Q4_1\n"
        assert [g[0] for g in hub.stats()["gets"]] == ["test-org/smollm2-gguf/README.md"]
        # again: the node's own cache, no request
        hub.post("/_reset")
        assert agent.fetch_hub(want, None) == (path, "cache", "")
        assert hub.stats()["requests"] == 1  # this /_stats call
        listed = agent.cached()
        assert listed["copies"] == []  # the hub folder is not a copy of the gateway's files
        (entry,) = listed["hub"]
        assert (entry["name"], entry["size_bytes"], entry["files"]) == (want.name, readme["size"], 1)

        # a repo not cached here, from a hub this node cannot reach, or offline: the gateway's copy
        other = replace(want, repo="test-org/minilm", endpoint="http://127.0.0.1:1")  # nothing listens
        path, how, why = agent.fetch_hub(other, None)
        assert (path, how) == (None, "unreachable") and "could not be reached" in why
        assert agent.fetch_hub(replace(other, offline=True), None)[:2] == (None, "unreachable")
        # ...unless it sees the gateway's files in place (the same host, or shared storage)
        gateway = files.manifest(tmp_path / "repos" / "test-org" / "minilm")
        assert agent.fetch_hub(other, gateway) == (gateway.root, "gateway", "")
        # a repo the hub does not have fails there: a copy would not help
        missing = replace(want, repo="test-org/nope")
        path, how, why = agent.fetch_hub(missing, None)
        assert (path, how) == (None, "failed") and "test-org/nope" in why
        assert agent.poll()["downloads"] == {}  # none under way
    finally:
        agent.close()
        hub.kill()


def test_progress_says_where_a_nodes_files_come_from() -> None:
    progress = files.CopyProgress("node-a", "hf.co/o/r", total=10, via="hub")
    assert progress.progress()["status"] == "downloading"
    progress.done, progress.ended, progress.path = 10, time.monotonic(), "/cache/hub/x"
    shown = progress.progress()
    assert (shown["status"], shown["from"], shown["path"]) == ("downloaded", "hub", "/cache/hub/x")
    progress.via = "cache"
    assert progress.progress()["status"] == "cached" and progress.progress()["rate_bytes_per_s"] is None


def test_tracked_progress_is_listed_while_under_way_and_records_how_it_ended() -> None:
    under_way: dict[tuple[str, str], files.CopyProgress] = {}
    key = ("node-a", "k")
    with files.tracked(under_way, key, files.CopyProgress("node-a", "/m", total=5)) as progress:
        assert under_way == {key: progress} and progress.ended is None
        progress.done = 5
    assert under_way == {} and progress.ended is not None and progress.error is None
    assert progress.progress()["status"] == "copied"
    with pytest.raises(OSError, match="disk full"):
        with files.tracked(under_way, key, files.CopyProgress("node-a", "/m", total=5)) as failed:
            raise OSError("disk full")
    assert under_way == {} and failed.ended is not None and failed.error == "OSError: disk full"
    assert failed.progress()["status"] == "failed"


def test_a_node_whose_hub_accepts_but_never_answers_falls_back_after_the_probe_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stale or black-holed hub endpoint: the node's first request gives up after
    SHOAL_HUB_PROBE_TIMEOUT (not huggingface_hub's 10 s), so the gateway's copy is used soon."""
    monkeypatch.setenv("SHOAL_MODEL_CACHE", str(tmp_path / "node"))
    monkeypatch.setenv("SHOAL_HUB_PROBE_TIMEOUT", "0.5")
    probe = ServerSettings().hub_probe_timeout
    assert probe == 0.5
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    held: list[socket.socket] = []  # connections accepted, never read from nor answered

    def accept() -> None:
        while True:
            try:
                held.append(silent.accept()[0])
            except OSError:  # closed: the test is over
                return

    threading.Thread(target=accept, daemon=True).start()
    agent = NodeAgent("127.0.0.1")
    try:
        want = HubFiles("hf.co/test-org/minilm", "huggingface", "test-org/minilm", "0" * 40, "main",
                        "", (RemoteFile("config.json", 10),), f"http://127.0.0.1:{silent.getsockname()[1]}",
                        None, offline=False, disk_headroom=0, probe_timeout=probe)  # fmt: skip
        path, how, why = agent.fetch_hub(want, None)
        assert (path, how) == (None, "unreachable"), why
        assert "no answer within 0.5 s (SHOAL_HUB_PROBE_TIMEOUT)" in why and "config.json" in why
        assert held  # it did connect: the hub accepted, then said nothing
        assert not (tmp_path / "node" / "hub" / "models--test-org--minilm" / "snapshots").exists()
        assert agent.poll()["downloads"] == {}
    finally:
        agent.close()
        silent.close()
        for conn in held:
            conn.close()


def wait_healthy(listen: str) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"http://{listen}/health", timeout=5, trust_env=False).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"the runner on {listen} did not come up"
        time.sleep(0.1)


def test_a_node_agent_removes_a_hub_model_unless_a_runner_there_uses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `shoal rm-cache` asks each Ray node: its own hub download of the repo, and its copies of
    the gateway's files of it, go; a live runner loading from them there refuses it."""
    make_repos(tmp_path / "repos")
    hub = Hub(tmp_path / "repos", tmp_path / "hub.log")
    hub.start()
    node = tmp_path / "node"
    monkeypatch.setenv("SHOAL_MODEL_CACHE", str(node))
    agent = NodeAgent("127.0.0.1")
    try:
        info = httpx.get(f"{hub.url}/api/models/test-org/smollm2-gguf", trust_env=False).json()
        size = GGUF.stat().st_size
        want = HubFiles("hf.co/test-org/smollm2-gguf", "huggingface", "test-org/smollm2-gguf", info["sha"],
                        "main", GGUF_NAME, (RemoteFile(GGUF_NAME, size),), hub.url, None,
                        offline=False, disk_headroom=0, probe_timeout=5.0)  # fmt: skip
        path, how, _ = agent.fetch_hub(want, None)
        assert how == "hub" and path is not None
        config = RunnerConfig(model_uid="held", replica=0, engine="llama.cpp", model_format="ggufv2",
                              source=Source(path=path), options={"n_ctx": 512, "n_parallel": 1},
                              n_threads=1, socket="", status_file="")  # fmt: skip
        pid, listen = agent.spawn(config.model_dump_json(), {"HF_HUB_OFFLINE": "1"}, "held.log", [], "t1")
        wait_healthy(listen)
        # the gateway asks first (dry_run), then removes; either way a runner here holds it
        for dry_run in (True, False):
            refused = agent.remove_hub("huggingface", "test-org/smollm2-gguf", None, dry_run)
            assert refused["status"] == "in use" and refused["pids"] == [pid], refused
        assert Path(path).is_file()
        agent.stop(pid)
        would = agent.remove_hub("huggingface", "test-org/smollm2-gguf", None, dry_run=True)
        assert would["status"] == "cached" and would["bytes"] >= size and Path(path).is_file()
        removed = agent.remove_hub("huggingface", "test-org/smollm2-gguf", None)
        folder = node / "hub" / "models--test-org--smollm2-gguf"
        assert removed == {"status": "removed", "removed": [str(folder)], "bytes": would["bytes"], "pids": []}
        assert not folder.exists() and agent.cached()["hub"] == []
        assert agent.remove_hub("huggingface", "test-org/smollm2-gguf", None)["status"] == "not cached"

        # a copy of the gateway's files of a repo (a node that could not reach the hub) goes too
        gateway_repo = tmp_path / "gateway" / "hub" / "models--test-org--minilm"
        snapshot = gateway_repo / "snapshots" / ("1" * 40)
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").write_text('{"a": 1}')
        m = files.manifest(snapshot)
        for rel, offset, data in files.chunks(m):
            agent.write_chunk(m, rel, offset, data)
        copy = agent.finish_files(m)
        assert agent.remove_hub("huggingface", "test-org/minilm", None)["status"] == "not cached"
        other = agent.remove_hub("huggingface", "test-org/minilm", str(gateway_repo))
        assert other["status"] == "removed" and other["removed"] == [str(node / m.key)]
        assert not Path(copy).exists() and agent.cached()["copies"] == []
    finally:
        agent.close()
        hub.kill()
