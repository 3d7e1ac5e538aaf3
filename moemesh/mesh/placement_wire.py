"""Placement <-> moemesh.v1.Placement messages (the coordinator publishes, workers apply)."""

from __future__ import annotations

from moemesh.mesh.placement import Placement
from moemesh.v1 import coordinator_pb2 as pb


def placement_to_proto(p: Placement, world_generation: int = 0) -> pb.Placement:
    msg = pb.Placement(epoch=p.epoch, world_generation=world_generation, world_size=p.world_size, origin=p.origin)
    for layer in sorted(p.layers):
        lp = msg.layers.add(layer=layer, gating_factors=list(p.gating.get(layer, ())))
        for ranks in p.layers[layer]:
            lp.experts.add(ranks=list(ranks))
    return msg


def placement_from_proto(msg: pb.Placement) -> Placement:
    layers = {lp.layer: tuple(tuple(sorted(s.ranks)) for s in lp.experts) for lp in msg.layers}
    gating = {lp.layer: tuple(lp.gating_factors) for lp in msg.layers if len(lp.gating_factors)}
    return Placement(epoch=msg.epoch, world_size=msg.world_size, layers=layers, origin=msg.origin or "operator",
                     gating=gating)
