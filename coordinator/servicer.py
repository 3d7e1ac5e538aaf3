"""The Coordinator gRPC service: proto in, one domain call, proto out.

Typed errors (NOT_FOUND for an unknown worker included) become status codes in the shared
ErrorInterceptor (moemesh.rpc, table in moemesh.status).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from coordinator import wire
from coordinator.membership import check_info
from coordinator.probe import HealthProbe
from coordinator.state import CoordinatorState
from moemesh.errors import InvalidRequestError
from moemesh.tensor_wire import from_proto, to_proto
from moemesh.v1 import common_pb2
from moemesh.v1 import coordinator_pb2 as pb
from moemesh.v1 import coordinator_pb2_grpc as pb_grpc

ANSWER_EARLY_S = 1.0  # WaitForWorld answers DEADLINE_EXCEEDED this long before its caller's deadline


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    """Adapts CoordinatorState to moemesh.v1.Coordinator."""

    def __init__(
        self, state: CoordinatorState, model: common_pb2.ModelSpec, model_path: Path, heartbeat_interval_s: float,
        probe: HealthProbe | None = None,
    ):
        self.state = state
        self.model = model
        self.model_path = str(model_path)
        self.heartbeat_interval_s = heartbeat_interval_s
        self.probe = probe  # asks a registering worker's address first (None: --no-registration-probe)

    async def RegisterWorker(self, request: pb.RegisterWorkerRequest, context) -> pb.RegisterWorkerResponse:
        info = wire.worker_info(request)
        check_info(info)
        if self.probe is not None and not await self.probe(info):
            raise InvalidRequestError(
                f"worker {info.worker_id!r}: nothing answers grpc.health at {info.address} within "
                f"{self.probe.timeout_s:g} s; a member must be reachable there by its peers and the gateway "
                "(is --advertise-host right?)")
        reg = self.state.register(info)
        return pb.RegisterWorkerResponse(
            rank=reg.rank, world_size=reg.world_size, world_generation=reg.generation, model=self.model,
            model_path=self.model_path, heartbeat_interval_seconds=self.heartbeat_interval_s,
        )

    async def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatResponse:
        beat = self.state.heartbeat(request.worker_id, request.incarnation)
        return pb.HeartbeatResponse(world_generation=beat.world_generation, placement_epoch=beat.placement_epoch)

    async def ReportLoad(self, request: pb.ReportLoadRequest, context) -> pb.ReportLoadResponse:
        counts = from_proto(request.expert_counts)
        links = from_proto(request.link_counts) if request.HasField("link_counts") else None
        self.state.report_load(
            request.worker_id, request.incarnation, request.world_generation, request.window_tokens, counts, links,
        )
        return pb.ReportLoadResponse()

    async def WatchPlacement(self, request: pb.WatchPlacementRequest, context) -> AsyncIterator[pb.Placement]:
        async for published in self.state.watch(request.after_epoch):
            yield wire.published_to_proto(published)

    async def GetPlacement(self, request: pb.GetPlacementRequest, context) -> pb.GetPlacementResponse:
        current = self.state.published(request.epoch)
        load = self.state.load_snapshot()
        reply = pb.GetPlacementResponse(
            placement=wire.published_to_proto(current), window_tokens=load.window_tokens,
            expert_counts=to_proto(load.expert_counts), balancing_policy=self.state.policy,
        )
        if load.link_counts is not None:
            reply.link_counts.CopyFrom(to_proto(load.link_counts))
        if load.source_expert_counts is not None:
            reply.source_expert_counts.CopyFrom(to_proto(load.source_expert_counts))
        return reply

    async def SetPlacement(self, request: pb.SetPlacementRequest, context) -> pb.SetPlacementResponse:
        placement = wire.placement_request(request.placement)
        published = self.state.set_placement(placement, request.placement.world_generation, request.expected_epoch)
        return pb.SetPlacementResponse(placement=wire.published_to_proto(published))

    async def WaitForWorld(self, request: pb.WaitForWorldRequest, context) -> pb.World:
        # Answer DEADLINE_EXCEEDED ourselves a little before the caller's deadline: then a call that
        # is cancelled unanswered can only mean its client went away (a killed process?), never a
        # deadline that passed while this loaded machine was busy.
        remaining = context.time_remaining()
        wait_s = None if remaining is None else max(0.0, remaining - ANSWER_EARLY_S)
        try:
            world = await asyncio.wait_for(
                self.state.wait_for_world(request.after_generation, request.worker_id, request.incarnation), wait_s)
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"no world newer than generation {request.after_generation} yet")
        except asyncio.CancelledError:
            if request.worker_id:
                self.state.watcher_gone(request.worker_id, request.incarnation)
            raise
        return wire.world_to_proto(world, self.state.rank_in(world, request.worker_id, request.incarnation))

    async def ReportWorldLost(self, request: pb.ReportWorldLostRequest, context) -> pb.ReportWorldLostResponse:
        generation = self.state.report_world_lost(
            request.worker_id, request.incarnation, request.world_generation, request.reason)
        return pb.ReportWorldLostResponse(world_generation=generation)

    async def LeaveWorld(self, request: pb.LeaveWorldRequest, context) -> pb.LeaveWorldResponse:
        self.state.leave(request.worker_id, request.incarnation)
        return pb.LeaveWorldResponse()
