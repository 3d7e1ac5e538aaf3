"""Worlds: one generation of members with its rendezvous, and how a new one is described.

Pure (no asyncio, no gRPC): the values `coordinator.state` hands out and logs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from coordinator.membership import Transition, WorkerInfo


@dataclass(frozen=True)
class DataPlane:
    """How the ranks of every world meet: transport name and the TCPStore address."""

    transport: str
    store_host: str
    store_port: int


@dataclass(frozen=True)
class World:
    """One formed world: members by rank, its rendezvous, its first placement epoch, and why it
    cannot serve (empty when it can)."""

    generation: int
    members: tuple[WorkerInfo, ...]
    data_plane: DataPlane
    placement_epoch: int
    unservable_reason: str = ""

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def store_prefix(self) -> str:
        """TCPStore key prefix private to this generation."""
        return f"gen{self.generation}/"

    def rank_of(self, worker_id: str, incarnation: int) -> int:
        """The rank of (worker_id, incarnation) in this world; -1 for anyone else (observers)."""
        for rank, m in enumerate(self.members):
            if worker_id and m.worker_id == worker_id and m.incarnation == incarnation:
                return rank
        return -1


def roster(members: Sequence[WorkerInfo]) -> str:
    """`0=w0@host:port, 1=...` for logs."""
    return ", ".join(f"{r}={m.worker_id}@{m.address}" for r, m in enumerate(members))


def describe(t: Transition, epochs: Sequence[int], unservable_reason: str) -> str:
    """One log line for a re-formed world: who, who was lost and why, who joined, which epochs."""
    lost = ", ".join(f"{w.worker_id} ({why})" for w, why in t.lost) or "none"
    joined = ", ".join(f"{w.worker_id}#{w.incarnation}" for w in t.joined) or "none"
    text = (f"world generation {t.generation} formed: {roster(t.members)}; lost: {lost}; joined: {joined}; "
            f"data plane of generation {t.generation - 1} {'reported broken' if t.broken else 'intact'}; "
            f"placement epoch {' then '.join(str(e) for e in epochs)} (recovery)")
    if unservable_reason:
        text += f"; UNSERVABLE: {unservable_reason}"
    return text
