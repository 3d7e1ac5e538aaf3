"""moemesh.mesh.placement: the one representation (replica groups), its canonical order and derived
queries, initial and split placements, validation, the lossless wire form, fitting memory."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moemesh.errors import InvalidRequestError
from moemesh.mesh.placement import (
    Placement,
    PlacementFormError,
    initial_placement,
    shards_to_fit,
    split_placement,
    validate_placement,
    whole_replicas,
    with_split,
)
from moemesh.mesh.placement_wire import placement_from_proto, placement_to_proto
from moemesh.model.shard import WHOLE, Shard
from tests.moemesh.mesh.placement_strategies import num_experts, placements

LAYERS = (0, 2)


def test_round_robin_without_shards_is_unchanged():
    p = initial_placement(4, LAYERS, world_size=3)
    assert p.layers[0] == ((0,), (1,), (2,), (0,)) and not p.has_shard_groups
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
    assert wrapped.replicas[0] == (((0, 1),), ((2, 3),), ((0, 1),))
    spare = split_placement(2, LAYERS, world_size=7, shards=2)  # 4 shards, one spare group, one idle rank
    validate_placement(spare, 2, LAYERS)
    assert spare.groups(0, 0) == ((0, 1), (4, 5)) and spare.experts_on(6, 0) == ()


def test_split_needs_enough_ranks():
    with pytest.raises(InvalidRequestError, match="cannot split experts over 3 ranks with 2 ranks"):
        initial_placement(4, LAYERS, world_size=2, shards=3)


def _placed(expert0, rest=(((1,), (2,)), ((2,),))):
    return Placement(epoch=1, world_size=3, replicas={0: (expert0, *rest)})


@pytest.mark.parametrize("expert0, message", [
    ((), "expert 0: no rank holds it"),
    (((),), "expert 0: no rank holds it"),
    (((0, 0),), "a rank holds two parts"),
    (((0, 3),), "rank 3 not in 0..2"),
    (((0,), (0,)), "rank listed twice"),
])
def test_bad_replica_groups_are_named(expert0, message):
    with pytest.raises(InvalidRequestError, match=message):
        validate_placement(_placed(expert0), 3, (0,))


def test_expert_count_layers_and_gating_are_checked():
    p = _placed(((0, 1),))
    with pytest.raises(InvalidRequestError, match="3 experts placed, the model has 4"):
        validate_placement(p, 4, (0,))
    with pytest.raises(InvalidRequestError, match=r"covers MoE layers \[0\], the model has \[0, 1\]"):
        validate_placement(p, 3, (0, 1))
    with pytest.raises(InvalidRequestError, match="gating factors must be 3 positive values"):
        validate_placement(replace(p, gating={0: (1.0, 0.0, 1.0)}), 3, (0,))
    with pytest.raises(InvalidRequestError, match="layer 1, which the placement does not cover"):
        validate_placement(replace(p, gating={1: (1.0, 1.0, 1.0)}), 3, (0,))
    validate_placement(replace(p, gating={0: (1.0, 0.5, 2.0)}), 3, (0,))


def test_a_rank_cannot_hold_two_parts_of_one_expert():
    p = _placed(((0, 1), (1, 2)), rest=(((1,),), ((2,),)))
    with pytest.raises(InvalidRequestError, match="a rank holds two parts"):
        validate_placement(p, 3, (0,))


def test_shards_must_divide_the_expert_hidden_size():
    p = _placed(((2, 0, 1),), rest=(((1,),), ((2,),)))
    validate_placement(p, 3, (0,), expert_hidden=48)
    with pytest.raises(InvalidRequestError, match="hidden size 64 does not split into 3"):
        validate_placement(p, 3, (0,), expert_hidden=64)
    assert [p.shard_of(r, 0, 0) for r in (0, 1, 2)] == [Shard(1, 3), Shard(2, 3), Shard(0, 3)]


def test_canonical_order_whole_replicas_by_rank_then_shard_groups():
    p = Placement(1, 8, {0: (((7, 6), (5,), (1, 2), (3,)),)}, gating={0: (0.1,), 1: ()})
    assert p.groups(0, 0) == ((3,), (5,), (1, 2), (7, 6))  # a group's own order is its shard order
    assert p == Placement(1, 8, {0: (((3,), (1, 2), (5,), (7, 6)),)}, gating={0: (0.1,)})
    assert p.gating == {0: (0.10000000149011612,)}  # float32, as on the wire
    assert p.layers[0] == ((1, 2, 3, 5, 6, 7),) and p.experts_per_rank(0) == [0, 1, 1, 1, 0, 1, 1, 1]
    assert (p.shard_of(6, 0, 0), p.shard_of(5, 0, 0)) == (Shard(1, 2), WHOLE)


def test_with_split_turns_one_whole_replica_into_a_shard_group():
    p = initial_placement(4, LAYERS, world_size=6, epoch=3)  # spare ranks 4, 5 replicate experts 0, 1
    new = with_split(p, 2, 0, (4, 3))
    assert new.groups(2, 0) == ((0,), (4, 3)) and new.replicas[0] == p.replicas[0]
    assert new.assignment(3) == {0: [3], 2: [0, 3]} and new.pieces_on(3, 2) == (Shard(1, 2), WHOLE)
    assert (new.epoch, new.origin) == (3, p.origin)


def test_wire_round_trip_keeps_shard_groups_and_lists_only_whole_replicas_as_ranks():
    p = Placement(epoch=4, world_size=4, replicas={0: (((0,), (3, 2)), ((1,),))})
    msg = placement_to_proto(p, world_generation=2)
    slots = msg.layers[0].experts[0]
    assert list(slots.ranks) == [0] and [list(g.ranks) for g in slots.shard_groups] == [[3, 2]]
    back = placement_from_proto(msg)
    assert back == replace(p, origin="initial") and back.epoch == 4


def test_what_the_wire_cannot_carry_is_refused():
    with pytest.raises(PlacementFormError, match="needs an origin"):
        placement_to_proto(whole_replicas(1, 2, {0: ((0,),)}, origin=""))
    with pytest.raises(PlacementFormError, match="cannot go on the wire"):
        placement_to_proto(whole_replicas(-1, 2, {0: ((0,),)}))


# -- properties over generated placements (shard groups and gating included) ------------------


@settings(max_examples=150, deadline=None)
@given(placements())
def test_generated_placements_are_valid_and_derived_queries_agree(p):
    E = num_experts(p)
    validate_placement(p, E, p.replicas)
    for layer, table in p.replicas.items():
        for e, groups in enumerate(table):
            assert p.groups(layer, e) == groups
            assert p.layers[layer][e] == tuple(sorted(r for g in groups for r in g))
        for rank in range(p.world_size):
            mine = p.experts_on(rank, layer)
            assert mine == tuple(e for e, groups in enumerate(table) if any(rank in g for g in groups))
            assert [s.count for s in p.pieces_on(rank, layer)] == [
                next(len(g) for g in p.groups(layer, e) if rank in g) for e in mine]
        assert sum(p.experts_per_rank(layer)) == sum(len(ranks) for ranks in p.layers[layer])


@settings(max_examples=150, deadline=None)
@given(placements(), st.randoms(use_true_random=False))
def test_groups_in_any_order_make_the_same_placement(p, rnd):
    shuffled = {layer: tuple(rnd.sample(groups, len(groups)) for groups in table)
                for layer, table in p.replicas.items()}
    assert replace(p, replicas=shuffled) == p


@settings(max_examples=150, deadline=None)
@given(placements(), st.integers(0, 2**32 - 1))
def test_wire_round_trip_is_lossless(p, generation):
    msg = placement_to_proto(p, world_generation=generation)
    assert placement_from_proto(msg) == p and msg.world_generation == generation


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
