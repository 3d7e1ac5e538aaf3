"""Policy "split": tensor parallelism for hot experts. Pure: no gRPC, no torch.distributed.

A rank whose experts receive far more tokens than the mean rank's is the step's straggler: every
rank waits for it at the combine. Splitting its hottest whole expert with the least busy rank
(column-parallel first linear, row-parallel second; moemesh.model.shard) halves that expert's
compute on the busy rank and costs the other rank half an expert of memory, where a replica
(policy "replicate") would cost it a whole one. Outputs stay the model's up to float rounding:
the two halves' partial sums are added in a different order than one matmul adds them.

One cycle, per MoE layer, at most one split:
Step 1: the compute load of every rank: token copies of each expert it holds, spread evenly over
        the expert's replica groups, times the fraction of the expert the rank holds.
Step 2: stop unless the busiest rank exceeds `threshold` x the mean rank's load.
Step 3: its heaviest expert held whole, in a replica of its own.
Step 4: the least busy rank not holding that expert with room for half of it (when ranks report
        their memory); split only if the busier of the two ends up below the busiest rank's
        load now.

Splits are never undone: a split expert computes the same function, and merging it back would
move weights for no gain unless the load shifts for good (then `moemesh placement set`).

Shape legend: L MoE layers, E experts, R ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moemesh.mesh.placement import Placement, with_split
from moemesh.model.shard import WHOLE


@dataclass(frozen=True)
class SplitSettings:
    threshold: float = 1.2  # act while the busiest rank's load exceeds 1.2 x the mean (the paper's 1.2)


def rank_loads(p: Placement, layer: int, counts: torch.Tensor) -> list[float]:
    """counts: (E,) token copies per expert -> (R,) compute per rank, in whole-expert tokens."""
    loads = [0.0] * p.world_size
    for e, tokens in enumerate(counts.tolist()):
        groups = p.groups(layer, e)
        for group in groups:
            for r in group:
                loads[r] += tokens / len(groups) / len(group)
    return loads


@dataclass(frozen=True)
class Memory:
    """Per rank, bytes it can hold for expert weights (0 = unknown: no bound), and the bytes of
    one whole expert of one layer on the workers."""

    per_rank: Sequence[int] = ()
    expert_bytes: int = 0

    def has_room(self, p: Placement, rank: int, extra_bytes: float) -> bool:
        if rank >= len(self.per_rank) or self.per_rank[rank] <= 0:
            return True
        held = sum(self.expert_bytes / p.shard_of(rank, layer, e).count
                   for layer in p.layers for e in p.experts_on(rank, layer))
        return held + extra_bytes <= self.per_rank[rank]


def _hottest_whole(p: Placement, layer: int, rank: int, counts: torch.Tensor) -> int | None:
    """The expert with the most tokens that `rank` holds whole in a replica of its own."""
    whole = [e for e in p.experts_on(rank, layer) if p.shard_of(rank, layer, e) == WHOLE]
    return max(whole, key=lambda e: (float(counts[e]), -e), default=None)


def split_one(p: Placement, layer: int, counts: torch.Tensor, expert_hidden: int,
              s: SplitSettings = SplitSettings(), memory: Memory = Memory()) -> Placement | None:
    """counts: (E,) -> `p` with one hot expert of `layer` split in two, or None (Steps 1-4)."""
    # Step 1: compute per rank.
    loads = rank_loads(p, layer, counts)
    mean = sum(loads) / len(loads)
    # Step 2: only a straggler is worth a split.
    busy = max(range(len(loads)), key=lambda r: (loads[r], -r))
    if mean <= 0 or loads[busy] <= s.threshold * mean or expert_hidden % 2:
        return None
    # Step 3: the busy rank's heaviest whole expert.
    expert = _hottest_whole(p, layer, busy, counts)
    if expert is None:
        return None
    # Step 4: its least busy partner with room (memory checked in that order, lazily: counting a
    # rank's weights walks the whole placement), if the split lowers the maximum.
    holders = set(p.layers[layer][expert])
    by_load = sorted((r for r in range(p.world_size) if r not in holders), key=lambda r: (loads[r], r))
    partner = next((r for r in by_load if memory.has_room(p, r, memory.expert_bytes / 2)), None)
    if partner is None:
        return None
    half = float(counts[expert]) / len(p.groups(layer, expert)) / 2
    if max(loads[busy] - half, loads[partner] + half) >= loads[busy]:
        return None
    return with_split(p, layer, expert, (busy, partner))


def split_hot_experts(p: Placement, counts: torch.Tensor, layers: tuple[int, ...], expert_hidden: int,
                      s: SplitSettings = SplitSettings(), memory: Memory = Memory()) -> Placement | None:
    """counts: (L, E) token copies in the recent window, rows in `layers` order -> the placement
    with at most one new split per layer, or None when no layer needs one."""
    new = p
    for i, layer in enumerate(layers):
        new = split_one(new, layer, counts[i], expert_hidden, s, memory) or new
    return None if new is p else new
