"""Dynamic batching across requests, for engines whose forward pass costs about the same for one input
as for many (encoders: embeddings, rerank; Whisper's decoder, engines/faster_whisper.py).

Concurrent requests hand their inputs to one `Batcher`; one worker task takes inputs from the queue in
arrival order, up to `max_batch_size` inputs and `max_batch_tokens` tokens (a single input over the
token budget goes alone), waiting at most `batch_wait_ms` for more once the first has arrived and the
model thread is free (the `call`s queued before have run), sorts them by length (less padding:
neighbours in a batch have about the same length) and runs them as one call of the engine's `run` on
one model thread. Each request gets its own results back, in its own
order. A request larger than the budget is split over several batches.

Isolation: a request whose caller is cancelled (the client hung up) is dropped from the queue and its
share of a running batch is thrown away; the others are not touched. When a batch's call raises, each
request in it is run again alone, so an input that breaks the engine fails only its own request.

The worker is bound to the event loop it was started on; a submit from another loop (tests calling
`asyncio.run` per request) starts a fresh queue there. Forward passes always run on the same single
model thread, so the engine needs no lock of its own around its model.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")
T = TypeVar("T")

# Defaults, in the launch options' names (engines/options.py registers them with their bounds).
MAX_BATCH_SIZE = 256  # inputs per batch; the engine's own batch_size still cuts its forward passes
MAX_BATCH_TOKENS = 16_384  # tokens (the inputs' own lengths, summed) per batch
BATCH_WAIT_MS = 0.0  # no wait: inputs that arrive while a batch runs form the next one


@dataclass(frozen=True)
class BatchSettings:
    max_batch_size: int = MAX_BATCH_SIZE
    max_batch_tokens: int = MAX_BATCH_TOKENS
    batch_wait_ms: float = BATCH_WAIT_MS

    @classmethod
    def from_options(cls, options: dict[str, Any], max_batch_size: int = MAX_BATCH_SIZE) -> BatchSettings:
        """The batching options of a launch (already checked against the option table); max_batch_size:
        the engine's default."""
        return cls(
            int(options.get("max_batch_size", max_batch_size)),
            int(options.get("max_batch_tokens", MAX_BATCH_TOKENS)),
            float(options.get("batch_wait_ms", BATCH_WAIT_MS)),
        )


@dataclass(eq=False)
class _Request(Generic[Item, Result]):
    items: Sequence[Item]
    lengths: Sequence[int]
    future: asyncio.Future[list[Result]]
    results: list[Any] = field(default_factory=list)
    taken: int = 0  # items handed to batches so far
    done: int = 0  # items with a result

    def __post_init__(self) -> None:
        self.results = [None] * len(self.items)


class Batcher(Generic[Item, Result]):
    """`await batcher.submit(items, lengths)` → one result per item, computed in shared batches by
    `run(items) -> results` (same length and order as its argument), called on one model thread."""

    def __init__(self, run: Callable[[list[Item]], Sequence[Result]], settings: BatchSettings) -> None:
        self._run = run
        self.settings = settings
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="shoal-model")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: collections.deque[_Request[Item, Result]] = collections.deque()
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self.counters = {"batches": 0, "batched_inputs": 0, "batched_requests": 0, "largest_batch": 0}

    async def submit(self, items: Sequence[Item], lengths: Sequence[int]) -> list[Result]:
        if len(items) != len(lengths):
            raise ValueError("one length per item")
        if not items:
            return []
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop, self._queue = loop, collections.deque()  # the old loop's requests died with it
            self._worker = None
        if self._worker is None or self._worker.done():
            self._arrived = asyncio.Event()
            self._worker = loop.create_task(self._work(), name="shoal-batcher")
        request: _Request[Item, Result] = _Request(items, lengths, loop.create_future())
        self._queue.append(request)
        self._arrived.set()
        return await request.future  # a cancelled caller cancels the future: the worker skips it

    def queued(self) -> int:
        """Inputs waiting for a batch."""
        return sum(len(r.items) - r.taken for r in self._queue if not r.future.done())

    async def call(self, fn: Callable[[], T]) -> T:
        """Run fn on the model thread, between batches (for work that touches the model alone)."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn)

    def close(self) -> None:
        if self._worker is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._worker.cancel)
        self._thread.shutdown(wait=True)

    async def _work(self) -> None:
        while True:
            await self._arrived.wait()
            # a batch forms once the model thread is free: what arrives while it runs other calls
            # (another request's encoder pass) joins this batch instead of waiting for the next one
            await self.call(_nothing)
            if self.settings.batch_wait_ms > 0:
                await self._gather_more()
            batch = self._take()
            if not self._queue:
                self._arrived.clear()
            if batch:
                await self._run_batch(batch)

    async def _gather_more(self) -> None:
        """Wait up to batch_wait_ms for the queue to fill a batch."""
        deadline = time.monotonic() + self.settings.batch_wait_ms / 1000
        while (left := deadline - time.monotonic()) > 0 and not self._full():
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                break
        self._arrived.set()

    def _full(self) -> bool:
        waiting = [r for r in self._queue if not r.future.done()]
        size = sum(len(r.items) - r.taken for r in waiting)
        tokens = sum(sum(r.lengths[r.taken :]) for r in waiting)
        return size >= self.settings.max_batch_size or tokens >= self.settings.max_batch_tokens

    def _take(self) -> list[tuple[_Request[Item, Result], int]]:
        """(request, index) pairs for the next batch, in arrival order, within the budget."""
        batch: list[tuple[_Request[Item, Result], int]] = []
        tokens = 0
        while self._queue and len(batch) < self.settings.max_batch_size:
            request = self._queue[0]
            if request.future.done():  # cancelled while it waited
                self._queue.popleft()
                continue
            length = request.lengths[request.taken]
            if batch and tokens + length > self.settings.max_batch_tokens:
                break
            batch.append((request, request.taken))
            tokens += length
            request.taken += 1
            if request.taken == len(request.items):
                self._queue.popleft()
        return batch

    async def _run_batch(self, batch: list[tuple[_Request[Item, Result], int]]) -> None:
        requests = list(dict.fromkeys(request for request, _ in batch))  # in arrival order
        batch.sort(key=lambda entry: entry[0].lengths[entry[1]])
        items = [request.items[i] for request, i in batch]
        self.counters["batches"] += 1
        self.counters["batched_inputs"] += len(items)
        self.counters["batched_requests"] += len(requests)
        self.counters["largest_batch"] = max(self.counters["largest_batch"], len(items))
        try:
            results = await self.call(lambda: list(self._run(items)))
            if len(results) != len(items):
                raise RuntimeError(f"the engine gave {len(results)} results for {len(items)} inputs")
        except Exception as exc:
            if len(requests) == 1:
                _fail(requests[0], exc)
            else:  # find the request that broke it: each one again, alone
                for request in requests:
                    await self._run_batch([(r, i) for r, i in batch if r is request])
            return
        for (request, i), result in zip(batch, results, strict=True):  # lengths checked above
            request.results[i] = result
            request.done += 1
            if request.done == len(request.items) and not request.future.done():
                request.future.set_result(request.results)


def _nothing() -> None:
    pass


def _fail(request: _Request[Any, Any], exc: Exception) -> None:
    if not request.future.done():
        request.future.set_exception(exc)
    request.taken = len(request.items)  # none of its remaining inputs run
