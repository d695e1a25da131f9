"""The pure placement function: no I/O, no sleeps, plain values in and out."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.scheduler import (
    Demand,
    DeviceState,
    Evict,
    Holding,
    NoFit,
    Place,
    Policy,
    free_bytes,
    place,
    share_cores,
)

GiB = 1024**3
POLICY = Policy("binpack", 0.05)


def gpus(*sizes_gib: float) -> list[DeviceState]:
    return [DeviceState(f"gpu:{i}", "gpu", int(s * GiB), 0) for i, s in enumerate(sizes_gib)]


def hold(
    replica: str,
    device: str,
    gib: float,
    *,
    last_used: float = 0.0,
    idle_since: float | None = 0.0,
    keep_alive: float = 0.0,
    pinned: bool = False,
) -> Holding:
    return Holding(replica, device, int(gib * GiB), last_used, idle_since, keep_alive, pinned)


def test_two_llms_and_an_embedding_share_one_gpu_in_any_order() -> None:
    devices = gpus(24)
    held: list[Holding] = []
    for name, size in (("llm-a", 9), ("embedding", 1), ("llm-b", 9)):
        decision = place(Demand(int(size * GiB)), devices, held, POLICY, now=0)
        assert decision == Place(("gpu:0",))
        held.append(hold(f"{name}/0", "gpu:0", size, idle_since=None))
    assert free_bytes(devices[0], held, POLICY) == int(24 * GiB) - int(19 * GiB) - int(0.05 * 24 * GiB)


def test_binpack_fills_the_fullest_gpu_and_spread_the_emptiest() -> None:
    devices = gpus(24, 24)
    held = [hold("a/0", "gpu:1", 10, idle_since=None)]
    assert place(Demand(4 * GiB), devices, held, POLICY, 0) == Place(("gpu:1",))
    assert place(Demand(4 * GiB), devices, held, Policy("spread"), 0) == Place(("gpu:0",))


def test_replicas_of_one_model_prefer_different_gpus() -> None:
    devices = gpus(24, 24)
    held = [hold("m/0", "gpu:0", 4, idle_since=None)]
    assert place(Demand(4 * GiB, avoid=frozenset({"gpu:0"})), devices, held, POLICY, 0) == Place(("gpu:1",))


def test_gpu_idx_pins_and_is_still_refused_when_full() -> None:
    devices = gpus(24, 24)
    held = [hold("a/0", "gpu:1", 20, idle_since=None)]
    assert place(Demand(2 * GiB, allowed=("gpu:0",)), devices, held, POLICY, 0) == Place(("gpu:0",))
    refused = place(Demand(8 * GiB, allowed=("gpu:1",)), devices, held, POLICY, 0)
    assert isinstance(refused, NoFit) and [r.device for r in refused.devices] == ["gpu:1"]


def test_larger_than_any_gpu_names_the_numbers() -> None:
    refused = place(Demand(30 * GiB), gpus(24, 16), [], POLICY, 0)
    assert isinstance(refused, NoFit)
    assert refused.reason == "larger than any device"
    assert refused.needed == 30 * GiB
    assert {r.device: r.free for r in refused.devices} == {
        "gpu:0": int(24 * GiB) - int(0.05 * 24 * GiB),
        "gpu:1": int(16 * GiB) - int(0.05 * 16 * GiB),
    }


def test_idle_model_past_keep_alive_is_evicted_lru_first() -> None:
    devices = gpus(24)
    held = [
        hold("old/0", "gpu:0", 8, last_used=10, idle_since=10, keep_alive=60),
        hold("newer/0", "gpu:0", 8, last_used=50, idle_since=50, keep_alive=60),
        hold("busy/0", "gpu:0", 6, last_used=90, idle_since=None),
    ]
    decision = place(Demand(8 * GiB), devices, held, POLICY, now=200)
    assert decision == Evict(("old/0",), Place(("gpu:0",)))
    # Within keep-alive nothing may go: the answer is a no-fit naming who holds the memory.
    only_old = place(Demand(8 * GiB), devices, held, POLICY, now=75)  # newer is idle 25 s of 60
    assert isinstance(only_old, Evict) and only_old.victims == ("old/0",)
    both = place(Demand(15 * GiB), devices, held, POLICY, now=200)
    assert isinstance(both, Evict) and both.victims == ("old/0", "newer/0")
    too_early = place(Demand(8 * GiB), devices, held, POLICY, now=30)
    assert isinstance(too_early, NoFit) and set(too_early.blocked) == {"old/0", "newer/0", "busy/0"}


def test_pinned_and_forever_models_are_never_evicted() -> None:
    devices = gpus(24)
    held = [hold("pinned/0", "gpu:0", 12, pinned=True), hold("forever/0", "gpu:0", 10, keep_alive=-1)]
    decision = place(Demand(8 * GiB), devices, held, POLICY, now=10**6)
    assert isinstance(decision, NoFit)
    assert decision.reason.startswith("not enough free memory")


def test_n_gpu_takes_that_many_devices() -> None:
    decision = place(Demand(10 * GiB, n_devices=2), gpus(24, 24, 24), [], POLICY, 0)
    assert isinstance(decision, Place) and len(decision.devices) == 2
    assert isinstance(place(Demand(1 * GiB, n_devices=4), gpus(24, 24), [], POLICY, 0), NoFit)


def test_cpu_is_a_device_and_cores_are_shared_out() -> None:
    devices = [DeviceState("cpu", "cpu", 16 * GiB, 2 * GiB, cores=4), *gpus(24)]
    first = place(Demand(1 * GiB, kind="cpu", cores=2), devices, [], POLICY, 0)
    assert first == Place(("cpu",), (0, 1))
    held = [Holding("a/0", "cpu", GiB, 0, None, 0, cores=(0, 1))]
    second = place(Demand(1 * GiB, kind="cpu", cores=2), devices, held, POLICY, 0)
    assert second == Place(("cpu",), (2, 3))
    assert share_cores(2, [Holding("a/0", "cpu", 1, 0, None, 0, cores=(0,))], 1) == (1,)


def test_cores_are_shared_out_per_node() -> None:
    """On a cluster each node has its own CPU: cores held on one node do not count on another."""
    devices = [
        DeviceState("node-a/cpu", "cpu", 16 * GiB, 0, cores=2),
        DeviceState("node-a/gpu:0", "gpu", 24 * GiB, 0),
        DeviceState("node-b/cpu", "cpu", 16 * GiB, 0, cores=2),
        DeviceState("node-b/gpu:0", "gpu", 24 * GiB, 0),
    ]
    held = [Holding("a/0", "node-a/gpu:0", 20 * GiB, 0, None, 0, cores=(0,))]
    # node-a's GPU is full: the replica goes to node-b, whose core 0 is free
    assert place(Demand(8 * GiB, cores=1), devices, held, POLICY, 0) == Place(("node-b/gpu:0",), (0,))
    # on node-a itself, core 0 is taken
    on_a = Demand(1 * GiB, cores=1, allowed=("node-a/gpu:0",))
    assert place(on_a, devices, held, POLICY, 0) == Place(("node-a/gpu:0",), (1,))


def test_no_gpus_means_auto_goes_to_the_cpu() -> None:
    devices = [DeviceState("cpu", "cpu", 16 * GiB, 0, cores=2)]
    assert place(Demand(GiB), devices, [], POLICY, 0) == Place(("cpu",))
    assert isinstance(place(Demand(GiB, kind="gpu"), devices, [], POLICY, 0), NoFit)


# ---- properties -----------------------------------------------------------------------------
KINDS = ("LLM", "embedding", "audio", "image", "rerank")
ops = st.lists(
    st.one_of(
        st.tuples(st.just("launch"), st.sampled_from(KINDS), st.floats(0.1, 30.0)),
        st.tuples(st.just("stop"), st.integers(0, 50), st.just(0.0)),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(ops=ops, sizes=st.lists(st.sampled_from([16.0, 24.0, 40.0, 80.0]), min_size=1, max_size=4))
def test_no_gpu_is_ever_overcommitted_and_fit_depends_only_on_memory(
    ops: list[tuple[str, object, float]], sizes: list[float]
) -> None:
    devices = gpus(*sizes)
    held: list[Holding] = []
    for n, (op, arg, size) in enumerate(ops):
        if op == "stop":
            if held:
                held.pop(int(arg) % len(held))  # type: ignore[call-overload]
            continue
        demand = Demand(int(size * GiB))
        decision = place(demand, devices, held, POLICY, now=0)
        # Whether it fits is a question of memory alone: some GPU has the bytes free.
        fits_by_memory = any(free_bytes(d, held, POLICY) >= demand.per_device for d in devices)
        assert isinstance(decision, Place) == fits_by_memory
        # ... and the same holdings in another order (other kinds, other launch order) give the same answer.
        assert (
            isinstance(place(demand, devices, list(reversed(held)), POLICY, now=0), Place) == fits_by_memory
        )
        if isinstance(decision, Place):
            held.append(Holding(f"{arg}-{n}/0", decision.devices[0], demand.per_device, 0, None, 0))
        for d in devices:
            assert free_bytes(d, held, POLICY) >= 0, "over-committed"


def test_a_thousand_models_on_64_gpus() -> None:
    """64 × 80 GiB, less 5% headroom, hold 16 models of 4.5 GiB each: 1,024; all 1,000 fit, binpacked."""
    devices = gpus(*([80.0] * 64))
    held: list[Holding] = []
    for i in range(1000):
        decision = place(Demand(int(4.5 * GiB)), devices, held, POLICY, 0)
        assert isinstance(decision, Place)
        held.append(Holding(f"m{i}/0", decision.devices[0], int(4.5 * GiB), 0, None, 0))
    per_gpu = [sum(1 for h in held if h.device == d.id) for d in devices]
    assert sorted(per_gpu, reverse=True)[:62] == [16] * 62  # filled one by one, not spread thin
    assert all(free_bytes(d, held, POLICY) >= 0 for d in devices)
