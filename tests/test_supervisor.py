"""The model service and its supervisor over a fake Host with an explicit clock: no processes, no
sleeps. The launches are real (catalog, estimate, pure scheduler, ledger); only where runners live is
stood in for, which is the seam the Host protocol exists for."""

from __future__ import annotations

import asyncio
import errno
import logging
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from shoal.catalog import Catalog
from shoal.devices import Device, Snapshot
from shoal.errors import IllegalTransition
from shoal.protocol.admin import LaunchRequest
from shoal.runners.config import RunnerConfig
from shoal.scheduler import Demand, DeviceState
from shoal.services.ledger import Reservation
from shoal.services.models import ModelService
from shoal.services.replicas import Replica, ReplicaState, move
from shoal.services.supervisor import SAMPLE_EVERY, STEP_DEADLINE
from shoal.settings import ServerSettings
from shoal.state import StateStore

GiB = 1024**3
MODEL = "all-MiniLM-L6-v2"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeRunner:
    def __init__(self, config: RunnerConfig, pid: int) -> None:
        self.config = config
        self.pid = pid
        self.exit: int | None = None
        self.answers = True  # False: pings fail at once; None: pings never come back (hung)
        self.killed = False
        self.stopped = False
        self.unreadable: OSError | None = None  # set: asking whether it exited raises this
        self._never = asyncio.Event()

    @property
    def session(self) -> Any:
        raise AssertionError("the supervisor talks to runners only through ping()")

    @property
    def node_lost(self) -> bool:
        return False

    def exited(self) -> int | None:
        if self.unreadable is not None:
            raise self.unreadable
        return self.exit

    def failure_reason(self) -> str:
        return f"runner exited with code {self.exit}"

    def files_progress(self) -> dict[str, Any] | None:
        return None

    async def start(self) -> None:
        pass

    async def wait_ready(self, timeout: float) -> None:
        pass

    async def ping(self, timeout: float) -> bool:
        if self.answers is None:
            await self._never.wait()
        return bool(self.answers)

    async def kill(self) -> None:
        self.killed, self.exit = True, -9

    async def stop(self, grace: float = 5.0) -> None:
        self.stopped = True
        if self.exit is None:
            self.exit = 0


class FakeHost:
    fetches_hub_files = False
    one_machine = True

    def __init__(self) -> None:
        self.runners: list[FakeRunner] = []
        self.broken: OSError | None = None
        self.hang: threading.Event | None = None  # set: snapshot() blocks until the event is set
        self.hanging = threading.Event()  # set once a snapshot() call is blocked on `hang`
        self.snapshots = 0

    async def start(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass

    def snapshot(self) -> Snapshot:
        self.snapshots += 1
        if self.hang is not None:
            self.hanging.set()
            self.hang.wait()  # as an NVML call or a /proc read that never returns
        if self.broken is not None:
            raise self.broken
        cpu = Device("cpu", "cpu", 0, "cpu", 16 * GiB, 1 * GiB, cores=4)
        return Snapshot([cpu], {}, {("cpu", r.pid): 100 * 2**20 for r in self.runners}, taken=0)

    async def refresh(self) -> None:
        pass

    def runner(
        self,
        device_id: str,
        config: RunnerConfig,
        env: dict[str, str],
        log_name: str,
        cores: tuple[int, ...],
        hub: object = None,  # (the hub files are in this machine's cache by now)
    ) -> FakeRunner:
        self.runners.append(FakeRunner(config, 4000 + len(self.runners)))
        return self.runners[-1]

    def restrict(self, demand: Demand, worker_ip: str | None, states: list[DeviceState]) -> Demand:
        return demand

    def workers(self, runners: int) -> list[dict[str, Any]]:
        return []


class World:
    def __init__(self, tmp: Path, **settings: Any) -> None:
        self.clock = Clock()
        self.host = FakeHost()
        store = StateStore(tmp / "shoal.db")
        options = {"liveness_interval": 2.0, "liveness_timeout": 10.0, "max_restarts": 3, **settings}
        self.service = ModelService(
            Catalog(store), ServerSettings(data_dir=tmp, **options), store, self.host, self.clock
        )

    async def launch(self, uid: str = "m", **options: Any) -> Replica:
        model = await self.service.launch(LaunchRequest(model_name=MODEL, model_uid=uid, **options))
        return model.replicas[0]

    async def tick(self, advance: float = 0.0, settle: bool = True) -> None:
        """One supervisor tick at clock() + advance; `settle`: wait for the steps it started (memory
        sampling runs in a thread) to end, as the loop's next tick would find them ended."""
        self.clock.advance(advance)
        await self.service.supervisor.tick()
        running = list(self.service.supervisor.running.values())
        if settle and running:
            await asyncio.wait(running)
        for _ in range(20):  # let the tasks the tick started (pings, restarts) run to their end
            await asyncio.sleep(0)


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


def test_a_dead_runner_is_restarted_after_its_backoff(tmp_path: Path) -> None:
    async def go() -> None:
        w = World(tmp_path)
        replica = await w.launch()
        first = w.host.runners[0]
        assert replica.state is ReplicaState.READY
        first.exit = -9  # SIGKILL
        await w.tick()
        assert replica.state is ReplicaState.RESTARTING and replica.reservation is not None
        assert replica.crashes == 1 and "code -9" in (replica.last_error or "")
        await w.tick(0.2)  # backoff 0.5 s not over: no new runner yet
        assert len(w.host.runners) == 1
        await w.tick(0.4)
        assert len(w.host.runners) == 2 and replica.runner is w.host.runners[1]
        assert replica.state is ReplicaState.READY

    run(go())


def test_a_hung_runner_is_killed_and_restarted(tmp_path: Path) -> None:
    async def go() -> None:
        w = World(tmp_path)
        replica = await w.launch()
        hung = w.host.runners[0]
        hung.answers = None  # SIGSTOP: its pings never come back
        for _ in range(5):
            await w.tick(2.0)
            assert replica.state is ReplicaState.READY and not hung.killed  # 10 s not over yet
        await w.tick(0.5)  # 10.5 s without an answer
        assert hung.killed and replica.state is ReplicaState.RESTARTING
        assert "did not answer /health" in (replica.last_error or "")
        await w.tick(0.6)
        assert replica.state is ReplicaState.READY and replica.runner is w.host.runners[1]

    run(go())


def test_a_runner_that_answers_is_never_killed(tmp_path: Path) -> None:
    async def go() -> None:
        w = World(tmp_path)
        replica = await w.launch()
        for _ in range(100):  # 100 s of ticks, a ping answered every 2 s
            await w.tick(1.0)
        assert replica.state is ReplicaState.READY and not w.host.runners[0].killed
        assert len(w.host.runners) == 1

    run(go())


def test_a_failing_step_is_logged_once_and_supervision_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def go() -> None:
        w = World(tmp_path)
        replica = await w.launch()
        w.host.broken = OSError(errno.EMFILE, "Too many open files")  # as under descriptor exhaustion
        w.host.runners[0].exit = -9
        with caplog.at_level(logging.ERROR, logger="shoal.supervisor"):
            for _ in range(10):
                await w.tick(SAMPLE_EVERY)
        failures = [r for r in caplog.records if "failed (it goes on)" in r.getMessage()]
        assert len(failures) == 1 and "Too many open files" in failures[0].getMessage()
        # the dead runner was still restarted while memory sampling failed
        assert replica.state is ReplicaState.READY and len(w.host.runners) == 2
        health = w.service.supervisor.health()
        assert health["memory_sampling"]["stale"] and health["memory_sampling"]["failing"]
        assert not health["supervision"]["stale"] and health["errors"] >= 5
        w.host.broken = None
        await w.tick(SAMPLE_EVERY)
        health = w.service.supervisor.health()
        assert not health["memory_sampling"]["stale"] and health["memory_sampling"]["failing"] is None

    run(go())


def test_a_hung_snapshot_is_counted_once_and_a_killed_runner_is_still_restarted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def go() -> None:
        w = World(tmp_path)
        replica = await w.launch()
        w.host.hang, before = threading.Event(), w.host.snapshots
        try:
            with caplog.at_level(logging.ERROR, logger="shoal.supervisor"):
                await w.tick(SAMPLE_EVERY, settle=False)  # the sample starts and never returns
                assert await asyncio.to_thread(w.host.hanging.wait, 60)  # (its thread is in it)
                assert w.host.snapshots == before + 1
                w.host.runners[0].exit = -9  # SIGKILL, while the sample hangs
                for _ in range(int(STEP_DEADLINE["memory"] / 0.2) + 10):
                    await w.tick(0.2, settle=False)
                assert replica.state is ReplicaState.READY and len(w.host.runners) == 2
                assert w.host.snapshots == before + 1  # no second sample piled up behind the hung one
            hung = [r for r in caplog.records if "memory" in r.getMessage() and "hung" in r.getMessage()]
            assert len(hung) == 1, [r.getMessage() for r in caplog.records]
            health = w.service.supervisor.health()
            assert health["memory_sampling"]["stale"] and "hung" in health["memory_sampling"]["failing"]
            assert not health["supervision"]["stale"] and health["errors"] == 1
        finally:
            w.host.hang.set()
        w.host.hang = None
        await w.tick(0.2)  # the hung call returned: the next sample starts and succeeds
        await w.tick(SAMPLE_EVERY)
        assert w.host.snapshots > before + 1
        assert not w.service.supervisor.health()["memory_sampling"]["stale"]

    run(go())


def test_a_failing_runners_step_is_stale_while_memory_sampling_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def go() -> None:
        w = World(tmp_path)
        replica = await w.launch()
        w.host.runners[0].unreadable = OSError(errno.EMFILE, "Too many open files")
        with caplog.at_level(logging.WARNING, logger="shoal.supervisor"):
            for _ in range(10):
                await w.tick(SAMPLE_EVERY)
            failures = [r for r in caplog.records if "'runners' failed" in r.getMessage()]
            assert len(failures) == 1 and "Too many open files" in failures[0].getMessage()
            health = w.service.supervisor.health()
            assert health["supervision"]["stale"]
            assert "Too many open files" in health["supervision"]["failing"]
            assert not health["memory_sampling"]["stale"] and health["errors"] >= 10
            w.host.runners[0].unreadable = None
            w.host.runners[0].exit = -9
            await w.tick(0.2)
            assert replica.state is ReplicaState.RESTARTING  # checks work again
        assert any("'runners' works again" in r.getMessage() for r in caplog.records)
        assert not w.service.supervisor.health()["supervision"]["stale"]

    run(go())


def test_health_is_stale_when_the_loop_stops_ticking(tmp_path: Path) -> None:
    async def go() -> None:
        w = World(tmp_path)
        await w.tick()
        assert not w.service.supervisor.health()["supervision"]["stale"]
        w.clock.advance(60)
        health = w.service.supervisor.health()
        assert health["supervision"]["stale"] and health["supervision"]["seconds_ago"] == 60

    run(go())


def test_fast_crashes_past_max_restarts_fail_the_replica_and_free_its_memory(tmp_path: Path) -> None:
    async def go() -> None:
        w = World(tmp_path, max_restarts=2)
        replica = await w.launch()
        for _ in range(3):
            assert replica.state is ReplicaState.READY
            replica.runner.exit = 1  # type: ignore[union-attr]
            await w.tick(0.1)
            await w.tick(31)  # past any backoff
        assert replica.state is ReplicaState.FAILED and replica.reservation is None
        assert w.service.get("m").status == "failed"

    run(go())


def test_a_failed_launch_leaves_its_uid_free(tmp_path: Path) -> None:
    async def go() -> None:
        w = World(tmp_path, max_restarts=0)
        replica = await w.launch()
        replica.runner.exit = 1  # type: ignore[union-attr]
        await w.tick()
        assert w.service.get("m").status == "failed"
        again = await w.launch()  # not a 409: the failed entry gives its uid up
        assert again.state is ReplicaState.READY and w.service.get("m").replicas[0] is again

    run(go())


def test_terminate_stops_the_runner_and_frees_the_uid(tmp_path: Path) -> None:
    async def go() -> None:
        w = World(tmp_path)
        replica = await w.launch()
        await w.service.terminate("m")
        assert w.host.runners[0].stopped and replica.state is ReplicaState.STOPPED
        assert replica.reservation is None
        await w.tick(5)  # a stopped replica is not restarted
        assert len(w.host.runners) == 1

    run(go())


def test_a_lease_is_given_back_on_every_way_out(tmp_path: Path) -> None:
    async def go() -> None:
        w = World(tmp_path)
        replica = await w.launch(request_limits=1)
        with pytest.raises(RuntimeError):
            async with w.service.router.lease("m") as leased:
                assert leased is replica and replica.in_flight == 1
                raise RuntimeError("the client went away")
        assert replica.in_flight == 0
        async with w.service.router.lease("m"):  # the only slot is free again
            assert replica.in_flight == 1

    run(go())


def test_the_lifecycle_refuses_illegal_moves() -> None:
    replica = Replica(0, state=ReplicaState.STOPPED)
    with pytest.raises(IllegalTransition):
        move(replica, ReplicaState.READY)
    replica = Replica(0, state=ReplicaState.READY, reservation=Reservation(("cpu",), GiB, {}))
    assert move(replica, ReplicaState.EVICTED) and replica.reservation is None


def test_a_spike_given_back_does_not_keep_the_room() -> None:
    r = Reservation(("gpu:0",), estimate=2 * GiB, breakdown={})
    assert r.record(7 * GiB)  # goes over: flagged once
    assert r.reserved == 7 * GiB and r.over
    assert not r.record(7 * GiB)
    r.record(GiB)  # the runner gave it back
    assert r.reserved == 2 * GiB and not r.over and r.peak == 7 * GiB


def _errors_counted(metrics_text: str, step: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith(f'shoal_supervisor_errors_total{{step="{step}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_ready_names_a_stale_step_and_metrics_count_its_errors(tmp_path: Path) -> None:
    """The gateway's own /ready and /metrics routes (build_app, served in process over ASGI) over
    a service whose runner checks fail."""
    import httpx

    from shoal.gateway.app import build_app

    async def go() -> None:
        w = World(tmp_path)
        await w.launch()
        app = build_app(ServerSettings(data_dir=tmp_path))
        app.state.models = w.service  # what its lifespan would set, over the fake Host
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shoal") as client:
            await w.tick(SAMPLE_EVERY)
            assert (await client.get("/ready")).status_code == 200
            before = _errors_counted((await client.get("/metrics")).text, "runners")
            w.host.runners[0].unreadable = OSError(errno.EMFILE, "Too many open files")
            for _ in range(30):  # 6 s of ticks: past the 5 s after which supervision is stale
                await w.tick(0.2)
            ready = await client.get("/ready")
            assert ready.status_code == 503 and ready.headers["retry-after"] == "2"
            body = ready.json()
            assert body["stale"] == ["supervision"]
            assert "Too many open files" in body["supervisor"]["supervision"]["failing"]
            after = _errors_counted((await client.get("/metrics")).text, "runners")
            assert after == before + 30
            w.host.runners[0].unreadable = None
            await w.tick(0.2)
            assert (await client.get("/ready")).status_code == 200
            # memory sampling fails (and so would the scrape's own snapshot): /metrics still answers
            w.host.broken = OSError(errno.EMFILE, "Too many open files")
            for _ in range(7):  # 14 s: past the 11 s after which sampling is stale
                await w.tick(SAMPLE_EVERY)
            scraped = await client.get("/metrics")
            assert scraped.status_code == 200 and _errors_counted(scraped.text, "memory") >= 7
            assert "shoal_device_memory_bytes" not in scraped.text  # what needs a snapshot is left out
            ready = await client.get("/ready")
            assert ready.status_code == 503 and ready.json()["stale"] == ["memory_sampling"]

    run(go())


def test_a_terminated_model_leaves_no_series_in_metrics(tmp_path: Path) -> None:
    from prometheus_client import generate_latest

    from shoal.metrics import REGISTRY, TOKENS, RequestMetrics

    async def go() -> None:
        w = World(tmp_path)
        await w.launch("gone-soon")
        await w.launch("stays")
        RequestMetrics.record("/v1/embeddings", "gone-soon", 200, 0.01)
        TOKENS.labels("gone-soon").inc(3)
        assert 'model="gone-soon"' in generate_latest(REGISTRY).decode()
        await w.service.terminate("gone-soon")
        text = generate_latest(REGISTRY).decode()
        assert 'model="gone-soon"' not in text and 'shoal_launches_total{model="stays"}' in text
        RequestMetrics.record("/v1/embeddings", "gone-soon", 200, 0.01)  # launched again later: counted anew
        assert 'shoal_requests_total{model="gone-soon",route="/v1/embeddings",status="200"} 1.0' in (
            generate_latest(REGISTRY).decode()
        )

    run(go())


def test_callers_share_a_hung_snapshot_and_give_up_at_its_deadline() -> None:
    """One thread at most is stuck in a hung NVML or /proc read; every caller gets a 503 once it has
    run for the deadline, and the first call after it returned reads afresh."""
    from shoal.errors import DevicesUnavailable
    from shoal.services.snapshots import SnapshotReader

    host = FakeHost()
    reader = SnapshotReader(host, timeout=0.3)
    assert reader.now().devices[0].id == "cpu" and host.snapshots == 1
    host.hang = threading.Event()

    async def three_reads() -> list[BaseException | Snapshot]:
        return await asyncio.gather(*(reader.read() for _ in range(3)), return_exceptions=True)

    try:
        answers = asyncio.run(three_reads())
        assert all(isinstance(a, DevicesUnavailable) and a.status == 503 for a in answers), answers
        with pytest.raises(DevicesUnavailable, match="has not returned"):
            reader.now()  # past its deadline already: at once, not another 0.3 s
        assert host.snapshots == 2  # the three reads and the sync one shared the hung call
    finally:
        host.hang.set()
    host.hang = None
    for _ in range(100):  # until the hung call's thread has returned
        if reader._inflight is not None and reader._inflight.done():
            break
        threading.Event().wait(0.05)
    assert reader.now().devices and host.snapshots == 3
    host.broken = OSError(errno.EMFILE, "Too many open files")
    with pytest.raises(OSError, match="Too many open files"):
        asyncio.run(reader.read())  # a snapshot that fails is the caller's to handle, as before


def test_a_hung_snapshot_makes_launches_and_the_device_report_a_503(tmp_path: Path) -> None:
    """Not a hang: a launch (under the placement lock) and GET /v1/cluster/devices answer 503 with
    Retry-After; /metrics leaves the memory gauges out and answers; after the snapshot returns, all do."""
    import httpx

    from shoal.gateway.app import build_app

    async def go() -> None:
        w = World(tmp_path)
        await w.launch()
        w.service.snapshots.timeout = 0.3
        app = build_app(ServerSettings(data_dir=tmp_path))
        app.state.models = w.service
        transport = httpx.ASGITransport(app=app)
        w.host.hang = threading.Event()
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://shoal") as client:
                devices = await client.get("/v1/cluster/devices")
                assert devices.status_code == 503 and devices.headers["retry-after"] == "5"
                assert devices.json()["error"]["code"] == "devices_unavailable"
                body = {"model_name": MODEL, "model_uid": "second"}
                launch = await client.post("/v1/models", json=body)
                assert launch.status_code == 503, launch.text
                scraped = await client.get("/metrics")
                assert scraped.status_code == 200 and "shoal_device_memory_bytes" not in scraped.text
                w.host.hang.set()
                w.host.hang = None
                await asyncio.to_thread(w.host.hanging.wait, 5)
                for _ in range(100):
                    await asyncio.sleep(0.05)
                    if (await client.get("/v1/cluster/devices")).status_code == 200:
                        break
                assert (await client.get("/v1/cluster/devices")).status_code == 200
        finally:
            if w.host.hang is not None:
                w.host.hang.set()

    run(go())
