"""The balancing policy: fewest outstanding tokens wins, ties go to the lowest rank."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.least_loaded import Booked, assign, outstanding_by_rank, pick_least_loaded


def test_pick_prefers_fewest_outstanding_then_lowest_rank():
    assert pick_least_loaded({0: 10, 1: 3, 2: 7}) == 1
    assert pick_least_loaded({2: 5, 1: 5, 3: 5}) == 1
    assert pick_least_loaded({4: 0}) == 4
    with pytest.raises(ValueError):
        pick_least_loaded({})


def test_outstanding_is_budget_minus_tokens_received():
    a, b, c = Booked(rank=0, budget=100, received=0), Booked(0, 20, 0), Booked(1, 50, 0)
    assert outstanding_by_rank([a, b, c], [0, 1, 7]) == {0: 120, 1: 50, 7: 0}
    a = Booked(0, 100, received=30)
    assert outstanding_by_rank([a, b, c], [0])[0] == 90
    b = Booked(0, 20, received=25)  # more than its budget (cannot go negative)
    assert b.outstanding == 0 and outstanding_by_rank([a, b, c], [0])[0] == 70
    assert outstanding_by_rank([b, c], [0, 1]) == {0: 0, 1: 50}  # a ended: it is no longer booked
    assert outstanding_by_rank([c], [0]) == {0: 0}  # ranks not asked for are left out


def test_pick_levels_work_across_ranks():
    """Requests of equal size alternate; a big one makes its rank skipped until others catch up."""
    assert assign([10, 10, 10, 10], {0: 0, 1: 0}) == [0, 1, 0, 1]
    load = {0: 20 + 100, 1: 20}  # the four above, then a big one on rank 0
    assert assign([10, 10], load) == [1, 1]
    assert load == {0: 120, 1: 20}  # assign works on a copy
    assert assign([10], {0: 120}) == [0]  # only ranks that can take work are considered
    with pytest.raises(ValueError):
        assign([10], {})
    assert assign([], {}) == []


def test_negative_budgets_are_refused_before_anything_is_placed():
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        assign([5, -1], {0: 0})


ops = st.lists(st.tuples(st.sampled_from(["add", "progress", "remove"]), st.integers(0, 9),
                         st.integers(0, 3), st.integers(0, 50)), max_size=60)


@given(ops)
def test_assign_matches_picking_one_by_one_on_a_recount(operations):
    """Whatever was booked, received and ended: the load is a recount, and assign places each new
    request where pick_least_loaded over that recount (plus the ones placed before) says."""
    model: dict[str, list[int]] = {}  # id -> [rank, budget, received]
    for op, key, rank, n in operations:
        rid = f"r{key}"
        if op == "add" and rid not in model:
            model[rid] = [rank, n, 0]
        elif op == "progress" and rid in model:
            model[rid][2] += n
        elif op == "remove":
            model.pop(rid, None)
    load = outstanding_by_rank([Booked(*entry) for entry in model.values()], range(4))
    for r in range(4):
        assert load[r] == sum(max(0, b - got) for rank, b, got in model.values() if rank == r)
    budgets = [n for _, _, _, n in operations[:5]]
    expected, running = [], dict(load)
    for budget in budgets:
        expected.append(min(range(4), key=lambda r: (running[r], r)))
        running[expected[-1]] += budget
    assert assign(budgets, load) == expected
