"""Domain objects <-> moemesh.v1 messages for the coordinator (no logic beyond translation)."""

from __future__ import annotations

from coordinator.membership import WorkerInfo
from coordinator.worlds import Published, World
from moemesh.errors import InvalidRequestError
from moemesh.mesh.placement import Placement
from moemesh.mesh.placement_wire import placement_from_proto, placement_to_proto
from moemesh.v1 import coordinator_pb2 as pb


def worker_info(req: pb.RegisterWorkerRequest) -> WorkerInfo:
    return WorkerInfo(
        worker_id=req.worker_id, incarnation=req.incarnation, address=req.address,
        device=req.device or "cpu", node=req.node, memory_bytes=req.memory_bytes,
        weight_bytes_per_element=req.weight_bytes_per_element, metrics_address=req.metrics_address,
    )


def world_to_proto(world: World, rank: int) -> pb.World:
    """World as seen by the caller whose rank is `rank` (-1 for observers)."""
    msg = pb.World(
        generation=world.generation,
        world_size=world.size,
        rank=rank,
        transport=world.data_plane.transport,
        rendezvous=pb.Rendezvous(
            store_host=world.data_plane.store_host,
            store_port=world.data_plane.store_port,
            store_prefix=world.store_prefix,
        ),
        placement_epoch=world.placement_epoch,
        unservable_reason=world.unservable_reason,
    )
    for r, m in enumerate(world.members):
        msg.members.add(
            rank=r, worker_id=m.worker_id, incarnation=m.incarnation, address=m.address, device=m.device, node=m.node,
            metrics_address=m.metrics_address,
        )
    return msg


def published_to_proto(p: Published) -> pb.Placement:
    return placement_to_proto(p.placement, world_generation=p.world_generation)


def placement_request(msg: pb.Placement) -> Placement:
    """An operator's placement from SetPlacementRequest (gating factors are checked by
    validate_placement)."""
    seen: set[int] = set()
    for lp in msg.layers:
        if lp.layer in seen:
            raise InvalidRequestError(f"layer {lp.layer} is placed twice")
        seen.add(lp.layer)
    return placement_from_proto(msg)
