"""A world of N ranks as threads of one process: the Collective and Waker for in-process tests.

Shape legend: R ranks, C rows per (source, destination) block, W payload width, n header values.

Same semantics as the gloo and NCCL collectives: every rank calls the collectives in the same
order (cross-rank invariant); `all_to_all` returns a Pending whose wait() blocks until every rank
has posted the same exchange; `all_gather` blocks until every rank has contributed. A rank that
breaks the invariant (another collective at the same position, or a peer that never comes) gets
an error instead of a hang: a mismatch raises at once, a missing peer after `timeout_s`, and a
rank that fails can `abort()` the world so every peer raises too.

`HostSyncCounter` counts the calls that make the host wait for the device (on CUDA), so tests
can hold the step path to its budget of host read-backs without a GPU.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch.overrides import TorchFunctionMode

from moemesh.errors import CollectiveError

Result = TypeVar("Result")


class LoopbackError(CollectiveError):
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
        self.bytes_to = [0] * self.world_size  # per destination rank, as gloo would send them (moemesh.mesh.gloo)

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    def all_to_all(self, send: torch.Tensor) -> _LoopbackPending:
        """send: (R*C, W), block r for rank r -> Pending of (R*C, W), block r from rank r."""
        assert send.shape[0] % self.world_size == 0, "blocks must tile the buffer"
        seq = self._next()
        self.exchanges += 1
        block = send.numel() // self.world_size * send.element_size()
        self.bytes_to = [n + (block if r != self.rank else 0) for r, n in enumerate(self.bytes_to)]
        self.world.post(seq, f"all_to_all{tuple(send.shape)}", self.rank, send)
        return _LoopbackPending(self.world, seq, self.rank)

    def all_gather(self, values: torch.Tensor) -> torch.Tensor:
        """values: (n,) -> (R, n): every rank's values, by rank."""
        seq = self._next()
        self.gathers += 1
        ring_next = (self.rank + 1) % self.world_size  # gloo's allgather is a ring
        self.bytes_to[ring_next] += (self.world_size - 1) * values.numel() * values.element_size()
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


def run_world(
    world: LoopbackWorld, rank_main: Callable[[LoopbackCollective], Result], timeout_s: float = 120.0
) -> list[Result]:
    """Run rank_main(collective) on one thread per rank; returns the results by rank. A rank that
    raises aborts the world (its peers raise instead of hanging) and its error is re-raised
    here; `timeout_s` only bounds a hang."""
    results: dict[int, Result] = {}
    errors: dict[int, BaseException] = {}

    def main(rank: int) -> None:
        try:
            results[rank] = rank_main(world.collective(rank))
        except BaseException as exc:
            errors[rank] = exc
            world.abort(f"rank {rank} failed: {exc!r}")

    threads = [threading.Thread(target=main, args=(r,), name=f"rank-{r}", daemon=True) for r in range(world.world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    if any(t.is_alive() for t in threads):
        world.abort("run_world: a rank hung")
        raise LoopbackError(f"ranks still running after {timeout_s} s (a hang)")
    if errors:
        first = min(errors, key=lambda r: isinstance(errors[r], LoopbackError))  # the cause before its echoes
        raise errors[first]
    return [results[r] for r in range(world.world_size)]


# Calls that read a device tensor back to the host (a stream sync on CUDA): read-backs, and ops
# whose output size depends on the data. Boolean-mask indexing is counted in _bool_index.
_SYNCING = frozenset({"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero",
                      "masked_select", "bincount", "unique", "unique_consecutive", "repeat_interleave",
                      "argwhere", "cpu", "numpy"})


def _bool_index(args: tuple) -> bool:
    index = args[1] if len(args) > 1 else None
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


class HostSyncCounter(TorchFunctionMode):
    """`with HostSyncCounter() as c:` -> c.calls: the host-syncing torch calls made on this
    thread inside the block, by name (torch function modes are per thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _SYNCING or (name in ("__getitem__", "__setitem__") and _bool_index(args)):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))
