"""Gateway process lifecycle: bind, learn the world, open worker streams, serve, stop gracefully.

Health stays NOT_SERVING until a Serve stream is open to every worker of the world; SIGINT /
SIGTERM (or the parent going away, with exit_with_parent) sets health NOT_SERVING, lets in-flight
calls finish for `grace_s`, then closes the worker streams. Every gRPC object is created inside
the running loop (uvloop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import uvloop

from gateway.coordinator_client import CoordinatorClient
from gateway.served_model import ServedModel
from gateway.servicer import GatewayServicer
from gateway.settings import GatewaySettings
from gateway.workers import WorkerPool
from moemesh import rpc
from moemesh.v1 import gateway_pb2, gateway_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name  # "moemesh.v1.Gateway"


def run(settings: GatewaySettings) -> int:
    """Serve until stopped (the CLI's entry point); returns the exit status."""
    uvloop.run(serve(settings))
    return 0


async def serve(settings: GatewaySettings) -> None:
    """The gateway, from start-up to graceful stop."""
    model = ServedModel(settings.model_dir, settings.max_model_len, settings.max_new_tokens_limit,
                        settings.default_max_new_tokens)
    stop = rpc.stop_event_on_signals()
    watchdog = asyncio.create_task(rpc.exit_with_parent(stop)) if settings.exit_with_parent else None
    coordinator = CoordinatorClient(settings.coordinator, settings.call_timeout_s)
    pool = WorkerPool(settings.max_inflight, settings.call_timeout_s)
    server = rpc.Server([SERVICE_NAME])
    gateway_pb2_grpc.add_GatewayServicer_to_server(GatewayServicer(model, pool, coordinator), server.grpc)
    port = await server.start(settings.host, settings.port)
    rpc.write_port_file(settings.port_file, port)
    address = f"{settings.host}:{port}"
    log.info("gateway listening on %s (NOT_SERVING until every worker stream is open)", address)
    try:
        if await _start_up(coordinator, pool, stop):
            await server.set_ready()
            log.info("gateway serving on %s: %s, context %d, %d workers", address, model.model_dir,
                     model.context, len(pool.links))
            print(f"gateway serving on {address}", flush=True)
            await stop.wait()
        log.info("gateway stopping (grace %.1f s)", settings.grace_s)
    finally:
        await server.stop(settings.grace_s)
        await pool.close()
        await coordinator.close()
        if watchdog is not None:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog


async def _start_up(coordinator: CoordinatorClient, pool: WorkerPool, stop: asyncio.Event) -> bool:
    """Learn the world and open every worker stream; False if asked to stop first."""
    world = await coordinator.wait_for_world(stop)
    if world is None:
        return False
    return await pool.connect(world, stop)

