"""The moemesh.v1.Gateway service: thin handlers over gateway.served_model, .generation and .workers.

Typed moemesh errors raised here (InvalidRequestError, CapacityError, UnavailableError) become
status codes in moemesh.rpc.ErrorInterceptor; a Generate that fails before its first token
(gateway.generation: rejected by its worker, or the worker lost) ends with that failure's code.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import grpc

from gateway.coordinator_client import CoordinatorClient
from gateway.generation import generate_batch, generate_one
from gateway.metrics import GatewayMetrics
from gateway.served_model import ServedModel
from gateway.workers import WorkerPool
from moemesh.errors import InvalidRequestError
from moemesh.v1 import gateway_pb2, gateway_pb2_grpc


def _new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def _deadline(context: grpc.aio.ServicerContext, received_at: float) -> float | None:
    """When the call ends, on the time.monotonic() clock; None when the client set no deadline."""
    remaining = context.time_remaining()
    return None if remaining is None else received_at + remaining


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    """Generate, GenerateBatch and ModelInfo."""

    def __init__(self, model: ServedModel, pool: WorkerPool, coordinator: CoordinatorClient,
                 metrics: GatewayMetrics | None = None):
        self.model = model
        self.pool = pool
        self.coordinator = coordinator
        self.metrics = metrics

    async def Generate(
        self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        """Validate, submit to the least-loaded worker, relay its tokens, then Finished."""
        received_at = time.monotonic()
        prepared = await self.model.prepare_off_loop(request, _new_request_id())
        async for response in generate_one(self.pool, self.model, prepared, received_at,
                                           _deadline(context, received_at), self.metrics):
            yield response  # a WorkerFailedError keeps the worker's code (moemesh.status)

    async def GenerateBatch(
        self, request: gateway_pb2.GenerateBatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.GenerateBatchResponse]:
        """Validate every prompt first (INVALID_ARGUMENT names the index), then run all at once."""
        received_at = time.monotonic()
        count = len(request.requests)
        if count == 0:
            raise InvalidRequestError("requests is empty: give at least one prompt")
        if count > self.pool.max_inflight:
            raise InvalidRequestError(
                f"a batch of {count} prompts is over this gateway's limit of {self.pool.max_inflight} "
                "requests in flight; split it"
            )
        items = [await self.model.prepare_off_loop(r, _new_request_id(), where=f"requests[{i}]: ")
                 for i, r in enumerate(request.requests)]
        async for response in generate_batch(self.pool, self.model, items, received_at,
                                             _deadline(context, received_at), self.metrics):
            yield response

    async def ModelInfo(
        self, request: gateway_pb2.ModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ModelInfoResponse:
        """The model (from its config) and the deployment (world, live workers, placement epoch)."""
        world = self.pool.world
        reply = gateway_pb2.ModelInfoResponse(model=self.model.spec(), balancing_policy="unknown",
                                              live_workers=self.pool.live_workers,
                                              not_serving_reason=self.pool.not_serving_reason)
        if world is not None:
            reply.num_workers = world.world_size
            reply.world_generation = world.generation
            reply.transport = world.transport
            reply.placement_epoch, reply.balancing_policy = await self.coordinator.placement_epoch(
                fallback=world.placement_epoch)
        return reply
