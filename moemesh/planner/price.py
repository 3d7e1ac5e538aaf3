"""Pricing a placement change: what moving to `proposed` costs and whether it pays. Pure numpy.

A rebalance copies every expert newly placed on a device (copies that are dropped are free).
Each copy comes from the nearest current holder: over NVLink when one is on the same node
(the receiving device's NVLink port), else over InfiniBand (the receiving node's port); with
`transfer_bandwidth_bytes_per_s` set, every copy is priced at that rate per device instead
(loading from the checkpoint, as workers do today). Per layer:

    bytes_to_move  = new (device, expert) pairs x expert_bytes
    transfer_s     = max(max_g nvlink bytes into g / NVLink bandwidth,
                         max_n InfiniBand bytes into node n / InfiniBand bandwidth)
    gain_s         = (layer_s now - layer_s proposed) x window_tokens / tokens per batch
    pays           = gain_s > transfer_s

Moves run in the background (no step waits for them), so a move "pays" when the serving time it
saves over the next window exceeds the link time it takes. Layers are priced independently so
a rebalance can take only the layers that pay (`keep_paying`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moemesh.mesh.placement import Placement
from moemesh.planner.problem import Problem
from moemesh.planner.slots import from_placement, holds


@dataclass(frozen=True)
class ChangePrice:
    layer_ids: tuple[int, ...]  # (L,)
    moved_experts: np.ndarray  # [L] expert copies newly placed on a device
    bytes_to_move: np.ndarray  # [L]
    transfer_s: np.ndarray  # [L]
    gain_s: np.ndarray  # [L] predicted serving time saved over the window (negative = loses)
    pays: np.ndarray  # [L] bool: gain_s > transfer_s

    @property
    def total_bytes(self) -> float:
        return float(self.bytes_to_move.sum())

    @property
    def paying_bytes(self) -> float:
        """Bytes moved when only the layers that pay change."""
        return float(self.bytes_to_move[self.pays].sum())


def price_change(current: Placement, proposed: Placement, problem: Problem, window_tokens: float,
                 transfer_bandwidth_bytes_per_s: float | None = None) -> ChangePrice:
    """Price moving from `current` to `proposed` for the next `window_tokens` tokens of
    `problem.traffic` (module docstring). Both placements cover problem.layer_ids."""
    topo, model, E = problem.topology, problem.model, problem.num_experts
    ids = problem.layer_ids
    now = from_placement(current, ids)  # [L, G, P]
    new = from_placement(proposed, ids)  # [L, G, P']
    # Step 1: predicted time per batch, now and proposed
    cost_now = model.evaluate_slots(now, problem.traffic)
    cost_new = model.evaluate_slots(new, problem.traffic)
    batches = window_tokens / np.maximum(problem.traffic.tokens_per_layer, 1e-30)  # [L]
    gain_s = (cost_now.layer_s - cost_new.layer_s) * batches
    # Step 2: copies to make, and the link each comes over
    L = len(ids)
    moved = np.zeros(L, dtype=np.int64)
    transfer_s = np.zeros(L)
    expert_bytes = problem.shape.expert_bytes
    for l in range(L):
        held_now, held_new = holds(now[l], E), holds(new[l], E)  # [G, E]
        added = held_new & ~held_now  # [G, E]
        moved[l] = int(added.sum())
        if not moved[l]:
            continue
        if transfer_bandwidth_bytes_per_s is not None:
            transfer_s[l] = added.sum(axis=1).max() * expert_bytes / transfer_bandwidth_bytes_per_s
            continue
        # Step 3: a same-node holder sends over NVLink, else the node's InfiniBand port takes it
        node_holds = np.zeros((topo.nodes, E), dtype=bool)
        node_holds[topo.node_of[np.nonzero(held_now)[0]], np.nonzero(held_now)[1]] = True
        near = node_holds[topo.node_of]  # [G, E]
        nvlink_bytes = (added & near).sum(axis=1) * expert_bytes  # [G]
        ib_bytes = np.bincount(topo.node_of, weights=(added & ~near).sum(axis=1), minlength=topo.nodes) * expert_bytes
        transfer_s[l] = max(float(topo.intra.time_s(nvlink_bytes.max())), float(topo.inter.time_s(ib_bytes.max())))
    return ChangePrice(layer_ids=ids, moved_experts=moved, bytes_to_move=moved * float(expert_bytes),
                       transfer_s=transfer_s, gain_s=gain_s, pays=gain_s > transfer_s)


def keep_paying(current: Placement, proposed: Placement, price: ChangePrice, epoch: int | None = None) -> Placement:
    """`proposed` in the layers that pay, `current` elsewhere (its gating factors too); the next
    epoch by default."""
    pays = dict(zip(price.layer_ids, price.pays.tolist()))
    replicas = {layer: (proposed.replicas[layer] if pays.get(layer, False) else table)
                for layer, table in current.replicas.items()}
    return Placement(epoch=current.epoch + 1 if epoch is None else epoch, world_size=current.world_size,
                     replicas=replicas, origin=f"{proposed.origin} (paying layers)", gating=current.gating)
