"""The coordinator's state file: snapshots round-trip through their text and through a restarted
CoordinatorState (no gRPC; the restarted server and mesh run in test_server.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from coordinator import durable
from coordinator.durable import Snapshot
from coordinator.membership import Record, WorkerInfo
from coordinator.state import CoordinatorState
from coordinator.worlds import DataPlane
from moemesh.errors import ConfigError
from moemesh.mesh.placement import Placement

LAYERS = (0, 1)
EXPERTS = 4
PLANE = DataPlane("gloo", "127.0.0.1", 23456)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def worker(i: int, incarnation: int = 1) -> WorkerInfo:
    return WorkerInfo(f"w{i}", incarnation, f"127.0.0.1:{6000 + i}", "cpu", f"node{i}", memory_bytes=1 << 30,
                      weight_bytes_per_element=4)


def state(workers: int = 3, clock: Clock | None = None, **kwargs) -> CoordinatorState:
    return CoordinatorState(num_experts=EXPERTS, moe_layer_ids=LAYERS, expected_workers=workers, data_plane=PLANE,
                            clock=clock or Clock(), **kwargs)


def test_a_snapshot_with_shard_groups_gating_and_a_broken_world_round_trips_through_its_text():
    placement = Placement(epoch=7, world_size=3, origin="recovery",
                          replicas={0: (((0,), (1, 2)), ((1,),), ((2,), (0,)), ((0, 1),)),
                                    1: (((2,),), ((0,),), ((1,),), ((0,), (2,)))},
                          gating={0: (1.0, 0.3, 0.7, 1.25)})
    members = (worker(0), worker(1, incarnation=5), worker(2))
    snapshot = Snapshot(
        store_port=40123,
        membership=Record(generation=4, registered=(members[0], members[1], worker(3)), members=members,
                          leaving=("w1",), broken=True),
        world_epoch=6, unservable_reason="", placement=placement, forced=((0, 3, (0, 1)),))
    back = durable.decode(durable.encode(snapshot))
    assert back == snapshot
    assert back.placement is not None and back.placement.gating == placement.gating
    assert back.next_epoch == 8


def test_a_snapshot_before_the_first_world_round_trips_and_a_malformed_file_is_refused(tmp_path: Path):
    early = Snapshot(store_port=0, membership=Record(0, (worker(0),), ()))
    assert durable.decode(durable.encode(early)) == early and early.next_epoch == 1
    path = tmp_path / "coordinator.state"
    assert durable.read(path) is None
    durable.write(path, early)
    assert durable.read(path) == early
    assert [p.name for p in tmp_path.iterdir()] == ["coordinator.state"]  # no temporary file left
    path.write_text('{"version": 1, "store_port": 1}')
    with pytest.raises(ConfigError, match="not a coordinator state file"):
        durable.read(path)
    mismatched = durable.encode(replace(early, membership=Record(2, (worker(0),), (worker(0),))))
    with pytest.raises(ConfigError, match="generation 2 with 1 members and no placement"):
        durable.decode(mismatched)


def test_every_change_is_handed_on_and_a_restored_state_resumes_the_same_world():
    written: list[Snapshot] = []
    s = state(on_change=written.append)
    for i in range(3):
        s.register(worker(i))
    s.register(worker(3))  # a joiner, waiting for generation 2
    assert written[-1].membership.generation == 1 and len(written[-1].membership.registered) == 4
    s.leave("w2", 1)
    assert written[-1].membership.leaving == ("w2",)
    assert s.form_next_world() is not None  # generation 2: w0, w1, w3
    last = written[-1]
    assert last == s.snapshot() and last.membership.generation == 2
    assert durable.decode(durable.encode(last)) == last

    clock = Clock()
    restarted = state(clock=clock)
    restarted.restore(durable.decode(durable.encode(last)))
    world, old = restarted.world, s.world
    assert world is not None and old is not None
    assert (world.generation, world.members, world.placement_epoch) == (old.generation, old.members,
                                                                        old.placement_epoch)
    assert restarted.current() == s.current()
    assert not restarted.membership.due and not restarted.changed.is_set()  # nothing new to form
    assert restarted.rank_in(world, "w3", 1) == 2
    assert restarted.heartbeat("w1", 1).world_generation == 2
    # Heartbeat clocks restart at the restore: a member silent past the timeout from then is evicted.
    clock.now += 5.0
    restarted.heartbeat("w0", 1)
    restarted.heartbeat("w1", 1)
    clock.now += 6.0
    assert [x.worker.worker_id for x in restarted.check_heartbeats(10.0)] == ["w3"]
    nxt = restarted.form_next_world()
    assert nxt is not None and nxt.generation == 3 and [m.worker_id for m in nxt.members] == ["w0", "w1"]
    assert restarted.current().placement.epoch > s.current().placement.epoch


def test_a_loss_reported_before_the_restart_is_probed_after_it():
    s = state()
    for i in range(3):
        s.register(worker(i))
    s.report_world_lost("w0", 1, 1, "peer closed the connection")
    restarted = state()
    restarted.restore(s.snapshot())
    assert restarted.changed.is_set() and restarted.membership.due
    assert sorted(w.worker_id for w in restarted.take_suspects()) == ["w0", "w1", "w2"]
