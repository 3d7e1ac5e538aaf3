"""Placement <-> moemesh.v1.Placement messages (the coordinator publishes, workers apply).

In a Placement a shard group's ranks are also listed as holders of the expert; on the wire
ExpertSlots.ranks lists only full replicas and the groups travel in shard_groups.
"""

from __future__ import annotations

from moemesh.mesh.placement import Placement
from moemesh.v1 import coordinator_pb2 as pb


def placement_to_proto(p: Placement, world_generation: int = 0) -> pb.Placement:
    msg = pb.Placement(epoch=p.epoch, world_generation=world_generation, world_size=p.world_size, origin=p.origin)
    for layer in sorted(p.layers):
        lp = msg.layers.add(layer=layer, gating_factors=list(p.gating.get(layer, ())))
        for e in range(len(p.layers[layer])):
            groups = p.groups(layer, e)
            slots = lp.experts.add(ranks=[g[0] for g in groups if len(g) == 1])
            for group in groups:
                if len(group) > 1:
                    slots.shard_groups.add(ranks=list(group))
    return msg


def placement_from_proto(msg: pb.Placement) -> Placement:
    layers, shards = {}, {}
    for lp in msg.layers:
        layers[lp.layer] = tuple(tuple(sorted([*s.ranks, *(r for g in s.shard_groups for r in g.ranks)]))
                                 for s in lp.experts)
        split = {e: tuple(tuple(g.ranks) for g in s.shard_groups) for e, s in enumerate(lp.experts) if s.shard_groups}
        if split:
            shards[lp.layer] = split
    gating = {lp.layer: tuple(lp.gating_factors) for lp in msg.layers if len(lp.gating_factors)}
    return Placement(epoch=msg.epoch, world_size=msg.world_size, layers=layers, origin=msg.origin or "operator",
                     gating=gating, shards=shards)
