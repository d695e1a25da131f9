"""Warm spare runners on this machine: one per engine family, started ahead so that a launch skips
the imports (the spare's side of it: shoal.runners.spare).

A spare is a child of the gateway like a runner (PR_SET_PDEATHSIG: it dies with the gateway) and
becomes the runner in the same process, so the runner's handle works on it unchanged. Spares hold
no model and are no replica: `shoal ps`, the model list and /metrics never show them. The memory
they take is counted as any non-runner process's is, in the CPU's "used by others". A spare that is
taken or dies is started again once no launch is in progress and no other spare is importing (imports
side by side would slow a loading model, and each other, down on a small machine), after a backoff
that grows while a family's spares keep dying.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from shoal.runners.config import RUNNER_ENV
from shoal.runners.process import child_setup
from shoal.runners.spare import FAMILIES, family_of, installed

log = logging.getLogger("shoal.spares")


def parse_families(value: str) -> tuple[str, ...]:
    """SHOAL_WARM_SPARES: "all" (every family whose libraries are installed), "none", or names."""
    value = value.strip().lower()
    if value in ("", "none", "off", "0", "false"):
        return ()
    if value in ("all", "on", "1", "true"):
        return tuple(f for f in FAMILIES if installed(f))
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown warm spare families {unknown}; known: all, none, {', '.join(FAMILIES)}")
    return tuple(n for n in names if installed(n))


@dataclass
class _Spare:
    family: str
    popen: subprocess.Popen[bytes]
    ready_fd: int  # the spare writes one line here once its imports are done
    ready: bool = False

    def imported(self) -> bool:
        if not self.ready:
            try:
                self.ready = bool(os.read(self.ready_fd, 64))
            except BlockingIOError:  # still importing
                pass
        return self.ready

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.ready_fd)


class Spares:
    def __init__(self, families: tuple[str, ...], logs: Path, interval: float = 0.5) -> None:
        self.families = families
        self.logs = logs
        self.interval = interval
        self._spares: dict[str, _Spare] = {}
        self._deaths: dict[str, int] = {}  # a family's spares that died in a row, for the backoff
        self._retry_at: dict[str, float] = {}
        self._launching: set[int] = set()  # runners spawned and not ready (or failed) yet
        self._task: asyncio.Task[None] | None = None

    def pids(self) -> dict[str, int]:
        """The waiting spares' pids by family."""
        return {family: spare.popen.pid for family, spare in self._spares.items()}

    async def start(self) -> None:
        self._refill()
        self._task = asyncio.create_task(self._keep())

    async def _keep(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self._reap()
                self._refill()
            except Exception:  # a failed spawn (fork refused, disk full) must not end the loop
                log.exception("warm spares: could not start a spare")

    def _died(self, spare: _Spare, code: int | None) -> None:
        deaths = self._deaths[spare.family] = self._deaths.get(spare.family, 0) + 1
        delay = min(60.0, 2.0**deaths)
        self._retry_at[spare.family] = time.monotonic() + delay
        log.warning(
            "warm spare %s (pid %d) exited with code %s; another in %.0f s (log: %s)",
            spare.family,
            spare.popen.pid,
            code,
            delay,
            self.logs / f"spare-{spare.family}.log",
        )

    def _reap(self) -> None:
        for family, spare in list(self._spares.items()):
            code = spare.popen.poll()
            if code is not None:
                del self._spares[family]
                spare.release()
                self._died(spare, code)

    def _refill(self) -> None:
        """Start the first missing spare, in the families' order, when no launch is in progress and
        no other spare is importing: one import at a time finishes sooner on a small machine."""
        if self._launching or not all(spare.imported() for spare in self._spares.values()):
            return
        now = time.monotonic()
        for family in self.families:
            if family not in self._spares and now >= self._retry_at.get(family, 0.0):
                self._spares[family] = self._spawn(family)
                return

    def _spawn(self, family: str) -> _Spare:
        # From the event loop's thread, as runners are: PR_SET_PDEATHSIG fires when the forking
        # thread ends, so a worker thread's exit would kill the spare.
        ready_r, ready_w = os.pipe()
        try:
            with open(self.logs / f"spare-{family}.log", "ab") as out:
                popen = subprocess.Popen(
                    [sys.executable, "-m", "shoal.runners.spare", family, str(ready_w)],
                    stdin=subprocess.PIPE,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **RUNNER_ENV},
                    preexec_fn=child_setup(()),
                    close_fds=True,
                    pass_fds=(ready_w,),
                )
        except BaseException:
            os.close(ready_r)
            raise
        finally:
            os.close(ready_w)
        os.set_blocking(ready_r, False)
        return _Spare(family, popen, ready_r)

    def launching(self, runner: object) -> None:
        self._launching.add(id(runner))

    def launched(self, runner: object) -> None:
        self._launching.discard(id(runner))

    def hand_off(self, engine: str, launch: dict[str, object]) -> subprocess.Popen[bytes] | None:
        """Give the launch to this engine family's spare (which may still be importing: it reads the
        launch once done); the spare's process, now the runner's, or None when there is none."""
        family = family_of(engine)
        spare = self._spares.pop(family, None) if family else None
        if spare is None:
            return None
        assert spare.popen.stdin is not None
        spare.release()
        try:
            spare.popen.stdin.write(json.dumps(launch).encode() + b"\n")
            spare.popen.stdin.close()
        except OSError:  # it died since the last look: this launch starts cold
            spare.popen.kill()
            spare.popen.wait()
            self._died(spare, spare.popen.returncode)
            return None
        self._deaths[spare.family] = 0
        return spare.popen

    async def close(self, grace: float = 2.0) -> None:
        """Stop the loop and every waiting spare (SIGTERM, then SIGKILL), reaping them."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        spares, self._spares = list(self._spares.values()), {}
        for spare in spares:
            if spare.popen.poll() is None:
                spare.popen.terminate()
        deadline = time.monotonic() + grace
        while any(s.popen.poll() is None for s in spares) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for spare in spares:
            if spare.popen.poll() is None:
                spare.popen.kill()
                await asyncio.to_thread(spare.popen.wait)
            if spare.popen.stdin is not None:
                spare.popen.stdin.close()
            spare.release()
