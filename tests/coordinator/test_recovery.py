"""The placement of a re-formed world, on hand-worked cases (coordinator/recovery.py)."""

from __future__ import annotations

from coordinator.recovery import RECOVERY, Room, reformed_placement, spread
from moemesh.mesh.placement import Placement, initial_placement, split_placement, validate_placement

EXPERTS = 8
LAYER = 0


def held(p: Placement, layer: int = LAYER) -> list[tuple[int, ...]]:
    """Per rank, the experts it holds in `layer`."""
    return [p.experts_on(r, layer) for r in range(p.world_size)]


def loads_nothing(old: Placement, new: Placement, rank_map: dict[int, int]) -> bool:
    """Whether every survivor's experts in `new` are ones it already held in `old`."""
    return all(set(new.experts_on(n, layer)) <= set(old.experts_on(o, layer))
               for o, n in rank_map.items() for layer in new.replicas)


def test_lost_rank_experts_go_to_the_ranks_with_the_fewest_experts():
    # Rank r holds experts r and r + 4; rank 2 dies. Old ranks 0, 1, 3 become 0, 1, 2.
    old = initial_placement(EXPERTS, [LAYER], 4, epoch=5)
    out = reformed_placement(old, {0: 0, 1: 1, 3: 2}, 3)
    # Every rank holds 2: expert 2 goes to the lowest rank (0), expert 6 to the next with 2 (1).
    assert held(out.placement) == [(0, 2, 4), (1, 5, 6), (3, 7)]
    assert out.unservable_reason == ""
    p = out.placement
    assert (p.epoch, p.world_size, p.origin, p.gating) == (5, 3, RECOVERY, {})
    validate_placement(p, EXPERTS, [LAYER])


def test_orphans_of_several_layers_spread_over_the_ranks_holding_the_fewest_overall():
    old = initial_placement(EXPERTS, [0, 1], 4)
    p = reformed_placement(old, {0: 0, 1: 1, 3: 2}, 3).placement
    assert held(p, 0) == [(0, 2, 4), (1, 5, 6), (3, 7)]
    # Layer 1: all hold 2 of it, but rank 2 holds the fewest overall (4), so expert 2 goes there;
    # then ranks 0 and 1 tie again (5 each): expert 6 goes to rank 0.
    assert held(p, 1) == [(0, 4, 6), (1, 5), (2, 3, 7)]


def test_gating_factors_reset_on_a_new_world():
    old = initial_placement(EXPERTS, [LAYER], 2)
    gated = Placement(old.epoch, 2, old.replicas, gating={LAYER: (2.0,) * EXPERTS})
    assert reformed_placement(gated, {0: 0, 1: 1}, 2).placement.gating == {}


def test_with_redundancy_1_every_expert_is_on_two_ranks_and_one_loss_needs_no_loading():
    first = spread(initial_placement(EXPERTS, [LAYER], 4), redundancy=1)
    # Hand-worked: each expert's second replica on the rank (not holding it) with the fewest experts.
    assert held(first) == [(0, 1, 4, 5), (0, 1, 4, 5), (2, 3, 6, 7), (2, 3, 6, 7)]
    assert all(len(groups) == 2 for groups in first.replicas[LAYER])
    rank_map = {0: 0, 1: 1, 3: 2}
    out = reformed_placement(first, rank_map, 3)
    assert held(out.placement) == [(0, 1, 4, 5), (0, 1, 4, 5), (2, 3, 6, 7)]
    assert loads_nothing(first, out.placement, rank_map) and out.unservable_reason == ""
    # The next epoch restores redundancy (experts 2, 3, 6, 7 get a second replica) and levels.
    restored = spread(out.placement, redundancy=1)
    assert all(len(groups) >= 2 for groups in restored.replicas[LAYER])
    assert [len(e) for e in held(restored)] == [6, 6, 6]
    assert all(set(a) <= set(b) for a, b in zip(held(out.placement), held(restored)))  # only additions


def test_a_joiner_receives_orphans_first_and_copies_to_even_out():
    old = initial_placement(EXPERTS, [LAYER], 4)
    # Rank 2 restarted: it is lost, and its new process joins as rank 3 of the next world.
    out = reformed_placement(old, {0: 0, 1: 1, 3: 2}, 4)
    assert held(out.placement) == [(0, 4), (1, 5), (3, 7), (2, 6)]
    # A plain join: nothing lost, the joiner (rank 3) starts empty and the next epoch fills it.
    three = reformed_placement(old, {0: 0, 1: 1, 3: 2}, 3).placement  # (0 2 4) (1 5 6) (3 7)
    grown = reformed_placement(three, {0: 0, 1: 1, 2: 2}, 4).placement
    assert held(grown)[3] == ()
    even = spread(grown)
    assert [len(e) for e in held(even)] == [3, 3, 3, 3]
    # The emptiest rank takes a copy of the expert it lacks with the fewest replicas (lowest id
    # first), one at a time: rank 3 gets 0 and 1, rank 2 (2 experts, tied, lower rank) 2, rank 3 then 3.
    assert held(even)[3] == (0, 1, 3) and held(even)[2] == (2, 3, 7)
    validate_placement(even, EXPERTS, [LAYER])


def test_a_split_expert_that_lost_a_shard_gets_a_whole_new_group_of_the_same_size():
    # Expert e split over ranks (2e, 2e + 1) mod 4; rank 1 dies, so experts 0 and 2 lose a shard.
    old = split_placement(4, [LAYER], 4, shards=2)
    p = reformed_placement(old, {0: 0, 2: 1, 3: 2}, 3).placement
    assert [p.groups(LAYER, e) for e in range(4)] == [((0, 1),), ((1, 2),), ((0, 2),), ((1, 2),)]
    validate_placement(p, 4, [LAYER], expert_hidden=64)


def test_memory_bounds_copies_and_an_orphan_that_fits_nowhere_makes_the_world_unservable():
    old = initial_placement(EXPERTS, [LAYER], 4)
    full = Room(per_rank=[200] * 3, expert_bytes=100)  # each survivor is full with its 2 experts
    out = reformed_placement(old, {0: 0, 1: 1, 3: 2}, 3, full)
    assert "layer 0 expert 2 has no replica left and no member has room for it" in out.unservable_reason
    assert "layer 0 expert 6" in out.unservable_reason
    validate_placement(out.placement, EXPERTS, [LAYER])  # still a placement every rank can read
    assert out.forced == ((LAYER, 2, (0,)), (LAYER, 6, (1,)))
    # A joiner with room arrives: the forced replicas are placed again, on it.
    fixed = reformed_placement(out.placement, {0: 0, 1: 1, 2: 2}, 4, Room([200, 200, 200, 300], 100),
                               drop=out.forced)
    assert fixed.unservable_reason == "" and fixed.forced == ()
    assert held(fixed.placement) == [(0, 4), (1, 5), (3, 7), (2, 6)]
    roomy = Room(per_rank=[300, 300, 0], expert_bytes=100)  # room for one more each; rank 2 unbounded
    ok = reformed_placement(old, {0: 0, 1: 1, 3: 2}, 3, roomy)
    assert ok.unservable_reason == "" and held(ok.placement) == [(0, 2, 4), (1, 5, 6), (3, 7)]
    # Copies stop at memory: rank 3 (a joiner) can take one expert only; nothing else has room.
    tight = Room(per_rank=[300, 300, 200, 100], expert_bytes=100)
    grown = spread(reformed_placement(ok.placement, {0: 0, 1: 1, 2: 2}, 4).placement, redundancy=1, room=tight)
    assert [len(e) for e in held(grown)] == [3, 3, 2, 1]


def test_unservable_reason_names_a_few_experts_and_counts_the_rest():
    old = initial_placement(EXPERTS, [0, 1, 2], 2)
    out = reformed_placement(old, {0: 0}, 1, Room(per_rank=[100], expert_bytes=100))
    assert out.unservable_reason.count("has no replica left") == 3
    assert out.unservable_reason.endswith("and 9 more experts")
