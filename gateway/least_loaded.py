"""Which worker gets the next request: fewest outstanding tokens, ties to the lowest rank.

Pure functions, no I/O, no clock, no state. A worker's outstanding tokens are the tokens its
requests may still produce: the sum over its running requests of max_new_tokens - tokens received
so far. That is the work the gateway has already committed it to, the quantity data-parallel
attention wants level across ranks (a request that just arrived with max_new_tokens=512 weighs
more than one that is about to finish). The token counts are read from the caller's requests
(`gateway.workers.Handle` owns each request's count); nothing here keeps a copy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Booked:
    """One running request as the balancer sees it."""

    rank: int
    budget: int  # max_new_tokens
    received: int  # tokens received so far

    @property
    def outstanding(self) -> int:
        """Tokens this request may still produce (never negative)."""
        return max(0, self.budget - self.received)


def pick_least_loaded(outstanding: Mapping[int, int]) -> int:
    """The rank with the fewest outstanding tokens; ties go to the lowest rank.

    Raises ValueError when `outstanding` is empty (no worker to choose from).
    """
    if not outstanding:
        raise ValueError("no worker to pick from")
    return min(outstanding, key=lambda rank: (outstanding[rank], rank))


def outstanding_by_rank(booked: Iterable[Booked], ranks: Iterable[int]) -> dict[int, int]:
    """Outstanding tokens of each of `ranks` (0 for a rank with nothing booked); requests booked
    on other ranks are left out."""
    totals = dict.fromkeys(ranks, 0)
    for request in booked:
        if request.rank in totals:
            totals[request.rank] += request.outstanding
    return totals


def assign(budgets: Sequence[int], outstanding: Mapping[int, int]) -> list[int]:
    """Ranks for new requests with these budgets (max_new_tokens), in order: each goes to the
    least loaded rank, counting the ones placed before it. `outstanding` is not changed.

    Raises ValueError for a negative budget or when `outstanding` is empty.
    """
    # Step 1: refuse what cannot be booked, before placing anything.
    for budget in budgets:
        if budget < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {budget}")
    # Step 2: place one by one on a private copy of the load.
    load = dict(outstanding)
    ranks = []
    for budget in budgets:
        rank = pick_least_loaded(load)
        load[rank] += budget
        ranks.append(rank)
    return ranks
