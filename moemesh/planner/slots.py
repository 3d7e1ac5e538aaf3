"""Slot tables: a placement as an integer array the planner can index. Pure: numpy only.

    slots[l, g, k] = expert in slot k of device g in MoE layer l, or -1 (empty)   [L, G, P]

P = slots per device per layer: 1 when there are at least as many devices as experts (the
paper's rule: at most one expert per device per layer), else ceil(E / G). A device never holds
the same expert twice in one layer. `to_placement` / `from_placement` convert to and from
moemesh.mesh.placement.Placement: whole experts only (a placement with shard groups is refused
with PlacementFormError); gating factors, epoch and origin travel beside the table as arguments,
so `to_placement(from_placement(p, ids), ids, E, p.epoch, p.origin, p.gating) == p` when `ids`
are all of p's layers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from moemesh.mesh.placement import Placement, PlacementFormError, whole_replicas

EMPTY = -1


def slots_per_device(num_experts: int, devices: int) -> int:
    """P: 1 when devices >= experts (one expert per device per layer), else ceil(E / G)."""
    return max(1, math.ceil(num_experts / devices))


def to_placement(slots: np.ndarray, layer_ids: Sequence[int], num_experts: int, epoch: int = 1,
                 origin: str = "planner", gating: Mapping[int, tuple[float, ...]] | None = None) -> Placement:
    """slots [L, G, P] -> Placement of whole replicas (every expert must be held somewhere).

    Slots carry no gating factors: pass those of the placement the slots came from to keep them."""
    G = slots.shape[1]
    holders = {}
    for l, layer in enumerate(layer_ids):
        table: list[list[int]] = [[] for _ in range(num_experts)]
        for g in range(G):
            for e in slots[l, g]:
                if e >= 0:
                    table[int(e)].append(g)
        assert all(table), f"layer {layer}: an expert has no device"
        holders[int(layer)] = table
    return whole_replicas(epoch, G, holders, origin=origin, gating=gating)


def from_placement(placement: Placement, layer_ids: Sequence[int], width: int | None = None) -> np.ndarray:
    """Placement -> slots [L, G, P]; P = `width` or the most experts any device holds in a layer.

    Slots hold whole experts: PlacementFormError for a placement with shard groups, or with more
    experts on a device than `width`. Gating factors are not part of the table (see `to_placement`)."""
    G = placement.world_size
    split = [layer for layer in layer_ids if any(len(g) > 1 for gs in placement.replicas[layer] for g in gs)]
    if split:
        raise PlacementFormError(f"layer {split[0]} has split experts (shard groups); the planner's slot tables "
                                 "hold whole experts only")
    P = width or max(max(placement.experts_per_rank(layer)) for layer in layer_ids)
    slots = np.full((len(layer_ids), G, P), EMPTY, dtype=np.int64)
    for l, layer in enumerate(layer_ids):
        fill = np.zeros(G, dtype=np.int64)
        for e, ranks in enumerate(placement.layers[layer]):
            for r in ranks:
                if fill[r] >= P:
                    raise PlacementFormError(f"layer {layer}: device {r} holds more than {P} experts")
                slots[l, r, fill[r]] = e
                fill[r] += 1
    return slots


def holds(slots_layer: np.ndarray, num_experts: int) -> np.ndarray:
    """slots [G, P] of one layer -> [G, E] bool: device g holds expert e."""
    G = slots_layer.shape[0]
    out = np.zeros((G, num_experts + 1), dtype=bool)
    out[np.arange(G)[:, None], np.where(slots_layer >= 0, slots_layer, num_experts)] = True
    return out[:, :num_experts]

