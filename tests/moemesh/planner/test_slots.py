"""moemesh.planner.slots: slot tables <-> placements, whole experts only, gating carried beside."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings

from moemesh.mesh.placement import (
    PlacementFormError,
    initial_placement,
    split_placement,
    with_split,
)
from moemesh.planner.slots import EMPTY, from_placement, holds, to_placement
from tests.moemesh.mesh.placement_strategies import num_experts, placements


def test_round_robin_table():
    p = initial_placement(5, (0, 2), world_size=3)
    slots = from_placement(p, (0, 2))
    assert slots.shape == (2, 3, 2)
    assert slots[0].tolist() == [[0, 3], [1, 4], [2, EMPTY]]
    assert holds(slots[0], 5)[1].tolist() == [False, True, False, False, True]


@settings(max_examples=150, deadline=None)
@given(placements(max_group=1))
def test_whole_placements_with_gating_round_trip_through_slots(p):
    ids = sorted(p.replicas)
    slots = from_placement(p, ids)
    assert to_placement(slots, ids, num_experts(p), epoch=p.epoch, origin=p.origin, gating=p.gating) == p


@settings(max_examples=100, deadline=None)
@given(placements(max_group=4))
def test_placements_with_shard_groups_are_refused_not_flattened(p):
    ids = sorted(p.replicas)
    if p.has_shard_groups:
        with pytest.raises(PlacementFormError, match="shard groups"):
            from_placement(p, ids)
    else:
        assert to_placement(from_placement(p, ids), ids, num_experts(p), p.epoch, p.origin, p.gating) == p


def test_splits_and_too_narrow_tables_raise_a_typed_error():
    with pytest.raises(PlacementFormError, match="layer 0 has split experts"):
        from_placement(split_placement(2, (0,), world_size=4, shards=2), (0,))
    one_split = with_split(initial_placement(2, (0, 1), world_size=3), 1, 1, (1, 0))
    assert from_placement(one_split, (0,)).shape == (1, 3, 1)  # only the layers asked for count
    with pytest.raises(PlacementFormError, match="layer 1 has split experts"):
        from_placement(one_split, (0, 1))
    with pytest.raises(PlacementFormError, match="device 0 holds more than 1 experts"):
        from_placement(initial_placement(4, (0,), world_size=2), (0,), width=1)
    assert np.array_equal(from_placement(initial_placement(2, (0,), world_size=2), (0,), width=2)[0, :, 1], [-1, -1])
