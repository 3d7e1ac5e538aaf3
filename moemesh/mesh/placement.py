"""Placement: which ranks hold which experts, per MoE layer, at one epoch. Pure: no torch, no gRPC.

A placement is the one thing every rank must agree on to route tokens (see docs/architecture.md,
"cross-rank invariants"): ranks switch to a new epoch at the same step, so routing tables always
match. `initial_placement` is the paper's starting point (expert e -> rank e mod R); the
coordinator's balancer (a later module) produces better ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from moemesh.errors import InvalidRequestError
from moemesh.model.shard import WHOLE, Shard


@dataclass(frozen=True)
class Placement:
    """`layers[layer][expert]` = the ranks holding that expert, whole or one shard of it
    (non-empty, sorted); `shards` says which of them hold shards."""

    epoch: int
    world_size: int
    layers: Mapping[int, tuple[tuple[int, ...], ...]]
    origin: str = "initial"
    # Policy "gating": per MoE layer, a factor per expert multiplying its gate probability when
    # experts are selected (combine weights stay the model's). Empty = exact routing.
    gating: Mapping[int, tuple[float, ...]] = field(default_factory=dict)
    # Expert tensor parallelism: per MoE layer, expert -> its shard groups. A group (r0, r1, ...)
    # is one replica split over len(group) ranks; rank group[i] holds shard i (see `Shard`).
    # Every group's ranks are also listed in layers[layer][expert]; a listed rank that is in no
    # group holds a full replica. Experts with no entry are not split.
    shards: Mapping[int, Mapping[int, tuple[tuple[int, ...], ...]]] = field(default_factory=dict)

    def experts_on(self, rank: int, layer: int) -> tuple[int, ...]:
        """Global expert ids held by `rank` in `layer`, ascending: the rank's local expert order."""
        return tuple(e for e, ranks in enumerate(self.layers[layer]) if rank in ranks)

    def assignment(self, rank: int) -> dict[int, list[int]]:
        """MoE layer -> experts held by `rank`, whole or in part (what the worker loads)."""
        return {layer: list(self.experts_on(rank, layer)) for layer in self.layers}

    def groups(self, layer: int, expert: int) -> tuple[tuple[int, ...], ...]:
        """The expert's replicas as rank groups: full replicas (r,) in rank order, then its
        shard groups. A token copy for the expert goes to every rank of one group."""
        split = self.shards.get(layer, {}).get(expert, ())
        in_groups = {r for group in split for r in group}
        return tuple((r,) for r in self.layers[layer][expert] if r not in in_groups) + tuple(split)

    def shard_of(self, rank: int, layer: int, expert: int) -> Shard:
        """Which part of the expert `rank` holds: Shard(0, 1) for a full replica."""
        for group in self.shards.get(layer, {}).get(expert, ()):
            if rank in group:
                return Shard(group.index(rank), len(group))
        return WHOLE

    def pieces_on(self, rank: int, layer: int) -> tuple[Shard, ...]:
        """The part of each expert of `experts_on(rank, layer)` that `rank` holds, in that order."""
        return tuple(self.shard_of(rank, layer, e) for e in self.experts_on(rank, layer))

    def experts_per_rank(self, layer: int) -> list[int]:
        counts = [0] * self.world_size
        for ranks in self.layers[layer]:
            for r in ranks:
                counts[r] += 1
        return counts


def initial_placement(
    num_experts: int, moe_layers: Iterable[int], world_size: int, epoch: int = 1, shards: int = 1
) -> Placement:
    """Round-robin: expert e on rank e mod R. With more ranks than experts, rank r >= E holds a
    replica of expert r mod E (its copies share that expert's tokens).

    64 experts over 3 ranks gives 22, 21, 21: no divisibility rule. With `shards` S > 1 every
    expert is split over S ranks (see `split_placement`).
    """
    if world_size <= 0:
        raise InvalidRequestError(f"world size must be positive, got {world_size}")
    if shards != 1:
        return split_placement(num_experts, moe_layers, world_size, shards, epoch)
    holders: list[list[int]] = [[] for _ in range(num_experts)]
    for e in range(num_experts):
        holders[e].append(e % world_size)
    for r in range(num_experts, world_size):
        holders[r % num_experts].append(r)
    table = tuple(tuple(sorted(h)) for h in holders)
    return Placement(epoch=epoch, world_size=world_size, layers={layer: table for layer in moe_layers})


def split_placement(num_experts: int, moe_layers: Iterable[int], world_size: int, shards: int,
                    epoch: int = 1) -> Placement:
    """Every expert split over `shards` consecutive ranks (expert tensor parallelism).

    Step 1: shard i of expert e goes to rank (e*S + i) mod R, so with R = E*S each rank holds one
    shard and a group's ranks are neighbours (same node under a node-major rank order).
    Step 2: ranks beyond E*S form extra groups of S ranks, replicas of expert g mod E; fewer than
    S left-over ranks hold nothing.
    """
    if not 1 <= shards <= world_size:
        raise InvalidRequestError(f"cannot split experts over {shards} ranks with {world_size} ranks")
    # Step 1: round-robin shards.
    groups: list[list[tuple[int, ...]]] = [
        [tuple((e * shards + i) % world_size for i in range(shards))] for e in range(num_experts)
    ]
    # Step 2: whole groups of spare ranks become replicas.
    first_spare = num_experts * shards
    for g in range(max(0, world_size - first_spare) // shards):
        start = first_spare + g * shards
        groups[g % num_experts].append(tuple(range(start, start + shards)))
    table = tuple(tuple(sorted(r for group in gs for r in group)) for gs in groups)
    split = {e: tuple(gs) for e, gs in enumerate(groups)} if shards > 1 else {}
    layers = tuple(moe_layers)
    return Placement(epoch=epoch, world_size=world_size, layers={layer: table for layer in layers},
                     shards={layer: split for layer in layers} if split else {})


def with_split(p: Placement, layer: int, expert: int, group: tuple[int, ...]) -> Placement:
    """A new placement in which rank group[0]'s whole replica of `expert` becomes a shard group
    over `group`: group[0] keeps shard 0 and each other rank gains one shard. Nothing else changes."""
    holders = p.layers[layer][expert]
    assert p.groups(layer, expert).count((group[0],)) == 1, "group[0] must hold the expert whole"
    assert not set(group[1:]) & set(holders), "the other ranks must not hold the expert yet"
    table = list(p.layers[layer])
    table[expert] = tuple(sorted({*holders, *group}))
    split = dict(p.shards.get(layer, {}))
    split[expert] = (*split.get(expert, ()), tuple(group))
    return replace(p, layers={**p.layers, layer: tuple(table)}, shards={**p.shards, layer: split})


def validate_placement(p: Placement, num_experts: int, moe_layers: Iterable[int],
                       expert_hidden: int | None = None) -> None:
    """Raise InvalidRequestError unless every expert of every MoE layer has >= 1 valid rank and
    every shard group is well formed (`expert_hidden` F, when given, must divide evenly)."""
    expected = set(moe_layers)
    if set(p.layers) != expected:
        raise InvalidRequestError(
            f"placement covers MoE layers {sorted(p.layers)}, the model has {sorted(expected)}"
        )
    for layer, table in p.layers.items():
        if len(table) != num_experts:
            raise InvalidRequestError(f"layer {layer}: {len(table)} experts placed, the model has {num_experts}")
        factors = p.gating.get(layer, ())
        if factors and (len(factors) != num_experts or not all(f > 0 for f in factors)):
            raise InvalidRequestError(f"layer {layer}: gating factors must be {num_experts} positive values")
        for e, ranks in enumerate(table):
            if not ranks:
                raise InvalidRequestError(f"layer {layer} expert {e}: no rank holds it")
            bad = [r for r in ranks if not 0 <= r < p.world_size]
            if bad:
                raise InvalidRequestError(f"layer {layer} expert {e}: rank {bad[0]} not in 0..{p.world_size - 1}")
            if len(set(ranks)) != len(ranks):
                raise InvalidRequestError(f"layer {layer} expert {e}: rank listed twice in {list(ranks)}")
    _validate_shards(p, num_experts, expert_hidden)


def _validate_shards(p: Placement, num_experts: int, expert_hidden: int | None) -> None:
    for layer, split in p.shards.items():
        if layer not in p.layers:
            raise InvalidRequestError(f"shard groups given for layer {layer}, which the placement does not cover")
        for e, groups in split.items():
            if not 0 <= e < num_experts:
                raise InvalidRequestError(f"layer {layer}: shard groups for expert {e}, not in 0..{num_experts - 1}")
            seen: set[int] = set()
            for group in groups:
                where = f"layer {layer} expert {e} shard group {list(group)}"
                if len(group) < 2 or len(set(group)) != len(group):
                    raise InvalidRequestError(f"{where}: needs at least 2 distinct ranks")
                if seen & set(group):
                    raise InvalidRequestError(f"{where}: a rank holds two parts of the expert")
                seen |= set(group)
                if not set(group) <= set(p.layers[layer][e]):
                    raise InvalidRequestError(f"{where}: ranks must also be listed as holders of the expert")
                if expert_hidden is not None and expert_hidden % len(group):
                    raise InvalidRequestError(
                        f"{where}: the expert hidden size {expert_hidden} does not split into {len(group)} equal shards")


def shards_to_fit(expert_bytes: int, memory_bytes: Sequence[int], expert_hidden: int, num_experts: int,
                  num_moe_layers: int) -> tuple[int, bool]:
    """The fewest ways S to split every expert so that `split_placement` fits each rank's memory.

    expert_bytes: one whole expert's weights on the workers; memory_bytes: per rank, what it
    can hold for expert weights (0 = unknown: no bound). S divides the expert hidden size and is
    at most the number of ranks. Splitting helps when an expert is too big for one device (more
    ranks than experts); with several experts per rank it cannot lower a rank's share.
    Returns (S, fits); when nothing fits, the S needing the least memory per rank, False.
    """
    world_size = len(memory_bytes)
    known = [m for m in memory_bytes if m > 0]
    if not known:
        return 1, True
    candidates = [s for s in range(1, world_size + 1) if expert_hidden % s == 0]
    # Step 1: bytes per rank under round-robin shards: ceil(E*S/R) shards of expert_bytes/S per layer.
    need = {s: -(-num_experts * s // world_size) * num_moe_layers * expert_bytes // s for s in candidates}
    # Step 2: the fewest ways that fit, else the least memory (fewest ways among equals).
    fitting = [s for s in candidates if need[s] <= min(known)]
    if fitting:
        return fitting[0], True
    return min(candidates, key=lambda s: (need[s], s)), False
