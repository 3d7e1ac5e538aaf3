"""The gateway's view of the coordinator: which world (workers) exists, which placement epoch.

The gateway is an observer: it calls WaitForWorld without a worker_id to learn the workers'
addresses (at start-up, then again and again for each newer generation: `next_world`), and
GetPlacement for ModelInfo. Every call has a deadline; a call that finds no newer world in time
(DEADLINE_EXCEEDED) is simply made again, a coordinator that is down (UNAVAILABLE) is retried with
backoff while the gateway keeps serving the world it has.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from moemesh import rpc
from moemesh.errors import UnavailableError
from moemesh.retry import Backoff, retry
from moemesh.tls import TlsFiles
from moemesh.v1 import coordinator_pb2, coordinator_pb2_grpc

log = logging.getLogger(__name__)

WAIT_FOR_WORLD_S = 30.0  # deadline of each WaitForWorld call while following worlds


class CoordinatorClient:
    """A channel to the coordinator, made inside the running loop; close() when done."""

    def __init__(self, target: str, call_timeout_s: float, tls: TlsFiles | None = None):
        self.target = target
        self.call_timeout_s = call_timeout_s
        self._channel = rpc.channel(target, tls)
        self._stub = coordinator_pb2_grpc.CoordinatorStub(self._channel)

    async def next_world(self, after_generation: int, stop: asyncio.Event) -> coordinator_pb2.World | None:
        """The next world after `after_generation` (0: the first one, at start-up), however long it
        takes to form; None once `stop` is set. Each call waits WAIT_FOR_WORLD_S at most;
        DEADLINE_EXCEEDED just calls again, UNAVAILABLE (coordinator down or restarting) backs off;
        anything else raises UnavailableError."""
        request = coordinator_pb2.WaitForWorldRequest(after_generation=after_generation)

        async def call() -> coordinator_pb2.World:
            while True:  # no newer world within the call's deadline: ask again at once
                try:
                    return await self._stub.WaitForWorld(request, timeout=WAIT_FOR_WORLD_S)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                        raise

        def unavailable(exc: Exception) -> bool:
            return isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.UNAVAILABLE

        def note(attempt: int, exc: Exception) -> None:
            if attempt == 1 or attempt % 10 == 0:
                log.warning("coordinator %s unavailable (attempt %d): %s; %s", self.target, attempt, exc,
                            f"serving world {after_generation} meanwhile" if after_generation else "no world yet")

        try:
            world = await retry(call, unavailable, stop=stop, backoff=Backoff(first_s=0.2, cap_s=5.0), on_retry=note)
        except grpc.aio.AioRpcError as exc:
            raise UnavailableError(
                f"coordinator {self.target}: WaitForWorld failed: {exc.code().name}: {exc.details()}"
            ) from exc
        if world is not None:
            log.info("world %d from coordinator %s: %d workers%s", world.generation, self.target, world.world_size,
                     f" (cannot serve: {world.unservable_reason})" if world.unservable_reason else "")
        return world

    async def placement_epoch(self, fallback: int) -> tuple[int, str]:
        """(epoch of the placement in force, balancing policy); (`fallback`, "unknown") when the
        coordinator cannot say now."""
        try:
            reply = await self._stub.GetPlacement(coordinator_pb2.GetPlacementRequest(), timeout=self.call_timeout_s)
        except grpc.aio.AioRpcError as exc:
            log.warning("GetPlacement on %s failed (%s: %s); reporting epoch %d", self.target,
                        exc.code().name, exc.details(), fallback)
            return fallback, "unknown"
        return reply.placement.epoch, reply.balancing_policy

    async def close(self) -> None:
        """Close the channel (cancels calls still in flight)."""
        await self._channel.close()
