"""Which worker gets the next request: fewest outstanding tokens, ties to the lowest rank.

Pure bookkeeping, no I/O, no clock. A worker's outstanding tokens are the tokens its requests
may still produce: the sum over its requests of max_new_tokens - tokens received so far. That
is the work the gateway has already committed it to, the quantity data-parallel attention wants
level across ranks (a request that just arrived with max_new_tokens=512 weighs more than one
that is about to finish).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


def pick_least_loaded(outstanding: Mapping[int, int]) -> int:
    """The rank with the fewest outstanding tokens; ties go to the lowest rank.

    Raises ValueError when `outstanding` is empty (no worker to choose from).
    """
    if not outstanding:
        raise ValueError("no worker to pick from")
    return min(outstanding, key=lambda rank: (outstanding[rank], rank))


@dataclass
class _Entry:
    rank: int
    budget: int  # max_new_tokens
    received: int = 0

    @property
    def outstanding(self) -> int:
        """Tokens this request may still produce."""
        return max(0, self.budget - self.received)


class LoadBook:
    """Outstanding tokens per rank, kept incrementally as requests start, stream and end."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._per_rank: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._entries

    def add(self, request_id: str, rank: int, max_new_tokens: int) -> None:
        """A request was submitted to `rank` and may produce up to `max_new_tokens` tokens."""
        if request_id in self._entries:
            raise KeyError(f"request {request_id!r} is already booked")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        entry = _Entry(rank=rank, budget=max_new_tokens)
        self._entries[request_id] = entry
        self._per_rank[rank] = self._per_rank.get(rank, 0) + entry.outstanding

    def progress(self, request_id: str, tokens: int) -> None:
        """`tokens` more tokens arrived for the request; unknown ids are ignored."""
        entry = self._entries.get(request_id)
        if entry is None:
            return
        before = entry.outstanding
        entry.received += tokens
        self._per_rank[entry.rank] -= before - entry.outstanding

    def remove(self, request_id: str) -> None:
        """The request ended (finished, cancelled, rejected or lost); unknown ids are ignored."""
        entry = self._entries.pop(request_id, None)
        if entry is None:
            return
        self._per_rank[entry.rank] -= entry.outstanding

    def outstanding(self, rank: int) -> int:
        """Tokens the requests booked on `rank` may still produce."""
        return self._per_rank.get(rank, 0)

    def requests_on(self, rank: int) -> list[str]:
        """Ids of the requests booked on `rank`, in submission order."""
        return [rid for rid, e in self._entries.items() if e.rank == rank]

    def pick(self, ranks: Iterable[int]) -> int:
        """The least loaded of `ranks` (the workers able to take a request now).

        Raises ValueError when `ranks` is empty.
        """
        return pick_least_loaded({rank: self.outstanding(rank) for rank in ranks})
