"""Device snapshots with a deadline, one at a time.

NVML or a /proc read can hang (a wedged driver, a stuck mount). Without a bound every caller would
park a thread on it for good, and a launch would hold the placement lock while it waited. Here the
callers share the snapshot in flight, and all give up once it has run for `timeout` seconds, with a
503 that says why; the hung call keeps its one thread, and the next call after it returns reads afresh.
The supervisor's own memory sampling has its step deadline (services/supervisor.py) instead.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future

from shoal.devices import Snapshot
from shoal.errors import DevicesUnavailable
from shoal.hosts import Host

SNAPSHOT_TIMEOUT = 10.0  # seconds: as long as the supervisor lets its memory sampling run


class SnapshotReader:
    def __init__(self, host: Host, timeout: float = SNAPSHOT_TIMEOUT) -> None:
        self._host, self.timeout = host, timeout
        self._lock = threading.Lock()
        self._inflight: Future[Snapshot] | None = None
        self._started = 0.0

    def _current(self) -> tuple[Future[Snapshot], float]:
        """The snapshot in flight (a new one if none is) and the seconds it has left."""
        with self._lock:
            if self._inflight is None or self._inflight.done():
                self._inflight, self._started = Future(), time.monotonic()
                threading.Thread(
                    target=self._take, args=(self._inflight,), name="shoal-snapshot", daemon=True
                ).start()
            return self._inflight, self._started + self.timeout - time.monotonic()

    def _take(self, future: Future[Snapshot]) -> None:
        try:
            future.set_result(self._host.snapshot())
        except BaseException as exc:  # handed to every caller waiting on it
            future.set_exception(exc)

    def _hung(self) -> DevicesUnavailable:
        return DevicesUnavailable(
            f"the device snapshot (NVML, /proc) has not returned for {self.timeout:.0f} s; "
            "placement and the device report wait for it",
            retry_after=5,
        )

    def now(self) -> Snapshot:
        """From a worker thread."""
        future, left = self._current()
        try:
            return future.result(timeout=max(left, 0.0))
        except TimeoutError:
            raise self._hung() from None

    async def read(self) -> Snapshot:
        """From the event loop."""
        future, left = self._current()
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), max(left, 0.0))
        except TimeoutError:
            raise self._hung() from None
