"""A world of N ranks as threads of one process: the Collective and Waker for in-process tests.

Shape legend: R ranks, C rows per (source, destination) block, W payload width, n header values.

Same semantics as the gloo and NCCL collectives: every rank calls the collectives in the same
order (cross-rank invariant); `all_to_all` returns a Pending whose wait() blocks until every rank
has posted the same exchange; `all_gather` blocks until every rank has contributed. A rank that
breaks the invariant (another collective at the same position, or a peer that never comes) gets
an error instead of a hang: a mismatch raises at once, a missing peer after `timeout_s`, and a
rank that fails can `abort()` the world so every peer raises too.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch


class LoopbackError(RuntimeError):
    """The world is broken: mismatched collectives, a missing peer or an aborted rank."""


@dataclass
class _Slot:
    """One collective call, position `seq` in every rank's sequence."""

    kind: str
    sends: dict[int, torch.Tensor] = field(default_factory=dict)  # rank -> its contribution
    read: set[int] = field(default_factory=set)  # ranks that took their result


class LoopbackWorld:
    """Shared state of R loopback ranks; `collective(rank)` is rank's view of it."""

    def __init__(self, world_size: int, timeout_s: float = 60.0):
        self.world_size = world_size
        self.timeout_s = timeout_s  # a hang bound, not a performance threshold
        self._cond = threading.Condition()
        self._slots: dict[int, _Slot] = {}
        self._aborted: str | None = None

    def collective(self, rank: int) -> LoopbackCollective:
        return LoopbackCollective(self, rank)

    def abort(self, why: str) -> None:
        with self._cond:
            self._aborted = self._aborted or why
            self._cond.notify_all()

    def post(self, seq: int, kind: str, rank: int, send: torch.Tensor) -> None:
        with self._cond:
            self._check()
            slot = self._slots.setdefault(seq, _Slot(kind))
            if slot.kind != kind:
                self._aborted = f"collective {seq}: rank {rank} called {kind}, a peer {slot.kind}"
                self._cond.notify_all()
                self._check()
            slot.sends[rank] = send.clone()
            self._cond.notify_all()

    def collect(self, seq: int, rank: int) -> dict[int, torch.Tensor]:
        """Every rank's contribution to collective `seq`, once all have posted."""
        with self._cond:
            done = self._cond.wait_for(
                lambda: self._aborted is not None or len(self._slots[seq].sends) == self.world_size,
                timeout=self.timeout_s)
            self._check()
            if not done:
                self._aborted = f"collective {seq}: rank {rank} waited {self.timeout_s} s for its peers"
                self._cond.notify_all()
                self._check()
            slot = self._slots[seq]
            slot.read.add(rank)
            if len(slot.read) == self.world_size:
                del self._slots[seq]
            return slot.sends

    def _check(self) -> None:
        if self._aborted is not None:
            raise LoopbackError(self._aborted)


class _LoopbackPending:
    def __init__(self, world: LoopbackWorld, seq: int, rank: int):
        self.world, self.seq, self.rank = world, seq, rank
        self._result: torch.Tensor | None = None

    def wait(self) -> torch.Tensor:
        if self._result is None:
            sends = self.world.collect(self.seq, self.rank)
            R = self.world.world_size
            blocks = [sends[r].chunk(R)[self.rank] for r in range(R)]  # block r: from rank r, (C, W) each
            self._result = torch.cat(blocks)  # (R*C, W)
        return self._result


class LoopbackCollective:
    """One rank's view of a LoopbackWorld (the Collective of moemesh.mesh.transport and the
    header collective of moemesh.mesh.lockstep). Timing counters stay zero: nothing to overlap."""

    def __init__(self, world: LoopbackWorld, rank: int):
        self.world, self.rank, self.world_size = world, rank, world.world_size
        self._seq = 0
        self.seconds = 0.0
        self.exchange_seconds = 0.0
        self.hidden_seconds = 0.0
        self.exchanges = 0  # all_to_all calls so far
        self.gathers = 0  # all_gather calls so far

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    def all_to_all(self, send: torch.Tensor) -> _LoopbackPending:
        """send: (R*C, W), block r for rank r -> Pending of (R*C, W), block r from rank r."""
        assert send.shape[0] % self.world_size == 0, "blocks must tile the buffer"
        seq = self._next()
        self.exchanges += 1
        self.world.post(seq, f"all_to_all{tuple(send.shape)}", self.rank, send)
        return _LoopbackPending(self.world, seq, self.rank)

    def all_gather(self, values: torch.Tensor) -> torch.Tensor:
        """values: (n,) -> (R, n): every rank's values, by rank."""
        seq = self._next()
        self.gathers += 1
        self.world.post(seq, f"all_gather{tuple(values.shape)}", self.rank, values)
        sends = self.world.collect(seq, self.rank)
        return torch.stack([sends[r] for r in range(self.world_size)])  # (R, n)

    def close(self) -> None:
        pass


class LoopbackWaker:
    """Idle round n ends on every rank as soon as one rank calls wake(n) (the StoreWaker's
    semantics, with a condition instead of a store key). wait() returns after `timeout_s` even
    if nobody woke it (the caller looks again), like StoreWaker's."""

    def __init__(self, timeout_s: float = 60.0):
        self.timeout_s = timeout_s
        self._cond = threading.Condition()
        self._woken: set[int] = set()

    def wait(self, round_: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: round_ in self._woken, timeout=self.timeout_s)

    def wake(self, round_: int) -> None:
        with self._cond:
            self._woken.add(round_)
            self._cond.notify_all()
