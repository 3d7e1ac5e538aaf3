"""Placement: which ranks hold which experts, per MoE layer, at one epoch. Pure: no torch, no gRPC.

A placement is the one thing every rank must agree on to route tokens (see docs/architecture.md,
"cross-rank invariants"): ranks switch to a new epoch at the same step, so routing tables always
match. `initial_placement` is the paper's starting point (expert e -> rank e mod R); the
coordinator's balancing policies (coordinator/policies.py) publish better ones.

One representation, like DeepSeek EPLB's single index map: `replicas[layer][expert]` = the
expert's replica groups. A group `(r,)` is a whole replica on rank r; a group `(r0, r1, ...)` is
one replica split for tensor parallelism, rank group[i] holding shard i (`Shard`). Everything
else (holders per expert, experts per rank, shards, routing groups) is derived from it, and the
wire (placement_wire), file (placement_file) and planner slot (moemesh.planner.slots) forms
convert to and from it losslessly or raise `PlacementFormError`.

Canonical order, set on construction so that equal placements compare equal and every rank
derives identical routing: an expert's whole replicas in rank order, then its shard groups in
ascending order (a group's own order is its shard order and is kept). Gating factors are float32,
what the wire carries.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property

from moemesh.errors import InvalidRequestError
from moemesh.model.shard import WHOLE, Shard

Group = tuple[int, ...]  # (r,) a whole replica; (r0, r1, ...) one replica split, rank group[i] holds shard i
Groups = tuple[Group, ...]  # one expert's replica groups, in canonical order


class PlacementFormError(InvalidRequestError):
    """A placement cannot be written in a derived form (wire, file, planner slots) without
    losing something, e.g. shard groups in a slot table that holds whole experts only."""


@dataclass(frozen=True)
class Placement:
    """`replicas[layer][expert]` = the expert's replica groups (module docstring); `gating[layer]`
    = a factor per expert multiplying its gate probability when experts are selected (policy
    "gating"; combine weights stay the model's), no entry = exact routing."""

    epoch: int
    world_size: int
    replicas: Mapping[int, tuple[Groups, ...]]
    origin: str = "initial"
    gating: Mapping[int, tuple[float, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Step 1: canonical order (and plain ints: numpy or proto integers compare, hash and
        # serialise differently).
        replicas = {int(layer): tuple(_canonical(groups) for groups in table) for layer, table in self.replicas.items()}
        # Step 2: float32 gating factors; an empty entry means exact routing, like no entry.
        gating = {int(layer): tuple(_float32(f) for f in fs) for layer, fs in self.gating.items() if len(fs)}
        object.__setattr__(self, "replicas", replicas)
        object.__setattr__(self, "gating", gating)

    @cached_property
    def layers(self) -> dict[int, tuple[tuple[int, ...], ...]]:
        """Derived: `layers[layer][expert]` = every rank holding the expert, whole or a shard, sorted."""
        return {layer: tuple(tuple(sorted(r for g in groups for r in g)) for groups in table)
                for layer, table in self.replicas.items()}

    @property
    def has_shard_groups(self) -> bool:
        """Whether some expert of some layer is split (the planner places whole experts only)."""
        return any(len(g) > 1 for table in self.replicas.values() for groups in table for g in groups)

    def groups(self, layer: int, expert: int) -> Groups:
        """The expert's replicas as rank groups: whole replicas (r,) in rank order, then its
        shard groups. A token copy for the expert goes to every rank of one group (routing
        picks group `token mod len(groups)`, so this order is part of the cross-rank contract)."""
        return self.replicas[layer][expert]

    def experts_on(self, rank: int, layer: int) -> tuple[int, ...]:
        """Global expert ids held by `rank` in `layer`, ascending: the rank's local expert order."""
        return tuple(e for e, ranks in enumerate(self.layers[layer]) if rank in ranks)

    def assignment(self, rank: int) -> dict[int, list[int]]:
        """MoE layer -> experts held by `rank`, whole or in part (what the worker loads)."""
        return {layer: list(self.experts_on(rank, layer)) for layer in self.replicas}

    def shard_of(self, rank: int, layer: int, expert: int) -> Shard:
        """Which part of the expert `rank` holds: Shard(0, 1) for a whole replica."""
        for group in self.replicas[layer][expert]:
            if len(group) > 1 and rank in group:
                return Shard(group.index(rank), len(group))
        return WHOLE

    def pieces_on(self, rank: int, layer: int) -> tuple[Shard, ...]:
        """The part of each expert of `experts_on(rank, layer)` that `rank` holds, in that order."""
        return tuple(self.shard_of(rank, layer, e) for e in self.experts_on(rank, layer))

    def experts_per_rank(self, layer: int) -> list[int]:
        """Per rank, how many experts of `layer` it holds, whole or in part."""
        counts = [0] * self.world_size
        for ranks in self.layers[layer]:
            for r in ranks:
                counts[r] += 1
        return counts


def _canonical(groups: Iterable[Iterable[int]]) -> Groups:
    """Whole replicas by rank, then shard groups ascending; each group's own order kept."""
    as_tuples = [tuple(int(r) for r in g) for g in groups]
    return tuple(sorted(g for g in as_tuples if len(g) == 1)) + tuple(sorted(g for g in as_tuples if len(g) != 1))


def _float32(value: float) -> float:
    """The nearest float32 (what the wire carries); too large for float32 -> +-inf."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def whole_replicas(epoch: int, world_size: int, holders: Mapping[int, Sequence[Sequence[int]]],
                   origin: str = "initial", gating: Mapping[int, tuple[float, ...]] | None = None) -> Placement:
    """A placement with no split experts: `holders[layer][expert]` = the ranks holding it whole."""
    replicas = {layer: tuple(tuple((r,) for r in ranks) for ranks in table) for layer, table in holders.items()}
    return Placement(epoch=epoch, world_size=world_size, replicas=replicas, origin=origin, gating=gating or {})


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
    holders: list[list[int]] = [[e % world_size] for e in range(num_experts)]
    for r in range(num_experts, world_size):
        holders[r % num_experts].append(r)
    return whole_replicas(epoch, world_size, {layer: holders for layer in moe_layers})


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
    groups: list[list[Group]] = [
        [tuple((e * shards + i) % world_size for i in range(shards))] for e in range(num_experts)
    ]
    # Step 2: whole groups of spare ranks become replicas.
    first_spare = num_experts * shards
    for g in range(max(0, world_size - first_spare) // shards):
        start = first_spare + g * shards
        groups[g % num_experts].append(tuple(range(start, start + shards)))
    table = tuple(tuple(gs) for gs in groups)
    return Placement(epoch=epoch, world_size=world_size, replicas={layer: table for layer in moe_layers})


def with_split(p: Placement, layer: int, expert: int, group: Group) -> Placement:
    """A new placement in which rank group[0]'s whole replica of `expert` becomes a shard group
    over `group`: group[0] keeps shard 0 and each other rank gains one shard. Nothing else changes."""
    groups = p.groups(layer, expert)
    assert groups.count((group[0],)) == 1, "group[0] must hold the expert whole"
    assert not set(group[1:]) & set(p.layers[layer][expert]), "the other ranks must not hold the expert yet"
    table = list(p.replicas[layer])
    table[expert] = (*(g for g in groups if g != (group[0],)), tuple(group))
    return replace(p, replicas={**p.replicas, layer: tuple(table)})


def validate_placement(p: Placement, num_experts: int, moe_layers: Iterable[int],
                       expert_hidden: int | None = None) -> None:
    """Raise InvalidRequestError unless every MoE layer places every expert on >= 1 replica group
    of valid ranks, no rank holds two parts of one expert, gating factors fit, and (when the
    expert hidden size F is given) every shard group splits F evenly."""
    expected = set(moe_layers)
    if set(p.replicas) != expected:
        raise InvalidRequestError(
            f"placement covers MoE layers {sorted(p.replicas)}, the model has {sorted(expected)}"
        )
    for layer, table in p.replicas.items():
        if len(table) != num_experts:
            raise InvalidRequestError(f"layer {layer}: {len(table)} experts placed, the model has {num_experts}")
        for e, groups in enumerate(table):
            _validate_groups(p.world_size, groups, f"layer {layer} expert {e}", expert_hidden)
    _validate_gating(p, num_experts)


def _validate_groups(world_size: int, groups: Groups, where: str, expert_hidden: int | None) -> None:
    if not groups or not all(groups):
        raise InvalidRequestError(f"{where}: no rank holds it")
    ranks = [r for g in groups for r in g]
    bad = [r for r in ranks if not 0 <= r < world_size]
    if bad:
        raise InvalidRequestError(f"{where}: rank {bad[0]} not in 0..{world_size - 1}")
    if len(set(ranks)) != len(ranks):
        kind = "rank listed twice in" if all(len(g) == 1 for g in groups) else "a rank holds two parts of the expert in"
        raise InvalidRequestError(f"{where}: {kind} {[list(g) for g in groups]}")
    for group in groups:
        if len(group) > 1 and expert_hidden is not None and expert_hidden % len(group):
            raise InvalidRequestError(f"{where} shard group {list(group)}: the expert hidden size {expert_hidden} "
                                      f"does not split into {len(group)} equal shards")


def _validate_gating(p: Placement, num_experts: int) -> None:
    for layer, factors in p.gating.items():
        if layer not in p.replicas:
            raise InvalidRequestError(f"gating factors given for layer {layer}, which the placement does not cover")
        if len(factors) != num_experts or not all(0 < f < math.inf for f in factors):
            raise InvalidRequestError(f"layer {layer}: gating factors must be {num_experts} positive values")


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
