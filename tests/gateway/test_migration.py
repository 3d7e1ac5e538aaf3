"""The pure policy of following worlds and migrating requests: identity-keyed world changes, the
migration verdict, the wait bound, where a request may go."""

from __future__ import annotations

from gateway.migration import (
    Complete,
    GiveUp,
    Member,
    Migrate,
    candidates,
    verdict,
    wait_until,
    world_change,
)


def member(worker_id: str, rank: int, incarnation: int = 1) -> Member:
    return Member((worker_id, incarnation), rank, f"h:{rank}")


def test_members_are_matched_by_identity_not_by_rank():
    current = [("a", 1), ("b", 1), ("c", 1)]
    change = world_change(current, [member("c", 0), member("d", 1), member("b", 2)])
    assert change.kept == {("b", 1): 2, ("c", 1): 0}  # kept, with their new ranks
    assert change.added == (member("d", 1),)
    assert change.gone == (("a", 1),)


def test_a_restarted_worker_is_a_new_member_and_its_old_incarnation_is_gone():
    change = world_change([("a", 1)], [member("a", 0, incarnation=2)])
    assert change.kept == {} and change.added == (member("a", 0, 2),) and change.gone == (("a", 1),)


def test_the_first_world_opens_everything_and_an_empty_one_closes_everything():
    first = world_change([], [member("b", 1), member("a", 0)])
    assert first.added == (member("a", 0), member("b", 1)) and first.kept == {} and first.gone == ()
    assert world_change([("a", 1)], []).gone == (("a", 1),)


def test_a_request_migrates_until_its_bound_or_its_deadline():
    assert verdict(0, 3, streamed=5, budget=10, now=1.0, deadline=None) == Migrate()
    assert verdict(2, 3, streamed=5, budget=10, now=1.0, deadline=2.0) == Migrate()
    assert verdict(3, 3, streamed=5, budget=10, now=1.0, deadline=None) == GiveUp(
        "gave up after 3 migrations (--max-migrations 3)")
    assert verdict(0, 0, streamed=0, budget=10, now=1.0, deadline=None) == GiveUp(
        "gave up after 0 migrations (--max-migrations 0)")
    assert verdict(0, 3, streamed=5, budget=10, now=2.0, deadline=2.0) == GiveUp("the call's deadline has passed")


def test_a_request_with_every_token_streamed_is_complete_whatever_the_bounds():
    assert verdict(3, 3, streamed=10, budget=10, now=5.0, deadline=1.0) == Complete()
    assert verdict(0, 3, streamed=9, budget=10, now=0.0, deadline=None) == Migrate()


def test_the_wait_for_a_live_worker_never_passes_the_deadline():
    assert wait_until(100.0, None, 30.0) == 130.0
    assert wait_until(100.0, 110.0, 30.0) == 110.0
    assert wait_until(100.0, 200.0, 30.0) == 130.0


def test_candidates_are_live_members_in_rank_order_minus_those_that_let_go():
    live = {("b", 1): 1, ("a", 1): 0, ("c", 1): 2}
    assert candidates(live, set()) == {0: ("a", 1), 1: ("b", 1), 2: ("c", 1)}
    assert candidates(live, {("a", 1)}) == {1: ("b", 1), 2: ("c", 1)}
    assert candidates(live, set(live)) == {}
