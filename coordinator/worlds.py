"""Worlds: one generation of members with its rendezvous, the values `coordinator.state` hands
out, how a new world is described in the log, and how big the workers' experts are.

Pure (no asyncio, no gRPC).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from coordinator.membership import Transition, WorkerInfo
from coordinator.policies import ModelFacts
from moemesh.mesh.placement import Placement, shards_to_fit

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class Published:
    """A published placement and the generation of the world its ranks refer to."""

    placement: Placement
    world_generation: int


@dataclass(frozen=True)
class Registration:
    """RegisterWorker's answer: world_size and generation are 0 until the worker is in a world."""

    rank: int
    world_size: int
    generation: int


@dataclass(frozen=True)
class Beat:
    """Heartbeat's answer: the newest world generation and placement epoch."""

    world_generation: int
    placement_epoch: int


def expert_bytes(facts: ModelFacts | None, members: Sequence[WorkerInfo]) -> int:
    """One whole expert of one layer as the workers store it (0 without the model's shape)."""
    if facts is None:
        return 0
    element = max((m.weight_bytes_per_element for m in members), default=0) or facts.dtype_bytes
    return 3 * facts.hidden_size * facts.expert_intermediate_size * element


def shards_for(expert_shards: int, facts: ModelFacts | None, members: Sequence[WorkerInfo], num_experts: int,
               num_moe_layers: int) -> int:
    """How many ways the first world's placement splits every expert: --expert-shards, or with
    0 the fewest that fit the members' reported memory."""
    if expert_shards or facts is None:
        return expert_shards or 1
    shards, fits = shards_to_fit(expert_bytes(facts, members), [m.memory_bytes for m in members],
                                 facts.expert_intermediate_size, num_experts, num_moe_layers)
    if not fits:
        log.error("experts do not fit the workers' reported memory even split %d ways; placing them so", shards)
    elif shards > 1:
        log.info("experts split %d ways to fit the workers' reported memory", shards)
    return shards


def bytes_moved(old: Placement, new: Placement, whole_expert_bytes: int) -> int:
    """Expert weight bytes the ranks of one world load to go from `old` to `new`: every piece
    (expert, shard) a rank holds in `new` and held neither as such nor whole in `old` (a shard of
    an expert held whole is cut from it, not loaded)."""
    # Step 1: what each rank holds, as (layer, rank, expert, shard index, shards).
    def pieces(p: Placement) -> set[tuple[int, int, int, int, int]]:
        return {(layer, rank, expert, i, len(group))
                for layer, table in p.replicas.items() for expert, groups in enumerate(table)
                for group in groups for i, rank in enumerate(group)}

    before = pieces(old)
    # Step 2: sum the new pieces, each a 1/shards part of a whole expert.
    moved = sum(whole_expert_bytes // count for layer, rank, expert, i, count in pieces(new) - before
                if (layer, rank, expert, 0, 1) not in before)
    return int(moved)
