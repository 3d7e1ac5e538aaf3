"""Pure policy for following worlds and migrating requests: no I/O, no clock, no gRPC.

- A world member is known by its identity `Key` = (worker_id, incarnation), not by its rank: a
  member keeps its requests (and the gateway keeps its Serve stream) across world generations,
  only its rank changes. `world_change` says which links to keep, open and close.
- A request whose worker lets go of it (its stream broke, it left the world, or it answered
  Rejected{UNAVAILABLE}) is migrated: submitted again elsewhere with every token already streamed.
  `verdict` decides whether that may happen (a bounded number of times, within the call's
  deadline) or the request is already complete.
- `candidates` is where a request may go: live members, minus those that let go of it in this
  generation, in rank order (what gateway.least_loaded picks from).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

Key = tuple[str, int]  # (worker_id, incarnation): a member's identity across world generations


@dataclass(frozen=True)
class Member:
    """One rank of a world as the gateway follows it."""

    key: Key
    rank: int
    address: str


@dataclass(frozen=True)
class WorldChange:
    """What a new world means for the links: keep (with their new rank), open, close."""

    kept: dict[Key, int]  # member still present -> its rank in the new world
    added: tuple[Member, ...]  # new members, in rank order
    gone: tuple[Key, ...]  # members of the old world that are not in the new one


def world_change(current: Collection[Key], members: Iterable[Member]) -> WorldChange:
    """Compare the members the gateway has links to (`current`) with a new world's `members`."""
    new = {member.key: member for member in members}
    kept = {key: new[key].rank for key in current if key in new}
    added = tuple(sorted((m for key, m in new.items() if key not in current), key=lambda m: m.rank))
    gone = tuple(key for key in current if key not in new)
    return WorldChange(kept, added, gone)


@dataclass(frozen=True)
class Migrate:
    """Submit the request again, elsewhere, with the tokens already streamed."""


@dataclass(frozen=True)
class Complete:
    """Every token the request may produce was streamed already: it ends with FINISH_REASON_LENGTH."""


@dataclass(frozen=True)
class GiveUp:
    """No more migrations for this request; `why` completes the failure's message."""

    why: str


Verdict = Migrate | Complete | GiveUp


def verdict(migrations: int, max_migrations: int, streamed: int, budget: int, now: float,
            deadline: float | None) -> Verdict:
    """What to do with a request its worker let go of: it was migrated `migrations` times so far,
    `streamed` of its `budget` (max_new_tokens) tokens reached the client, its call ends at
    `deadline` (None = no deadline; same clock as `now`)."""
    # Step 1: nothing is left to generate (its Finished was lost with the worker).
    if streamed >= budget:
        return Complete()
    # Step 2: the bounds: a number of migrations, and the call's own deadline.
    if migrations >= max_migrations:
        return GiveUp(f"gave up after {migrations} migrations (--max-migrations {max_migrations})")
    if deadline is not None and now >= deadline:
        return GiveUp("the call's deadline has passed")
    return Migrate()


def wait_until(now: float, deadline: float | None, recovery_wait_s: float) -> float:
    """How long a request may wait for a live worker: `recovery_wait_s` from now, never past its
    call's deadline."""
    bound = now + recovery_wait_s
    return bound if deadline is None else min(bound, deadline)


def candidates(live: Mapping[Key, int], avoid: Collection[Key]) -> dict[int, Key]:
    """rank -> member for the live members (key -> rank) a request may go to: every one but those
    in `avoid` (they let go of it in this generation)."""
    return {rank: key for key, rank in sorted(live.items(), key=lambda item: item[1]) if key not in avoid}
