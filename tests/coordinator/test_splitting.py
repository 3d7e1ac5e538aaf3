"""coordinator.splitting: policy "split" splits a straggling rank's hottest whole expert."""

from __future__ import annotations

import torch

from coordinator.splitting import (
    Memory,
    SplitSettings,
    rank_loads,
    split_hot_experts,
    split_one,
)
from moemesh.mesh.placement import Placement, initial_placement, validate_placement
from moemesh.model.shard import Shard

F = 64


def test_rank_loads_count_replicas_and_shards_as_fractions():
    p = Placement(1, 3, {0: (((0,), (1,)), ((1, 2),))})
    assert rank_loads(p, 0, torch.tensor([40, 30])) == [20.0, 20.0 + 15.0, 15.0]


def test_the_busiest_ranks_hottest_expert_is_split_with_the_idlest_rank():
    p = initial_placement(8, (0,), world_size=4)  # rank r holds experts r and r + 4
    counts = torch.tensor([10, 10, 10, 10, 60, 10, 10, 5])  # rank 0: 70, rank 3: 15
    new = split_one(p, 0, counts, F)
    validate_placement(new, 8, (0,), expert_hidden=F)
    assert new.groups(0, 4) == ((0, 3),) and new.shard_of(3, 0, 4) == Shard(1, 2)
    assert max(rank_loads(new, 0, counts)) < max(rank_loads(p, 0, counts))
    assert all(new.groups(0, e) == p.groups(0, e) for e in range(8) if e != 4)


def test_balanced_layers_and_useless_splits_are_left_alone():
    p = initial_placement(4, (0, 1), world_size=4)
    assert split_one(p, 0, torch.tensor([10, 11, 9, 10]), F) is None  # under 1.2 x mean
    assert split_one(p, 0, torch.tensor([100, 0, 0, 0]), F + 1) is None  # F does not halve
    lone = initial_placement(1, (0,), world_size=1)
    assert split_one(lone, 0, torch.tensor([5]), F) is None  # nobody to split with
    # A split that would only move the straggler elsewhere is not made.
    two = initial_placement(2, (0,), world_size=2)
    assert split_one(two, 0, torch.tensor([90, 80]), F, SplitSettings(threshold=1.01)) is None


def test_each_layer_gets_at_most_one_split_per_cycle():
    p = initial_placement(4, (1, 3), world_size=4)
    counts = torch.tensor([[80, 10, 10, 0], [10, 10, 10, 10]])  # (L, E): only layer 1 is skewed
    new = split_hot_experts(p, counts, (1, 3), F)
    assert new.replicas[1] == (((0, 3),), *p.replicas[1][1:]) and new.replicas[3] == p.replicas[3]
    assert split_hot_experts(new, counts, (1, 3), F) is None  # rank 0 now holds only a shard
    assert split_hot_experts(p, torch.full((2, 4), 10), (1, 3), F) is None


def test_partners_without_room_for_half_an_expert_are_passed_over():
    p = initial_placement(8, (0,), world_size=4)  # two 100-byte experts per rank
    counts = torch.tensor([10, 10, 10, 10, 60, 10, 10, 5])  # rank 3 is idlest, then ranks 1 and 2
    full = Memory(per_rank=[0, 200, 1000, 200], expert_bytes=100)  # ranks 1 and 3 hold 200 of 200
    assert split_one(p, 0, counts, F, memory=full).groups(0, 4) == ((0, 2),)
    nobody = Memory(per_rank=[200, 200, 200, 200], expert_bytes=100)
    assert split_one(p, 0, counts, F, memory=nobody) is None
