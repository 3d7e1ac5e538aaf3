"""Membership: who is registered, which generation of the world they form, who is gone and why.

Pure and synchronous (no asyncio, no gRPC, no probing); `coordinator.state` wraps it with the
waiting, and `coordinator.reformation` with the probing and the one task that forms worlds.

Rules (see protos/moemesh/v1/coordinator.proto):
- Generation 1 forms when `expected` workers have registered; its ranks follow registration order.
  Before it forms, the same worker_id with a higher incarnation replaces the old entry in place
  (it keeps its rank).
- Same worker_id and incarnation again: idempotent. A lower incarnation: StaleIncarnationError.
- After generation 1, membership is generational: generation g+1 is formed (`form_next`) from
  the members of g that are still registered and not leaving, in their old rank order, then the
  joiners in registration order. What makes g+1 due (`due`):
  - Join: a new worker_id registers, or a member registers a higher incarnation (a restarted
    process: its old entry is dropped at once, the new one waits as a joiner);
  - Loss reported: a member says the data plane of g broke (`break_world`): g+1 is due even when
    every member is alive, since the old communicator is broken; the caller probes the members
    first and `evict`s the dead ones;
  - Silence: a registered worker without heartbeat for the timeout (`newly_silent`), which the
    caller evicts; silence counts from the last heartbeat, the registration, or the forming of
    the worker's newest world, whichever is latest (joining a world means loading weights);
  - Leave: a member leaves on purpose (`leave`); it stays registered (its heartbeats are
    accepted) until g+1 forms without it. A joiner that leaves is just dropped.
- An evicted or superseded worker is no longer registered: its calls fail with
  UnknownWorkerError (NOT_FOUND) and it must register again (as a joiner).
- A generation of 0 members is not formed (`form_next` returns None): the world stays unservable
  until someone registers.
- Durable: `record()` is everything above but the clocks (coordinator/durable.py writes it);
  `restore(record)` takes it back in a restarted coordinator, every registered worker's silence
  counting from then.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from coordinator.errors import StaleIncarnationError, UnknownWorkerError
from moemesh.errors import InvalidRequestError


@dataclass(frozen=True)
class WorkerInfo:
    """One worker process, as it registered."""

    worker_id: str
    incarnation: int
    address: str
    device: str = "cpu"
    node: str = ""
    memory_bytes: int = 0  # for expert weights; 0 = unknown
    weight_bytes_per_element: int = 0  # bytes per stored weight element; 0 = unknown
    metrics_address: str = ""  # host:port of its Prometheus endpoint; empty = metrics off


@dataclass(frozen=True)
class Admission:
    """Outcome of a registration: the worker's rank (provisional for a joiner: its rank in the
    next generation if nothing else changes) and whether this call formed the first world."""

    rank: int
    formed_now: bool


@dataclass(frozen=True)
class Silence:
    """A worker whose last heartbeat is older than the timeout."""

    worker: WorkerInfo
    silent_s: float


@dataclass(frozen=True)
class Transition:
    """A newly formed generation: its members by rank, where each surviving old rank went, and
    who was lost (with why) and who joined."""

    generation: int
    members: tuple[WorkerInfo, ...]
    rank_map: dict[int, int]  # old rank -> new rank, survivors only
    lost: tuple[tuple[WorkerInfo, str], ...]
    joined: tuple[WorkerInfo, ...]
    broken: bool  # the old world's data plane was reported broken


@dataclass(frozen=True)
class Record:
    """Membership without its clocks: what a restarted coordinator needs to go on."""

    generation: int  # 0 = no world formed yet
    registered: tuple[WorkerInfo, ...]  # in registration order
    members: tuple[WorkerInfo, ...]  # the current generation, by rank (some may be gone since)
    leaving: tuple[str, ...] = ()  # worker ids of members not to be in the next generation
    broken: bool = False  # the current generation's data plane was reported broken


class Membership:
    """Registrations of one deployment and the generations of worlds formed from them."""

    def __init__(self, expected: int, clock: Callable[[], float] = time.monotonic):
        if expected < 1:
            raise InvalidRequestError(f"expected workers must be at least 1, got {expected}")
        self.expected = expected
        self._clock = clock
        self._registered: dict[str, WorkerInfo] = {}  # worker_id -> info, in registration order
        self._world: tuple[WorkerInfo, ...] = ()  # members of the current generation, by rank
        self._leaving: set[str] = set()  # registered members not to be in the next generation
        self._gone: dict[str, tuple[WorkerInfo, str]] = {}  # members of this generation gone since, with why
        self._broken = False  # the current generation's data plane was reported broken
        self._last_seen: dict[str, float] = {}  # worker_id -> clock()
        self._silent: set[str] = set()  # worker_ids already reported silent
        self.generation = 0  # 0 = no world formed yet

    @property
    def formed(self) -> bool:
        return self.generation > 0

    @property
    def members(self) -> tuple[WorkerInfo, ...]:
        """Before the first world: the registered workers in rank order; after: the current
        generation's members by rank (some may be gone since)."""
        return self._world if self.formed else tuple(self._registered.values())

    @property
    def joiners(self) -> tuple[WorkerInfo, ...]:
        """Registered workers not in the current generation, in registration order."""
        if not self.formed:
            return ()
        in_world = set(self._world)
        return tuple(w for w in self._registered.values() if w not in in_world)

    @property
    def due(self) -> bool:
        """Whether a next generation must be formed (something changed since the current one)."""
        return self.formed and (self._broken or self._next_roster() != self._world)

    def admit(self, info: WorkerInfo) -> Admission:
        """Register `info`; see the module docstring for the rules."""
        check_info(info)
        old = self._registered.get(info.worker_id)
        if old is not None and info.incarnation < old.incarnation:
            raise StaleIncarnationError(
                f"worker {info.worker_id!r} incarnation {info.incarnation} is older than the registered "
                f"incarnation {old.incarnation}"
            )
        if old is not None and info.incarnation > old.incarnation and old in self._world:
            self._drop(old, f"restarted (incarnation {old.incarnation} -> {info.incarnation})")
            old = None
        if old is None or info.incarnation > old.incarnation:
            self._registered[info.worker_id] = info  # a new key goes last; a joiner or early restart stays in place
        self._last_seen[info.worker_id] = self._clock()
        self._silent.discard(info.worker_id)
        rank = self.provisional_rank(info.worker_id)
        assert rank is not None
        if self.formed or len(self._registered) < self.expected:
            return Admission(rank=rank, formed_now=False)
        self._start(1, tuple(self._registered.values()))
        return Admission(rank=rank, formed_now=True)

    def provisional_rank(self, worker_id: str) -> int | None:
        """The worker's rank in the current generation if a member, else its rank in the next one."""
        roster = self._world if self.formed else tuple(self._registered.values())
        for group in (roster, self._next_roster()):
            for rank, w in enumerate(group):
                if w.worker_id == worker_id and self._registered.get(worker_id) is w:
                    return rank
        return None

    def rank_of(self, worker_id: str, incarnation: int) -> int | None:
        """The rank of exactly this (worker_id, incarnation) (provisional for a joiner), or None
        if it is not registered."""
        info = self._registered.get(worker_id)
        if info is None or info.incarnation != incarnation:
            return None
        return self.provisional_rank(worker_id)

    def is_member(self, worker_id: str, incarnation: int) -> bool:
        """Whether (worker_id, incarnation) is registered and a member of the current generation."""
        info = self._registered.get(worker_id)
        return info is not None and info.incarnation == incarnation and info in self._world

    def require(self, worker_id: str, incarnation: int) -> int:
        """The rank of (worker_id, incarnation); UnknownWorkerError if it is not registered."""
        rank = self.rank_of(worker_id, incarnation)
        if rank is None:
            raise UnknownWorkerError(
                f"worker {worker_id!r} incarnation {incarnation} is not registered (never registered, "
                f"removed or superseded): register again"
            )
        return rank

    def touch(self, worker_id: str, incarnation: int) -> bool:
        """Record a heartbeat; True if the worker had been reported silent (it is back)."""
        self.require(worker_id, incarnation)
        self._last_seen[worker_id] = self._clock()
        if worker_id in self._silent:
            self._silent.discard(worker_id)
            return True
        return False

    def newly_silent(self, timeout_s: float) -> list[Silence]:
        """Registered workers silent for longer than `timeout_s` that were not reported before."""
        now = self._clock()
        found = []
        for worker in self._registered.values():
            silent_s = now - self._last_seen[worker.worker_id]
            if silent_s > timeout_s and worker.worker_id not in self._silent:
                self._silent.add(worker.worker_id)
                found.append(Silence(worker, silent_s))
        return found

    # -- what makes the next generation due ------------------------------------------------

    def break_world(self) -> None:
        """The current generation's data plane broke: the next one is due whoever survives."""
        if self.formed:
            self._broken = True

    def leave(self, worker_id: str, incarnation: int) -> bool:
        """A worker leaves on purpose (idempotent); True when it was a member (g+1 is due)."""
        self.require(worker_id, incarnation)
        info = self._registered[worker_id]
        if info in self._world:
            self._leaving.add(worker_id)
            return True
        del self._registered[worker_id]  # a joiner (or, before the first world, a registrant)
        return False

    def is_leaving(self, worker_id: str) -> bool:
        """A member that said it leaves: it is not in the next generation, so never probed."""
        return worker_id in self._leaving

    def evict(self, worker_id: str, incarnation: int, why: str) -> bool:
        """Remove a registration (dead, silent); True if it was registered."""
        info = self._registered.get(worker_id)
        if info is None or info.incarnation != incarnation:
            return False
        self._drop(info, why)
        return True

    def record(self) -> Record:
        return Record(self.generation, tuple(self._registered.values()), self._world, tuple(sorted(self._leaving)),
                      self._broken)

    def restore(self, record: Record) -> None:
        """Take back a `record` (a restarted coordinator): every registered worker's silence counts
        from now; members gone since the record's generation formed are lost "before the restart"."""
        self.generation = record.generation
        self._registered = {w.worker_id: w for w in record.registered}
        # The rules compare registrations by identity: a member still registered is that object.
        self._world = tuple(self._registered[w.worker_id] if self._registered.get(w.worker_id) == w else w
                            for w in record.members)
        self._leaving = set(record.leaving) & set(self._registered)
        self._broken = record.broken and record.generation > 0
        self._gone = {w.worker_id: (w, "gone before the coordinator restarted") for w in self._world
                      if self._registered.get(w.worker_id) is not w}
        now = self._clock()
        self._last_seen = {worker_id: now for worker_id in self._registered}
        self._silent = set()

    def _drop(self, info: WorkerInfo, why: str) -> None:
        del self._registered[info.worker_id]
        self._leaving.discard(info.worker_id)
        self._silent.discard(info.worker_id)
        if info in self._world:
            self._gone[info.worker_id] = (info, why)

    # -- forming ---------------------------------------------------------------------------

    def _next_roster(self) -> tuple[WorkerInfo, ...]:
        if not self.formed:
            return ()
        in_world = set(self._world)
        survivors = [w for w in self._world if self._registered.get(w.worker_id) is w
                     and w.worker_id not in self._leaving]
        joiners = [w for w in self._registered.values() if w not in in_world]
        return (*survivors, *joiners)

    def form_next(self) -> Transition | None:
        """Form generation + 1 when due and it would have members; None otherwise."""
        if not self.due:
            return None
        roster = self._next_roster()
        if not roster:
            return None
        new_rank = {w: r for r, w in enumerate(roster)}
        rank_map = {old: new_rank[w] for old, w in enumerate(self._world) if w in new_rank}
        lost = [self._gone.get(w.worker_id, (w, "left")) for w in self._world if w not in new_rank]
        for worker_id in self._leaving:
            del self._registered[worker_id]
        joined = tuple(w for w in roster if w not in set(self._world))
        transition = Transition(self.generation + 1, roster, rank_map, tuple(lost), joined, self._broken)
        self._start(self.generation + 1, roster)
        return transition

    def _start(self, generation: int, roster: tuple[WorkerInfo, ...]) -> None:
        """Make `roster` generation `generation`. Its members' silence counts from now: a member
        joining a world loads weights and meets its peers before it heartbeats again."""
        self.generation = generation
        self._world = roster
        self._leaving.clear()
        self._gone.clear()
        self._broken = False
        now = self._clock()
        for w in roster:
            self._last_seen[w.worker_id] = now
            self._silent.discard(w.worker_id)


# HOST:PORT of a worker's gRPC server: a DNS name or IPv4 address, or an IPv6 address in brackets.
_ADDRESS = re.compile(r"(?:[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]):([0-9]{1,5})")
MAX_WORKER_ID_CHARS = 256


def check_info(info: WorkerInfo) -> None:
    """The fields a member is named and dialled by (the fuzz campaign registered ids with control
    characters and addresses such as "127.0.0.(:1", which then joined a world)."""
    if not info.worker_id:
        raise InvalidRequestError("worker_id must not be empty")
    if (len(info.worker_id) > MAX_WORKER_ID_CHARS or not info.worker_id.isprintable()
            or any(c.isspace() for c in info.worker_id)):
        raise InvalidRequestError(f"worker_id {info.worker_id[:MAX_WORKER_ID_CHARS]!r} must be at most "
                                  f"{MAX_WORKER_ID_CHARS} printable characters without spaces")
    if not info.address:
        raise InvalidRequestError(f"worker {info.worker_id!r}: address (host:port of its Worker service) is empty")
    port = _ADDRESS.fullmatch(info.address)
    if port is None or int(port.group(1)) > 65535:
        raise InvalidRequestError(f"worker {info.worker_id!r}: address {info.address[:300]!r} is not HOST:PORT "
                                  "(a name or IPv4 address, or [IPv6], and a port up to 65535)")
    if info.incarnation < 0:
        raise InvalidRequestError(f"worker {info.worker_id!r}: incarnation must not be negative")
