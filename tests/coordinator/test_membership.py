"""The coordinator's domain, without gRPC: membership rules, worlds, placement epochs, load."""

from __future__ import annotations

import asyncio

import pytest
import torch

from coordinator.errors import (
    EpochMismatchError,
    GenerationMismatchError,
    NoPlacementError,
    ShuttingDownError,
    StaleIncarnationError,
    UnknownWorkerError,
    WorldNotFormedError,
)
from coordinator.membership import Membership, WorkerInfo
from coordinator.policies import ModelFacts
from coordinator.routing_window import LoadWindow
from coordinator.state import CoordinatorState
from coordinator.worlds import DataPlane
from moemesh.errors import (
    ConfigError,
    InvalidRequestError,
    MoemeshError,
    UnavailableError,
)
from moemesh.mesh.placement import Placement, initial_placement, whole_replicas

HANG_S = 10.0  # a hang bound only: these waits end at once when the code is right

LAYERS = (0, 1)
EXPERTS = 8
PLANE = DataPlane("gloo", "127.0.0.1", 12345)


def worker(i: int, incarnation: int = 1) -> WorkerInfo:
    return WorkerInfo(f"w{i}", incarnation, f"127.0.0.1:{6000 + i}", "cpu", "node0")


def state(workers: int = 2, **kwargs) -> CoordinatorState:
    return CoordinatorState(
        num_experts=EXPERTS, moe_layer_ids=LAYERS, expected_workers=workers, data_plane=PLANE, **kwargs
    )


def formed(workers: int = 2, **kwargs) -> CoordinatorState:
    s = state(workers, **kwargs)
    for i in range(workers):
        s.register(worker(i))
    return s


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# -- membership ------------------------------------------------------------------------------


def test_ranks_follow_registration_order_and_world_forms_at_expected_count():
    m = Membership(3)
    assert [m.admit(worker(i)).formed_now for i in (5, 2)] == [False, False]
    assert m.generation == 0 and not m.formed
    last = m.admit(worker(9))
    assert last.rank == 2 and last.formed_now and m.generation == 1
    assert [w.worker_id for w in m.members] == ["w5", "w2", "w9"]


def test_same_incarnation_is_idempotent_and_newer_replaces_in_place():
    m = Membership(3)
    m.admit(worker(0))
    m.admit(worker(1))
    assert m.admit(worker(0)).rank == 0  # a retry
    assert len(m.members) == 2
    again = m.admit(worker(0, incarnation=7))  # restarted before the world formed
    assert again.rank == 0 and m.members[0].incarnation == 7
    assert m.rank_of("w0", 1) is None and m.rank_of("w0", 7) == 0
    with pytest.raises(StaleIncarnationError, match="older"):
        m.admit(worker(0, incarnation=3))


def test_after_forming_newcomers_and_restarts_wait_as_joiners_and_retries_are_fine():
    m = Membership(2)
    m.admit(worker(0))
    m.admit(worker(1))
    late = m.admit(worker(2))  # no longer refused (WorldFormedError): it joins the next generation
    assert (late.rank, late.formed_now) == (2, False)
    assert m.joiners == (worker(2),) and m.due and m.generation == 1
    restarted = m.admit(worker(1, incarnation=2))  # its old entry is dropped at once
    assert m.rank_of("w1", 1) is None and m.rank_of("w1", 2) == restarted.rank == 2
    assert m.admit(worker(0)).rank == 0  # a member's retry
    assert m.admit(worker(1, incarnation=2)).rank == 2  # a joiner's retry
    with pytest.raises(StaleIncarnationError):
        m.admit(worker(1, incarnation=0))
    assert [w.worker_id for w in m.members] == ["w0", "w1"] and m.generation == 1  # until the next forms


@pytest.mark.parametrize("info, message", [
    (WorkerInfo("", 1, "h:1"), "worker_id"),
    (WorkerInfo("w", 1, ""), "address"),
    (WorkerInfo("\x7fw", 1, "h:1"), "printable"),
    (WorkerInfo("w 1", 1, "h:1"), "printable"),
    (WorkerInfo("w" * 257, 1, "h:1"), "printable"),
    (WorkerInfo("w", 1, "127.0.0.(:1"), "HOST:PORT"),
    (WorkerInfo("w", 1, "h"), "HOST:PORT"),
    (WorkerInfo("w", 1, "h:65536"), "HOST:PORT"),
    (WorkerInfo("w", 1, "h:1:2"), "HOST:PORT"),
])
def test_registration_needs_id_and_address(info, message):
    with pytest.raises(InvalidRequestError, match=message):
        Membership(1).admit(info)


@pytest.mark.parametrize("address", ["h:1", "127.0.0.1:50051", "node-3.cluster.local:7000", "[::1]:65535"])
def test_registration_takes_names_and_ip_addresses(address):
    assert Membership(1).admit(WorkerInfo("node0/cpu1", 1, address)).rank == 0


def test_heartbeats_and_silence_are_reported_once():
    clock = FakeClock()
    m = Membership(2, clock)
    m.admit(worker(0))
    m.admit(worker(1))
    with pytest.raises(UnknownWorkerError):
        m.touch("w0", 99)
    with pytest.raises(UnknownWorkerError):
        m.touch("nobody", 1)
    clock.now = 5.0
    assert m.touch("w0", 1) is False
    clock.now = 11.0
    assert [s.worker.worker_id for s in m.newly_silent(10.0)] == ["w1"]
    assert m.newly_silent(10.0) == []  # reported once
    assert m.touch("w1", 1) is True  # back
    clock.now = 30.0
    assert sorted(s.worker.worker_id for s in m.newly_silent(10.0)) == ["w0", "w1"]


# -- worlds ----------------------------------------------------------------------------------


def test_register_reports_world_once_formed_and_initial_placement_is_round_robin():
    s = state(2)
    first = s.register(worker(0))
    assert (first.rank, first.world_size, first.generation) == (0, 0, 0)
    with pytest.raises(NoPlacementError) as info:
        s.current()
    assert isinstance(info.value, UnavailableError)
    second = s.register(worker(1))
    assert (second.rank, second.world_size, second.generation) == (1, 2, 1)
    world = s.world
    assert world is not None and world.generation == 1 and world.store_prefix == "gen1/"
    assert world.placement_epoch == 1 and world.data_plane == PLANE
    assert world.rank_of("w1", 1) == 1 and world.rank_of("w1", 2) == -1 and world.rank_of("", 0) == -1
    current = s.current()
    assert current.world_generation == 1
    expected = initial_placement(EXPERTS, LAYERS, 2)
    assert current.placement.layers == expected.layers
    assert (current.placement.epoch, current.placement.origin) == (1, "round_robin")


def test_wait_for_world_blocks_until_formed_and_honours_cancellation():
    async def scenario():
        s = state(2)
        waiters = [asyncio.create_task(s.wait_for_world()) for _ in range(3)]
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(s.wait_for_world(), 0.05)  # a caller's deadline
        s.register(worker(0))
        await asyncio.sleep(0)
        assert not any(w.done() for w in waiters)
        s.register(worker(1))
        worlds = await asyncio.wait_for(asyncio.gather(*waiters), HANG_S)
        assert all(w is s.world for w in worlds)
        assert (await s.wait_for_world(0)).generation == 1  # already formed: immediate
        newer = asyncio.create_task(s.wait_for_world(after_generation=1))
        await asyncio.sleep(0.01)
        assert not newer.done()
        s.close()
        with pytest.raises(ShuttingDownError):
            await newer

    asyncio.run(scenario())


def test_initial_placement_from_file_is_validated_against_model_and_workers():
    table = tuple((e % 2,) for e in range(EXPERTS))
    reversed_table = tuple(((e + 1) % 2,) for e in range(EXPERTS))
    given = whole_replicas(0, 2, {0: table, 1: reversed_table}, origin="file")
    s = formed(2, initial=given)
    assert s.current().placement.layers == given.layers
    assert (s.current().placement.epoch, s.current().placement.origin) == (1, "file")
    with pytest.raises(ConfigError, match="3 workers"):
        state(3, initial=given)
    with pytest.raises(ConfigError, match="does not fit"):
        state(2, initial=whole_replicas(0, 2, {0: table}, origin="file"))


# -- placements ------------------------------------------------------------------------------


def swapped(world_size: int = 2) -> Placement:
    table = tuple(((e + 1) % world_size,) for e in range(EXPERTS))
    return whole_replicas(0, world_size, {layer: table for layer in LAYERS}, origin="operator")


def test_set_placement_publishes_next_epoch_as_manual():
    s = formed(2)
    published = s.set_placement(swapped(), world_generation=1, expected_epoch=1)
    assert (published.placement.epoch, published.placement.origin) == (2, "manual")
    assert s.current() is published
    assert s.set_placement(swapped(), world_generation=1).placement.epoch == 3  # 0 = unconditional


def test_set_placement_rejections_change_nothing():
    with pytest.raises(WorldNotFormedError):
        state(2).set_placement(swapped(), world_generation=1)
    s = formed(2)
    with pytest.raises(GenerationMismatchError):
        s.set_placement(swapped(), world_generation=2)
    with pytest.raises(InvalidRequestError, match="epoch must be 0"):
        s.set_placement(Placement(5, 2, swapped().replicas), world_generation=1)
    with pytest.raises(InvalidRequestError, match="3 ranks"):
        s.set_placement(swapped(3), world_generation=1)
    bad = Placement(0, 2, {0: swapped().replicas[0], 1: swapped().replicas[0][:-1]})
    with pytest.raises(InvalidRequestError, match="7 experts placed"):
        s.set_placement(bad, world_generation=1)
    with pytest.raises(EpochMismatchError, match="expected placement epoch 4") as info:
        s.set_placement(swapped(), world_generation=1, expected_epoch=4)
    assert type(info.value).__mro__[1] is MoemeshError  # -> FAILED_PRECONDITION
    assert s.current().placement.epoch == 1


def test_watch_streams_current_then_each_new_epoch_in_order():
    async def scenario():
        s = state(2)
        got: list[int] = []

        async def watch(after: int) -> None:
            async for item in s.watch(after):
                got.append(item.placement.epoch)

        task = asyncio.create_task(watch(0))
        for i in range(2):
            s.register(worker(i))
        s.set_placement(swapped(), 1)
        s.set_placement(swapped(), 1)  # two epochs before the watcher runs: both arrive
        await asyncio.sleep(0.01)
        assert got == [1, 2, 3]
        late: list[int] = [p.placement.epoch async for p in _take(s.watch(after_epoch=2), 1)]
        assert late == [3]
        s.close()
        await asyncio.wait_for(task, HANG_S)  # the watch ends on close
        assert got == [1, 2, 3]

    asyncio.run(scenario())


async def _take(stream, n: int):
    async for item in stream:
        yield item
        n -= 1
        if n == 0:
            return


# -- load ------------------------------------------------------------------------------------


def test_load_reports_accumulate_per_world_in_a_sliding_window():
    s = formed(2, load_window=2)
    ones = torch.ones(2, EXPERTS, dtype=torch.int64)
    with pytest.raises(InvalidRequestError, match=r"shape \[8, 2\], expected \[2, 8\]"):
        s.report_load("w0", 1, 1, 4, ones.T.contiguous())
    with pytest.raises(InvalidRequestError, match="int64"):
        s.report_load("w0", 1, 1, 4, ones.float())
    with pytest.raises(InvalidRequestError, match="negative"):
        s.report_load("w0", 1, 1, 4, -ones)
    with pytest.raises(UnknownWorkerError):
        s.report_load("w9", 1, 1, 4, ones)
    assert s.report_load("w0", 1, 0, 4, ones) is False  # made before any world: ignored
    for k in (1, 2, 3):
        assert s.report_load("w0", 1, 1, k, ones * k)
    assert s.report_load("w1", 1, 1, 10, ones * 10)
    snap = s.load_snapshot()
    assert snap.window_tokens == 2 + 3 + 10  # w0 keeps its last 2 reports
    assert torch.equal(snap.expert_counts, ones * 15)


def test_load_window_starts_empty():
    snap = LoadWindow(2, 4, 3).snapshot()
    assert snap.window_tokens == 0 and torch.equal(snap.expert_counts, torch.zeros(2, 4, dtype=torch.int64))


def test_check_heartbeats_warns_about_silent_workers(caplog):
    clock = FakeClock()
    s = state(2, clock=clock)
    s.register(worker(0))
    clock.now = 4.0
    with caplog.at_level("WARNING", logger="coordinator.state"):
        assert s.check_heartbeats(3.0)[0].worker.worker_id == "w0"
    assert "worker 'w0' (127.0.0.1:6000) has not sent a heartbeat for 4.0s" in caplog.text
    assert s.heartbeat("w0", 1).world_generation == 0
    assert s.check_heartbeats(3.0) == []


FACTS = ModelFacts(top_k=2, hidden_size=16, expert_intermediate_size=32, dtype_bytes=4)  # 6 KiB per fp32 expert


def test_expert_shards_split_the_initial_placement():
    s = formed(4, facts=FACTS, expert_shards=2)
    p = s.current().placement
    assert p.groups(LAYERS[0], 0) == ((0, 1),) and p.experts_per_rank(LAYERS[0]) == [4] * 4


def test_auto_shards_split_experts_too_big_for_the_reported_memory():
    memory = len(LAYERS) * 3 * 16 * 32 * 2  # one whole bf16 expert per MoE layer
    s = state(16, facts=FACTS, expert_shards=0)
    for i in range(16):  # 8 experts on 16 workers: one expert each fits only if whole experts fit
        s.register(WorkerInfo(f"w{i}", 1, f"h:{i}", memory_bytes=memory, weight_bytes_per_element=2))
    assert not s.current().placement.has_shard_groups  # bf16 experts (half the fp32 size) fit whole
    small = state(16, facts=FACTS, expert_shards=0)
    for i in range(16):
        small.register(WorkerInfo(f"w{i}", 1, f"h:{i}", memory_bytes=memory, weight_bytes_per_element=4))
    p = small.current().placement
    assert p.groups(LAYERS[0], 3) == ((6, 7),)  # fp32 experts are split in two to fit


def test_set_placement_checks_that_shards_divide_the_expert_hidden_size():
    s = formed(3, facts=FACTS)
    table = tuple(((e % 3,),) for e in range(EXPERTS))
    bad = Placement(0, 3, {LAYERS[0]: (((0, 1, 2),), *table[1:]), LAYERS[1]: (((0,), (1,), (2,)), *table[1:])})
    with pytest.raises(InvalidRequestError, match="hidden size 32 does not split into 3"):
        s.set_placement(bad, world_generation=1)


# -- generations -----------------------------------------------------------------------------


def formed_membership(workers: int = 4, clock: FakeClock | None = None) -> Membership:
    m = Membership(workers, clock or FakeClock())
    for i in range(workers):
        m.admit(worker(i))
    return m


def ids(members) -> list[str]:
    return [w.worker_id for w in members]


def test_nothing_is_due_until_something_changes():
    m = formed_membership()
    assert not m.due and m.form_next() is None and m.generation == 1
    assert not Membership(2).due  # nor before the first world


def test_next_generation_keeps_survivors_in_rank_order_then_joiners_in_registration_order():
    m = formed_membership(4)
    assert m.evict("w1", 1, "dead")
    m.admit(worker(7))
    m.admit(worker(5))
    t = m.form_next()
    assert t is not None and t.generation == 2 == m.generation
    assert ids(t.members) == ["w0", "w2", "w3", "w7", "w5"] == ids(m.members)
    assert t.rank_map == {0: 0, 2: 1, 3: 2}
    assert [(w.worker_id, why) for w, why in t.lost] == [("w1", "dead")]
    assert ids(t.joined) == ["w7", "w5"] and not t.broken
    assert m.rank_of("w7", 1) == 3 and m.joiners == () and not m.due
    with pytest.raises(UnknownWorkerError):  # the evicted worker must register again
        m.touch("w1", 1)


def test_a_restarted_member_is_lost_and_rejoins_last():
    m = formed_membership(3)
    m.admit(worker(0, incarnation=2))
    t = m.form_next()
    assert t is not None and ids(t.members) == ["w1", "w2", "w0"] and t.members[2].incarnation == 2
    assert t.rank_map == {1: 0, 2: 1}
    assert [(w.incarnation, why) for w, why in t.lost] == [(1, "restarted (incarnation 1 -> 2)")]


def test_a_broken_world_forms_again_even_when_everyone_survives():
    m = formed_membership(2)
    m.break_world()
    assert m.due
    t = m.form_next()
    assert t is not None and t.broken and t.rank_map == {0: 0, 1: 1} and t.lost == () and t.joined == ()
    assert not m.due


def test_a_leaving_member_stays_registered_until_the_next_generation_forms_without_it():
    m = formed_membership(3)
    assert m.leave("w1", 1) is True and m.leave("w1", 1) is True  # idempotent
    assert m.due and m.touch("w1", 1) is False  # still heartbeating meanwhile
    m.admit(worker(8))
    assert m.leave("w8", 1) is False and not m.joiners  # a joiner just goes
    t = m.form_next()
    assert t is not None and ids(t.members) == ["w0", "w2"]
    assert [(w.worker_id, why) for w, why in t.lost] == [("w1", "left")]
    with pytest.raises(UnknownWorkerError):
        m.leave("w1", 1)


def test_no_generation_of_zero_members_forms_until_someone_registers():
    m = formed_membership(2)
    for i in range(2):
        m.evict(f"w{i}", 1, "dead")
    assert m.due and m.form_next() is None and m.generation == 1
    m.admit(worker(4))
    t = m.form_next()
    assert t is not None and ids(t.members) == ["w4"] and t.rank_map == {} and t.generation == 2


def test_silent_workers_after_formation_include_joiners():
    clock = FakeClock()
    m = formed_membership(2, clock)
    clock.now = 1.0
    m.admit(worker(3))
    m.touch("w0", 1)
    clock.now = 10.5
    assert ids(s.worker for s in m.newly_silent(10.0)) == ["w1"]
    clock.now = 12.0
    assert ids(s.worker for s in m.newly_silent(10.0)) == ["w0", "w3"]
    assert m.evict("w3", 1, "silent") and not m.evict("w3", 1, "silent") and not m.evict("w0", 9, "wrong")


def test_silence_counts_from_the_forming_of_the_workers_world():
    clock = FakeClock()
    m = Membership(2, clock)
    m.admit(worker(0))
    clock.now = 50.0  # w0 waited long for its peer
    m.admit(worker(1))
    clock.now = 55.0
    assert m.newly_silent(10.0) == []  # both joined generation 1 at 50.0
    m.admit(worker(2))
    clock.now = 70.0
    m.form_next()
    clock.now = 75.0
    assert m.newly_silent(10.0) == []
    clock.now = 80.5
    assert ids(s.worker for s in m.newly_silent(10.0)) == ["w0", "w1", "w2"]
