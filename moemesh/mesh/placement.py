"""Placement: which ranks hold which experts, per MoE layer, at one epoch. Pure: no torch, no gRPC.

A placement is the one thing every rank must agree on to route tokens (see docs/architecture.md,
"cross-rank invariants"): ranks switch to a new epoch at the same step, so routing tables always
match. `initial_placement` is the paper's starting point (expert e -> rank e mod R); the
coordinator's balancer (a later module) produces better ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from moemesh.errors import InvalidRequestError


@dataclass(frozen=True)
class Placement:
    """`layers[layer][expert]` = the ranks holding a replica of that expert (non-empty, sorted)."""

    epoch: int
    world_size: int
    layers: Mapping[int, tuple[tuple[int, ...], ...]]
    origin: str = "initial"
    # Policy "gating": per MoE layer, a factor per expert multiplying its gate probability when
    # experts are selected (combine weights stay the model's). Empty = exact routing.
    gating: Mapping[int, tuple[float, ...]] = field(default_factory=dict)

    def experts_on(self, rank: int, layer: int) -> tuple[int, ...]:
        """Global expert ids held by `rank` in `layer`, ascending: the rank's local expert order."""
        return tuple(e for e, ranks in enumerate(self.layers[layer]) if rank in ranks)

    def assignment(self, rank: int) -> dict[int, list[int]]:
        """MoE layer -> experts held by `rank` (what the worker loads)."""
        return {layer: list(self.experts_on(rank, layer)) for layer in self.layers}

    def experts_per_rank(self, layer: int) -> list[int]:
        counts = [0] * self.world_size
        for ranks in self.layers[layer]:
            for r in ranks:
                counts[r] += 1
        return counts


def initial_placement(num_experts: int, moe_layers: Iterable[int], world_size: int, epoch: int = 1) -> Placement:
    """Round-robin: expert e on rank e mod R. With more ranks than experts, rank r >= E holds a
    replica of expert r mod E (its copies share that expert's tokens).

    64 experts over 3 ranks gives 22, 21, 21: no divisibility rule.
    """
    if world_size <= 0:
        raise InvalidRequestError(f"world size must be positive, got {world_size}")
    holders: list[list[int]] = [[] for _ in range(num_experts)]
    for e in range(num_experts):
        holders[e].append(e % world_size)
    for r in range(num_experts, world_size):
        holders[r % num_experts].append(r)
    table = tuple(tuple(sorted(h)) for h in holders)
    return Placement(epoch=epoch, world_size=world_size, layers={layer: table for layer in moe_layers})


def validate_placement(p: Placement, num_experts: int, moe_layers: Iterable[int]) -> None:
    """Raise InvalidRequestError unless every expert of every MoE layer has >= 1 valid rank."""
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
