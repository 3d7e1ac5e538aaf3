"""CoordinatorState's generations, without gRPC: re-formed worlds, their placements, waiting,
loss reports, leaves, suspects and evictions (the probing task runs in test_server.py)."""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch

from coordinator.errors import UnknownWorkerError
from coordinator.membership import WorkerInfo
from coordinator.policies import ModelFacts
from coordinator.state import CoordinatorState
from coordinator.worlds import DataPlane
from moemesh.errors import NotFoundError

HANG_S = 10.0  # a hang bound only: these waits end at once when the code is right

LAYERS = (0, 1)
EXPERTS = 8
PLANE = DataPlane("gloo", "127.0.0.1", 12345)
FACTS = ModelFacts(top_k=2, hidden_size=16, expert_intermediate_size=32, dtype_bytes=4)
EXPERT_BYTES = 3 * 16 * 32 * 4  # one fp32 expert of FACTS


def worker(i: int, incarnation: int = 1, memory: int = 0) -> WorkerInfo:
    return WorkerInfo(f"w{i}", incarnation, f"127.0.0.1:{6000 + i}", "cpu", "node0", memory_bytes=memory)


def formed(workers: int = 4, **kwargs) -> CoordinatorState:
    s = CoordinatorState(num_experts=EXPERTS, moe_layer_ids=LAYERS, expected_workers=workers, data_plane=PLANE,
                         **kwargs)
    for i in range(workers):
        s.register(worker(i))
    return s


def held(s: CoordinatorState, epoch: int | None = None, layer: int = 0) -> list[tuple[int, ...]]:
    p = s.current().placement
    assert epoch is None or p.epoch == epoch
    return [p.experts_on(r, layer) for r in range(p.world_size)]


def test_the_first_world_with_redundancy_holds_every_expert_twice():
    s = formed(4, redundancy=1)
    p = s.current().placement
    assert (p.epoch, p.origin) == (1, "round_robin")
    assert all(len(p.layers[layer][e]) == 2 for layer in LAYERS for e in range(EXPERTS))
    assert s.generations_formed == 1


def test_a_reported_loss_probes_the_members_then_forms_the_next_world_without_the_dead(caplog):
    s = formed(4)
    assert s.changed.is_set() is False
    assert s.report_world_lost("w0", 1, 1, "allreduce timed out") == 1
    assert s.report_world_lost("w3", 1, 1, "allreduce timed out") == 1
    assert s.changed.is_set()
    # Every member but the reporters is probed, once.
    assert sorted(w.worker_id for w in s.take_suspects()) == ["w1", "w2"]
    assert s.take_suspects() == []
    s.evict(worker(2), "did not answer a health probe")
    with caplog.at_level(logging.INFO, logger="coordinator.state"):
        world = s.form_next_world()
    assert world is not None and world is s.world
    assert (world.generation, [m.worker_id for m in world.members]) == (2, ["w0", "w1", "w3"])
    assert world.placement_epoch == 2 and world.unservable_reason == ""
    first = s._history[-2]
    assert (first.placement.epoch, first.world_generation, first.placement.origin) == (2, 2, "recovery")
    assert [first.placement.experts_on(r, 0) for r in range(3)] == [(0, 2, 4), (1, 5, 6), (3, 7)]
    # The epoch after levels experts per rank (loaded in the background while the world serves).
    assert s.current().world_generation == 2 and [len(e) for e in held(s, epoch=3)] == [3, 3, 3]
    assert (s.generations_formed, s.recoveries, s.evictions) == (2, 1, 1)
    assert "world generation 2 formed" in caplog.text and "lost: w2 (did not answer a health probe)" in caplog.text
    assert "placement epoch 2 then 3 (recovery)" in caplog.text
    # Every rank of the new world starts on its first epoch, asked for by number, not the one in force.
    assert s.published(world.placement_epoch) is first and s.published(0) is s.current()
    with pytest.raises(NotFoundError, match="epoch 9 was never published"):
        s.published(9)
    assert s.report_world_lost("w1", 1, 1, "late") == 2  # an older generation: answered at once
    assert not s.membership.due


def test_a_loss_report_from_a_stranger_is_not_found_and_every_member_alive_still_forms_a_new_world():
    s = formed(2)
    with pytest.raises(UnknownWorkerError):
        s.report_world_lost("ghost", 1, 1, "")
    s.report_world_lost("w0", 1, 1, "collective timed out on a slow peer")
    assert [w.worker_id for w in s.take_suspects()] == ["w1"]  # it answers: nobody is evicted
    world = s.form_next_world()
    assert world is not None and world.generation == 2 and world.size == 2
    assert held(s, epoch=2) == [(0, 2, 4, 6), (1, 3, 5, 7)]  # nothing to load, nothing to level
    assert s.recoveries == 1 and s.evictions == 0


def test_a_joiner_gets_experts_and_leaving_forms_a_world_without_the_leaver():
    s = formed(2)
    reg = s.register(worker(5))
    assert (reg.rank, reg.world_size, reg.generation) == (2, 0, 0)  # not in a world yet
    assert s.changed.is_set() and s.take_suspects() == []
    world = s.form_next_world()
    assert world is not None and world.size == 3 and s.recoveries == 0
    assert held(s, epoch=3) == [(0, 2, 4, 6), (1, 3, 5, 7), (0, 1, 2, 3)]  # epoch 2 had it empty
    assert s.register(worker(5)).generation == 2  # now a member
    s.changed.clear()
    s.leave("w0", 1)
    s.leave("w0", 1)
    assert s.changed.is_set() and s.heartbeat("w0", 1).world_generation == 2
    s.report_world_lost("w1", 1, 2, "a peer left the world at a step header")  # the leaver's peers say so
    assert [w.worker_id for w in s.take_suspects()] == ["w5"]  # the leaver is not probed (nor "evicted")
    world = s.form_next_world()
    assert world is not None and [m.worker_id for m in world.members] == ["w1", "w5"]
    with pytest.raises(UnknownWorkerError):
        s.leave("w0", 1)


def test_silence_evicts_after_formation():
    clock = [0.0]
    s = formed(2, clock=lambda: clock[0])
    clock[0] = 5.0
    s.heartbeat("w0", 1)
    clock[0] = 12.0
    assert [x.worker.worker_id for x in s.check_heartbeats(10.0)] == ["w1"]
    assert s.evictions == 1 and s.changed.is_set()
    world = s.form_next_world()
    assert world is not None and [m.worker_id for m in world.members] == ["w0"]
    assert held(s) == [tuple(range(EXPERTS))]


def test_a_vanished_watcher_is_a_suspect_only_while_a_member():
    s = formed(2)
    s.watcher_gone("w1", 1)
    s.watcher_gone("ghost", 1)
    assert [w.worker_id for w in s.take_suspects()] == ["w1"]
    s.watcher_gone("w1", 1)
    s.evict(worker(1), "dead")
    assert s.take_suspects() == []  # evicted meanwhile: no probe


def test_a_world_with_no_room_for_an_orphan_is_unservable():
    memory = 2 * len(LAYERS) * EXPERT_BYTES  # exactly the two experts per layer each holds
    s = CoordinatorState(num_experts=EXPERTS, moe_layer_ids=LAYERS, expected_workers=4, data_plane=PLANE,
                         facts=FACTS)
    for i in range(4):
        s.register(worker(i, memory=memory))
    s.evict(worker(2, memory=memory), "dead")
    world = s.form_next_world()
    assert world is not None
    assert "layer 0 expert 2 has no replica left and no member has room" in world.unservable_reason
    assert s.current().placement.epoch == world.placement_epoch  # no spread epoch for an unservable world
    s.register(worker(9, memory=memory))  # a joiner with room for the two orphans of each layer
    world = s.form_next_world()
    assert world is not None and world.unservable_reason == ""
    first = next(h.placement for h in s._history if h.placement.epoch == world.placement_epoch)
    assert first.experts_on(3, 0) == (2, 6) and first.experts_on(3, 1) == (2, 6)


def test_load_reports_of_an_older_generation_are_discarded():
    s = formed(2)
    ones = torch.ones(len(LAYERS), EXPERTS, dtype=torch.int64)
    assert s.report_load("w0", 1, 1, 4, ones)
    s.register(worker(2))
    s.form_next_world()
    assert s.load_snapshot().window_tokens == 0  # a window never straddles two worlds
    assert s.report_load("w0", 1, 1, 4, ones) is False
    assert s.report_load("w2", 1, 2, 4, ones) and s.load_snapshot().window_tokens == 4


def test_wait_for_world_follows_generations_and_answers_an_evicted_worker_at_once():
    async def scenario():
        s = formed(2)
        member = asyncio.create_task(s.wait_for_world(1, "w0", 1))
        observer = asyncio.create_task(s.wait_for_world(1))
        s.register(worker(3))
        joiner = asyncio.create_task(s.wait_for_world(0, "w3", 1))  # not in generation 1: waits for 2
        await asyncio.sleep(0.01)
        assert not any(t.done() for t in (member, observer, joiner))
        s.evict(worker(1), "dead")
        evicted = await asyncio.wait_for(s.wait_for_world(1, "w1", 1), HANG_S)
        assert evicted.generation == 1 and s.rank_in(evicted, "w1", 1) == -1  # newest: generation 1 still
        s.form_next_world()
        worlds = await asyncio.wait_for(asyncio.gather(member, observer, joiner), HANG_S)
        assert {w.generation for w in worlds} == {2} and worlds[2].rank_of("w3", 1) == 1
        late = await asyncio.wait_for(s.wait_for_world(2, "w1", 1), HANG_S)
        assert late.generation == 2 and s.rank_in(late, "w1", 1) == -1
        assert s.rank_in(late, "w0", 1) == 0 and s.rank_in(late, "", 0) == -1
        s.close()

    asyncio.run(scenario())
