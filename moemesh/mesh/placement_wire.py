"""Placement <-> moemesh.v1.Placement messages (the coordinator publishes, workers apply).

Per expert, ExpertSlots.ranks lists the whole replicas (groups of one) and shard_groups the split
ones: together exactly `Placement.replicas[layer][expert]`, so the conversion is lossless. Gating
factors travel as float32, which is what `Placement` keeps. An empty origin on the wire means
"not given" (read as "operator"), so a placement without one is refused rather than renamed.
"""

from __future__ import annotations

from moemesh.mesh.placement import Placement, PlacementFormError
from moemesh.v1 import coordinator_pb2 as pb


def placement_to_proto(p: Placement, world_generation: int = 0) -> pb.Placement:
    """Raises PlacementFormError for what the message cannot carry: an empty origin, or a
    negative or too large epoch, world size or rank (the fields are unsigned)."""
    if not p.origin:
        raise PlacementFormError("a placement needs an origin to go on the wire (empty means 'not given')")
    try:
        return _to_proto(p, world_generation)
    except ValueError as exc:  # protobuf: an integer out of its field's range
        raise PlacementFormError(f"placement epoch {p.epoch} cannot go on the wire: {exc}") from None


def _to_proto(p: Placement, world_generation: int) -> pb.Placement:
    msg = pb.Placement(epoch=p.epoch, world_generation=world_generation, world_size=p.world_size, origin=p.origin)
    for layer in sorted(p.replicas):
        lp = msg.layers.add(layer=layer, gating_factors=list(p.gating.get(layer, ())))
        for groups in p.replicas[layer]:
            slots = lp.experts.add(ranks=[g[0] for g in groups if len(g) == 1])
            for group in groups:
                if len(group) != 1:
                    slots.shard_groups.add(ranks=list(group))
    return msg


def placement_from_proto(msg: pb.Placement) -> Placement:
    replicas = {lp.layer: tuple((*((r,) for r in s.ranks), *(tuple(g.ranks) for g in s.shard_groups))
                                for s in lp.experts) for lp in msg.layers}
    gating = {lp.layer: tuple(lp.gating_factors) for lp in msg.layers}
    return Placement(epoch=msg.epoch, world_size=msg.world_size, replicas=replicas, origin=msg.origin or "operator",
                     gating=gating)
