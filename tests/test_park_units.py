"""The scheduler's park, wake, move and host-RAM decisions (pure values in and out, no sleeps), and
the PARKED state in the replica lifecycle."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.errors import IllegalTransition
from shoal.scheduler import (
    Demand,
    DeviceState,
    Evict,
    Holding,
    Move,
    NoFit,
    Place,
    Policy,
    free_bytes,
    movable,
    node_of,
    place,
)
from shoal.services.ledger import Reservation
from shoal.services.replicas import HOLDS_HOST_RAM, HOLDS_MEMORY, Replica, ReplicaState, move

GiB = 1024**3
POLICY = Policy("binpack", 0.0)


def world(*gpu_gib: float, ram_gib: float = 64) -> list[DeviceState]:
    cpu = DeviceState("cpu", "cpu", int(ram_gib * GiB), 0, cores=4)
    return [cpu, *(DeviceState(f"gpu:{i}", "gpu", int(s * GiB), 0) for i, s in enumerate(gpu_gib))]


def gpu(
    replica: str, device: str, gib: float, *, last_used: float = 0.0, busy: bool = False, park: bool = True,
    move: bool = False, pinned: bool = False, keep_alive: float = 0.0,
) -> Holding:  # fmt: skip
    return Holding(replica, device, int(gib * GiB), last_used, None if busy else last_used, keep_alive,
                   pinned, can_park=park, can_move=move)  # fmt: skip


def parked(replica: str, gib: float, last_used: float) -> Holding:
    return Holding(replica, "cpu", int(gib * GiB), last_used, last_used, 0.0, parked=True)


def test_an_idle_replica_that_can_park_is_parked_not_stopped() -> None:
    decision = place(Demand(10 * GiB), world(16), [gpu("a/0", "gpu:0", 10)], POLICY, now=100)
    assert decision == Evict((), Place(("gpu:0",)), park=("a/0",))


def test_an_engine_that_cannot_park_is_stopped() -> None:
    decision = place(Demand(10 * GiB), world(16), [gpu("a/0", "gpu:0", 10, park=False)], POLICY, now=100)
    assert decision == Evict(("a/0",), Place(("gpu:0",)))


def test_park_limit_zero_turns_parking_off() -> None:
    decision = place(Demand(10 * GiB), world(16), [gpu("a/0", "gpu:0", 10)], Policy(park_limit=0), 100)
    assert decision == Evict(("a/0",), Place(("gpu:0",)))


def test_short_host_ram_stops_the_least_recently_used_parked_replica_first() -> None:
    held = [
        parked("old/0", 6, last_used=1),
        parked("older/0", 6, last_used=0),
        gpu("a/0", "gpu:0", 10, last_used=5),
    ]
    decision = place(Demand(10 * GiB), world(16, ram_gib=20), held, POLICY, now=100)
    # 20 GiB of RAM hold 12 parked: parking 10 more needs one of them gone, the older one
    assert decision == Evict((), Place(("gpu:0",)), park=("a/0",), drop=("older/0",))


def test_a_parked_replica_is_never_dropped_for_one_used_less_recently() -> None:
    held = [parked("recent/0", 12, last_used=50), gpu("a/0", "gpu:0", 10, last_used=5)]
    decision = place(Demand(10 * GiB), world(16, ram_gib=20), held, POLICY, now=100)
    assert decision == Evict(("a/0",), Place(("gpu:0",)))


def test_park_limit_caps_parked_bytes_below_free_ram() -> None:
    held = [parked("p/0", 4, last_used=0), gpu("a/0", "gpu:0", 10, last_used=5)]
    decision = place(Demand(10 * GiB), world(16), held, Policy(park_limit=12 * GiB), 100)
    assert decision == Evict((), Place(("gpu:0",)), park=("a/0",), drop=("p/0",))


def test_a_cpu_launch_stops_parked_replicas_to_make_room_in_ram() -> None:
    held = [parked("p/0", 10, last_used=0)]
    decision = place(Demand(8 * GiB, kind="cpu"), world(16, ram_gib=16), held, POLICY, 100)
    assert decision == Evict(("p/0",), Place(("cpu",)))


def test_a_wake_prefers_the_gpu_it_left_when_both_have_room() -> None:
    held = [gpu("b/0", "gpu:1", 4, busy=True)]
    decision = place(Demand(4 * GiB, prefer=("gpu:0",)), world(16, 16), held, POLICY, 100)
    assert decision == Place(("gpu:0",))  # binpack alone would pick the fuller gpu:1


def test_a_wake_goes_to_another_gpu_when_the_one_it_left_is_full() -> None:
    held = [gpu("b/0", "gpu:0", 14, busy=True)]
    decision = place(Demand(4 * GiB, prefer=("gpu:0",)), world(16, 16), held, POLICY, 100)
    assert decision == Place(("gpu:1",))


def test_defragment_moves_the_smallest_idle_replica_that_makes_room() -> None:
    held = [
        gpu("big/0", "gpu:0", 6, move=True, keep_alive=300),  # idle but within keep-alive: it may move
        gpu("small/0", "gpu:0", 4, move=True, keep_alive=300),
        gpu("busy/0", "gpu:1", 10, busy=True),
    ]
    decision = place(Demand(10 * GiB), world(16, 16), held, POLICY, now=100)
    assert decision == Move("small/0", "gpu:0", "gpu:1", 4 * GiB, Place(("gpu:0",)))


def test_no_move_for_a_pinned_busy_or_unmovable_replica() -> None:
    for holding in (
        gpu("a/0", "gpu:0", 4, move=True, pinned=True),
        gpu("a/0", "gpu:0", 4, move=True, busy=True),
        gpu("a/0", "gpu:0", 4, move=False, keep_alive=300),
    ):
        held = [holding, gpu("x/0", "gpu:0", 6, busy=True), gpu("y/0", "gpu:1", 10, busy=True)]
        decision = place(Demand(10 * GiB), world(16, 16), held, POLICY, now=100)
        assert not isinstance(decision, Move), holding


def test_a_move_is_preferred_to_parking_and_only_when_nothing_fits_as_it_is() -> None:
    held = [gpu("a/0", "gpu:0", 6, move=True), gpu("y/0", "gpu:1", 10, busy=True)]
    assert isinstance(place(Demand(12 * GiB), world(16, 16), held, POLICY, 100), Move)
    assert isinstance(place(Demand(6 * GiB), world(16, 16), held, POLICY, 100), Place)


def test_no_single_move_makes_room_falls_back_to_parking() -> None:
    held = [gpu("a/0", "gpu:0", 10, move=True), gpu("y/0", "gpu:1", 10, busy=True)]
    decision = place(Demand(12 * GiB), world(16, 16), held, POLICY, 100)
    assert decision == Evict((), Place(("gpu:0",)), park=("a/0",))


def test_parking_releases_the_gpu_reservation_and_records_where_it_was() -> None:
    replica = Replica(0, state=ReplicaState.READY, reservation=Reservation(("gpu:1",), 2 * GiB, {}, (3,)))
    assert move(replica, ReplicaState.PARKED)  # its GPU memory is given back
    assert replica.reservation is None and replica.parked_from == ("gpu:1",) and replica.parked_cores == (3,)
    assert replica.parked_bytes == 2 * GiB and replica.parked_at is not None
    assert ReplicaState.PARKED in HOLDS_HOST_RAM and ReplicaState.PARKED not in HOLDS_MEMORY
    with pytest.raises(IllegalTransition):  # a wake goes through STARTING: it is placed again
        move(replica, ReplicaState.READY)
    move(replica, ReplicaState.STARTING)
    move(replica, ReplicaState.PARKED)  # a wake that found no room: parked as before
    assert replica.parked_from == ("gpu:1",) and replica.parked_bytes == 2 * GiB
    move(replica, ReplicaState.EVICTED)  # host RAM short: stopped


# ---- properties -------------------------------------------------------------------------------


@st.composite
def scenes(draw: st.DrawFn) -> tuple[list[DeviceState], list[Holding], Demand, Policy]:
    n_gpus = draw(st.integers(1, 3))
    sizes = [draw(st.integers(4, 24)) for _ in range(n_gpus)]
    devices = world(*sizes, ram_gib=draw(st.integers(1, 48)))
    holdings: list[Holding] = []
    for i in range(draw(st.integers(0, 7))):
        on = draw(st.sampled_from(["cpu", *(f"gpu:{j}" for j in range(n_gpus))]))
        size = draw(st.integers(1, 12)) * GiB // 2
        last_used = float(draw(st.integers(0, 99)))
        if on == "cpu" and draw(st.booleans()):
            holdings.append(Holding(f"m{i}/0", "cpu", size, last_used, last_used, 0.0, parked=True))
            continue
        holdings.append(
            Holding(
                f"m{i}/0",
                on,
                size,
                last_used,
                None if draw(st.booleans()) else last_used,
                draw(st.sampled_from([-1.0, 0.0, 50.0, 500.0])),
                draw(st.booleans()),
                can_park=on != "cpu" and draw(st.booleans()),
                can_move=on != "cpu" and draw(st.booleans()),
            )
        )
    demand = Demand(draw(st.integers(1, 24)) * GiB // 2, kind=draw(st.sampled_from(["gpu", "cpu"])))
    limit = draw(st.sampled_from([None, 0, 4 * GiB, 16 * GiB]))
    return devices, holdings, demand, Policy(draw(st.sampled_from(["binpack", "spread"])), 0.05, limit)


def _after(decision: Evict | Move, holdings: list[Holding]) -> list[Holding]:
    """The holdings once the decision is carried out (the new replica not yet added)."""
    if isinstance(decision, Move):
        moved = [Holding(h.replica, decision.to, h.reserved, 0, None, 0) for h in holdings]
        return [m if h.replica == decision.replica else h for h, m in zip(holdings, moved, strict=True)]
    gone = set(decision.victims) | set(decision.park) | set(decision.drop)
    after = [h for h in holdings if h.replica not in gone]
    for key in decision.park:  # its bytes now in its node's host RAM
        held = [h for h in holdings if h.replica == key]
        cpu = (node_of(held[0].device) + "/cpu").lstrip("/")
        after.append(Holding(key, cpu, sum(h.reserved for h in held), 0, 0, 0, parked=True))
    return after


@settings(max_examples=400, deadline=None)
@given(scenes())
def test_decisions_never_over_commit_a_device_or_host_ram(
    scene: tuple[list[DeviceState], list[Holding], Demand, Policy],
) -> None:
    devices, holdings, demand, policy = scene
    now = 100.0
    decision = place(demand, devices, holdings, policy, now)
    if isinstance(decision, NoFit):
        return
    target = decision if isinstance(decision, Place) else decision.then
    before = {d.id: free_bytes(d, holdings, policy) for d in devices}
    after = holdings if isinstance(decision, Place) else _after(decision, holdings)
    for device in devices:
        free = free_bytes(device, after, policy)
        needed = demand.per_device if device.id in target.devices else 0
        # nothing is over-committed by the plan (what was already over stays no worse)
        assert free >= needed or free >= before[device.id], (device, decision)
    parked_bytes = sum(h.reserved for h in after if h.parked)
    if policy.park_limit is not None and isinstance(decision, Evict) and decision.park:
        assert parked_bytes <= policy.park_limit
    if isinstance(decision, Evict):
        keys = {h.replica: h for h in holdings}
        for key in decision.victims + decision.park:
            held = keys[key]
            assert not held.pinned and held.idle_since is not None
            assert now - held.idle_since >= held.keep_alive >= 0
        for key in decision.park:
            assert keys[key].can_park and policy.park_limit != 0
        for key in decision.drop:
            assert keys[key].parked
            # a parked replica is only dropped for one used at least as recently
            assert any(keys[key].last_used <= keys[p].last_used for p in decision.park)
        assert not set(decision.victims) & set(decision.park)


@settings(max_examples=400, deadline=None)
@given(scenes())
def test_a_move_is_idle_unpinned_and_the_fewest_bytes_that_make_room(
    scene: tuple[list[DeviceState], list[Holding], Demand, Policy],
) -> None:
    devices, holdings, demand, policy = scene
    decision = place(demand, devices, holdings, policy, 100.0)
    spans = Counter(h.replica for h in holdings)
    free = {d.id: free_bytes(d, holdings, policy) for d in devices}
    candidates = [d.id for d in devices if d.kind == demand.kind]
    possible = [
        h.reserved
        for h in holdings
        if movable(h) and spans[h.replica] == 1 and h.device in candidates
        and free[h.device] + h.reserved >= demand.per_device
        for d in devices
        if d.id != h.device and d.kind != "cpu" and free[d.id] >= h.reserved
    ]  # fmt: skip
    fits_as_is = any(free[d] >= demand.per_device for d in candidates)
    if isinstance(decision, Move):
        held = next(h for h in holdings if h.replica == decision.replica)
        assert movable(held) and held.device == decision.source != decision.to
        assert decision.moved == min(possible)
        assert decision.then.devices == (decision.source,)
        assert not fits_as_is
    elif possible and not fits_as_is:
        raise AssertionError(f"a move of {min(possible)} bytes would make room, but: {decision}")


def test_the_gateway_table_of_engines_that_park_matches_the_engines() -> None:
    """registry.PARKS (read by the gateway, which imports no engine) says what each engine says."""
    import importlib.util

    from shoal.engines.registry import ENGINES, PARKS, REQUIRES, load_class

    checked = 0
    for engine in ENGINES:
        if importlib.util.find_spec(REQUIRES[engine][0]) is None and engine != "vllm":
            continue  # its module imports its library (vLLM's imports it only when it starts)
        assert load_class(engine).can_park == (engine in PARKS), engine
        checked += 1
    assert checked >= 6
