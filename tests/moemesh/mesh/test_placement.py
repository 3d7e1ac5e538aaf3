"""moemesh.mesh.placement: initial and split placements, shard groups, validation, fitting memory."""

from __future__ import annotations

import pytest

from moemesh.errors import InvalidRequestError
from moemesh.mesh.placement import (Placement, initial_placement, shards_to_fit, split_placement,
                                    validate_placement)
from moemesh.mesh.placement_wire import placement_from_proto, placement_to_proto
from moemesh.model.shard import WHOLE, Shard

LAYERS = (0, 2)


def test_round_robin_without_shards_is_unchanged():
    p = initial_placement(4, LAYERS, world_size=3)
    assert p.layers[0] == ((0,), (1,), (2,), (0,)) and not p.shards
    assert p.groups(0, 3) == ((0,),) and p.pieces_on(0, 0) == (WHOLE, WHOLE)


def test_split_placement_gives_each_rank_one_shard_when_ranks_are_experts_times_shards():
    p = split_placement(4, LAYERS, world_size=8, shards=2)
    validate_placement(p, 4, LAYERS, expert_hidden=64)
    assert p.layers[2] == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert p.groups(2, 1) == ((2, 3),)
    assert [p.pieces_on(r, 0) for r in (2, 3)] == [(Shard(0, 2),), (Shard(1, 2),)]
    assert p.experts_per_rank(0) == [1] * 8


def test_split_placement_wraps_and_adds_spare_groups_as_replicas():
    wrapped = split_placement(3, LAYERS, world_size=4, shards=2)  # 6 shards over 4 ranks
    validate_placement(wrapped, 3, LAYERS)
    assert wrapped.shards[0] == {0: ((0, 1),), 1: ((2, 3),), 2: ((0, 1),)}
    spare = split_placement(2, LAYERS, world_size=7, shards=2)  # 4 shards, one spare group, one idle rank
    validate_placement(spare, 2, LAYERS)
    assert spare.groups(0, 0) == ((0, 1), (4, 5)) and spare.experts_on(6, 0) == ()


def test_split_needs_enough_ranks():
    with pytest.raises(InvalidRequestError, match="cannot split experts over 3 ranks with 2 ranks"):
        initial_placement(4, LAYERS, world_size=2, shards=3)


def _with_shards(shards, table=((0, 1), (1, 2), (2,))):
    return Placement(epoch=1, world_size=3, layers={0: table}, shards={0: shards})


@pytest.mark.parametrize("shards, message", [
    ({0: ((0,),)}, "needs at least 2 distinct ranks"),
    ({0: ((0, 0),)}, "needs at least 2 distinct ranks"),
    ({2: ((2, 1),)}, "must also be listed as holders"),
    ({5: ((0, 1),)}, "expert 5, not in 0..2"),
])
def test_bad_shard_groups_are_named(shards, message):
    with pytest.raises(InvalidRequestError, match=message):
        validate_placement(_with_shards(shards), 3, (0,))


def test_a_rank_cannot_hold_two_parts_of_one_expert():
    p = _with_shards({0: ((0, 1), (1, 2))}, table=((0, 1, 2), (1,), (2,)))
    with pytest.raises(InvalidRequestError, match="a rank holds two parts"):
        validate_placement(p, 3, (0,))


def test_shards_must_divide_the_expert_hidden_size():
    p = _with_shards({0: ((2, 0, 1),)}, table=((0, 1, 2), (1,), (2,)))
    validate_placement(p, 3, (0,), expert_hidden=48)
    with pytest.raises(InvalidRequestError, match="hidden size 64 does not split into 3"):
        validate_placement(p, 3, (0,), expert_hidden=64)
    assert [p.shard_of(r, 0, 0) for r in (0, 1, 2)] == [Shard(1, 3), Shard(2, 3), Shard(0, 3)]


def test_wire_round_trip_keeps_shard_groups_and_lists_only_whole_replicas_as_ranks():
    p = Placement(epoch=4, world_size=4, layers={0: ((0, 2, 3), (1,))}, shards={0: {0: ((3, 2),)}})
    msg = placement_to_proto(p, world_generation=2)
    slots = msg.layers[0].experts[0]
    assert list(slots.ranks) == [0] and [list(g.ranks) for g in slots.shard_groups] == [[3, 2]]
    back = placement_from_proto(msg)
    assert (back.layers, back.shards, back.epoch) == (p.layers, p.shards, 4)


@pytest.mark.parametrize("experts, ranks, memory, expected", [
    (4, 8, 0, (1, True)),  # unknown memory: no bound
    (4, 8, 100, (1, True)),  # one 100-byte expert per rank fits
    (4, 8, 60, (2, True)),  # too big for one device: halves of 50 bytes, one per rank
    (4, 8, 30, (2, False)),  # quarters come 2 per rank (50 bytes): nothing fits; halves need least
    (8, 4, 150, (1, False)),  # 2 experts per rank: splitting cannot lower a rank's share
])
def test_shards_to_fit_splits_experts_too_big_for_one_device(experts, ranks, memory, expected):
    assert shards_to_fit(expert_bytes=100, memory_bytes=[memory] * ranks, expert_hidden=64, num_experts=experts,
                         num_moe_layers=1) == expected
