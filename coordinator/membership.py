"""Membership: who registered, in which order, whether the world formed, who is still alive.

Pure and synchronous (no asyncio, no gRPC); `coordinator.state` wraps it with the waiting.

Rules (see protos/moemesh/v1/coordinator.proto, RegisterWorker):
- ranks follow registration order; the first world (generation 1) forms when `expected` workers
  have registered;
- same worker_id and incarnation again: idempotent (same rank);
- same worker_id with a higher incarnation before the world forms: replaces the old entry in
  place (it keeps the rank); a lower incarnation: StaleIncarnationError;
- anyone new (or a restarted member) after the world formed: WorldFormedError.

Failure recovery (a later issue) hooks in at the two places marked HOOK(recovery): a restarted
member after formation, and a worker silent past the heartbeat timeout. Both will drop the old
entry and form generation + 1 from the survivors.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from coordinator.errors import (
    StaleIncarnationError,
    UnknownWorkerError,
    WorldFormedError,
)
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


@dataclass(frozen=True)
class Admission:
    """Outcome of a registration: the worker's rank and whether this call formed the world."""

    rank: int
    formed_now: bool


@dataclass(frozen=True)
class Silence:
    """A worker whose last heartbeat is older than the timeout."""

    worker: WorkerInfo
    silent_s: float


class Membership:
    """Registrations of one deployment and the worlds formed from them."""

    def __init__(self, expected: int, clock: Callable[[], float] = time.monotonic):
        if expected < 1:
            raise InvalidRequestError(f"expected workers must be at least 1, got {expected}")
        self.expected = expected
        self._clock = clock
        self._workers: list[WorkerInfo] = []  # index = rank
        self._last_seen: dict[str, float] = {}  # worker_id -> clock()
        self._silent: set[str] = set()  # worker_ids already reported silent
        self.generation = 0  # 0 = no world formed yet

    @property
    def formed(self) -> bool:
        return self.generation > 0

    @property
    def members(self) -> tuple[WorkerInfo, ...]:
        """Registered workers in rank order (the world's members once formed)."""
        return tuple(self._workers)

    def admit(self, info: WorkerInfo) -> Admission:
        """Register `info`; see the module docstring for the rules."""
        _check_info(info)
        rank = self._rank_by_id(info.worker_id)
        if rank is not None:
            return self._readmit(rank, info)
        if self.formed:
            raise WorldFormedError(
                f"world generation {self.generation} is already formed with {len(self._workers)} workers; "
                f"worker {info.worker_id!r} cannot join it (adding workers to a running world is not supported yet)"
            )
        self._workers.append(info)
        self._last_seen[info.worker_id] = self._clock()
        return Admission(rank=len(self._workers) - 1, formed_now=self._maybe_form())

    def _readmit(self, rank: int, info: WorkerInfo) -> Admission:
        old = self._workers[rank]
        if info.incarnation < old.incarnation:
            raise StaleIncarnationError(
                f"worker {info.worker_id!r} incarnation {info.incarnation} is older than the registered "
                f"incarnation {old.incarnation}"
            )
        if info.incarnation > old.incarnation:
            if self.formed:
                # HOOK(recovery): the old process's rank is lost; form generation + 1 here.
                raise WorldFormedError(
                    f"worker {info.worker_id!r} restarted (incarnation {old.incarnation} -> {info.incarnation}) "
                    f"after world generation {self.generation} formed; rejoining a formed world is not supported yet"
                )
            self._workers[rank] = info
        self._last_seen[info.worker_id] = self._clock()
        self._silent.discard(info.worker_id)
        return Admission(rank=rank, formed_now=False)

    def _maybe_form(self) -> bool:
        if self.formed or len(self._workers) < self.expected:
            return False
        self.generation = 1
        return True

    def rank_of(self, worker_id: str, incarnation: int) -> int | None:
        """The rank of exactly this (worker_id, incarnation), or None if it is not registered."""
        rank = self._rank_by_id(worker_id)
        if rank is None or self._workers[rank].incarnation != incarnation:
            return None
        return rank

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
        """Workers silent for longer than `timeout_s` that were not reported before.

        HOOK(recovery): the caller will remove these and form a new world.
        """
        now = self._clock()
        found = []
        for worker in self._workers:
            silent_s = now - self._last_seen[worker.worker_id]
            if silent_s > timeout_s and worker.worker_id not in self._silent:
                self._silent.add(worker.worker_id)
                found.append(Silence(worker, silent_s))
        return found

    def _rank_by_id(self, worker_id: str) -> int | None:
        for rank, worker in enumerate(self._workers):
            if worker.worker_id == worker_id:
                return rank
        return None


def _check_info(info: WorkerInfo) -> None:
    if not info.worker_id:
        raise InvalidRequestError("worker_id must not be empty")
    if not info.address:
        raise InvalidRequestError(f"worker {info.worker_id!r}: address (host:port of its Worker service) is empty")
    if info.incarnation < 0:
        raise InvalidRequestError(f"worker {info.worker_id!r}: incarnation must not be negative")
