"""The balancing policy: fewest outstanding tokens wins, ties go to the lowest rank."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.balancer import LoadBook, pick_least_loaded


def test_pick_prefers_fewest_outstanding_then_lowest_rank():
    assert pick_least_loaded({0: 10, 1: 3, 2: 7}) == 1
    assert pick_least_loaded({2: 5, 1: 5, 3: 5}) == 1
    assert pick_least_loaded({4: 0}) == 4
    with pytest.raises(ValueError):
        pick_least_loaded({})


def test_outstanding_is_budget_minus_tokens_received():
    book = LoadBook()
    book.add("a", rank=0, max_new_tokens=100)
    book.add("b", rank=0, max_new_tokens=20)
    book.add("c", rank=1, max_new_tokens=50)
    assert (book.outstanding(0), book.outstanding(1), book.outstanding(7)) == (120, 50, 0)
    book.progress("a", 30)
    assert book.outstanding(0) == 90
    book.progress("b", 25)  # more than its budget (cannot go negative)
    assert book.outstanding(0) == 70
    book.remove("a")
    assert book.outstanding(0) == 0
    assert book.requests_on(0) == ["b"] and book.requests_on(1) == ["c"]
    book.remove("a")  # idempotent
    book.progress("zzz", 3)  # unknown ids are ignored
    assert len(book) == 2


def test_pick_levels_work_across_ranks():
    """Requests of equal size alternate; a big one makes its rank skipped until others catch up."""
    book = LoadBook()
    picks = []
    for i in range(4):
        rank = book.pick([0, 1])
        picks.append(rank)
        book.add(f"r{i}", rank, 10)
    assert picks == [0, 1, 0, 1]
    book.add("big", 0, 100)
    assert [book.pick([0, 1]) for _ in range(2)] == [1, 1]
    assert book.pick([0]) == 0  # only ranks that can take work are considered
    with pytest.raises(ValueError):
        book.pick([])


def test_duplicate_and_negative_bookings_are_refused():
    book = LoadBook()
    book.add("a", 0, 5)
    with pytest.raises(KeyError):
        book.add("a", 1, 5)
    with pytest.raises(ValueError):
        book.add("b", 0, -1)


ops = st.lists(st.tuples(st.sampled_from(["add", "progress", "remove"]), st.integers(0, 9),
                         st.integers(0, 3), st.integers(0, 50)), max_size=60)


@given(ops)
def test_incremental_totals_match_a_recount(operations):
    book = LoadBook()
    model: dict[str, list[int]] = {}  # id -> [rank, budget, received]
    for op, key, rank, n in operations:
        rid = f"r{key}"
        if op == "add" and rid not in model:
            book.add(rid, rank, n)
            model[rid] = [rank, n, 0]
        elif op == "progress":
            book.progress(rid, n)
            if rid in model:
                model[rid][2] += n
        elif op == "remove":
            book.remove(rid)
            model.pop(rid, None)
    for r in range(4):
        expected = sum(max(0, b - got) for rank, b, got in model.values() if rank == r)
        assert book.outstanding(r) == expected
    if model:
        expected_pick = min(range(4), key=lambda r: (book.outstanding(r), r))
        assert book.pick(range(4)) == expected_pick
