"""Gateway process lifecycle: bind, learn the world, open worker streams, serve, follow worlds, stop.

Health stays NOT_SERVING until a Serve stream is open to every worker of the world. From then on
the gateway follows the coordinator's worlds (`_follow_worlds`: each newer generation is applied
to the pool) and health tells the truth (`_track_health`): NOT_SERVING while no world can serve
(no live worker stream, or the world is unservable), SERVING again when one can. SIGINT / SIGTERM
(or the parent going away, with exit_with_parent) sets health NOT_SERVING, lets in-flight calls
finish for `grace_s` (migrations still happen meanwhile), then closes the worker streams. Every
gRPC object is created inside the running loop (uvloop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import uvloop

from gateway.coordinator_client import CoordinatorClient
from gateway.metrics import GatewayMetrics
from gateway.served_model import ServedModel
from gateway.servicer import GatewayServicer
from gateway.settings import GatewaySettings
from gateway.workers import WorkerPool
from moemesh import rpc
from moemesh.errors import UnavailableError
from moemesh.metrics import model_name, new_registry, serve_metrics
from moemesh.v1 import gateway_pb2, gateway_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name  # "moemesh.v1.Gateway"
FOLLOW_RETRY_S = 2.0  # wait after the coordinator answered WaitForWorld with an unexpected error


def run(settings: GatewaySettings) -> int:
    """Serve until stopped (the CLI's entry point); returns the exit status."""
    uvloop.run(serve(settings))
    return 0


async def serve(settings: GatewaySettings, stop: asyncio.Event | None = None) -> None:
    """The gateway, from start-up to graceful stop; `stop` (default: SIGINT / SIGTERM) ends it."""
    model = ServedModel(settings.model_dir, settings.max_model_len, settings.max_new_tokens_limit,
                        settings.default_max_new_tokens, settings.max_prompt_bytes)
    stop = rpc.stop_event_on_signals() if stop is None else stop
    watchdog = asyncio.create_task(rpc.exit_with_parent(stop)) if settings.exit_with_parent else None
    coordinator = CoordinatorClient(settings.coordinator, settings.call_timeout_s)
    pool = WorkerPool(settings.max_inflight, settings.call_timeout_s, settings.max_migrations,
                      settings.recovery_wait_s)
    metrics = GatewayMetrics(new_registry(), model_name(settings.model_dir), model.context)
    metrics.watch_pool(pool, asyncio.get_running_loop())
    server = rpc.Server([SERVICE_NAME], settings.concurrent_rpcs_limit)
    gateway_pb2_grpc.add_GatewayServicer_to_server(GatewayServicer(model, pool, coordinator, metrics), server.grpc)
    port = await server.start(settings.host, settings.port)
    exporter = serve_metrics(metrics.registry, settings.host, settings.metrics_port)
    if exporter is not None:
        rpc.write_port_file(settings.metrics_port_file, exporter.port)
        log.info("metrics on http://%s/metrics", exporter.address)
    rpc.write_port_file(settings.port_file, port)
    address = f"{settings.host}:{port}"
    log.info("gateway listening on %s (NOT_SERVING until every worker stream is open)", address)
    follower = health = None
    try:
        world = await coordinator.next_world(0, stop)
        if world is not None:
            pool.apply_world(world)
            follower = asyncio.create_task(_follow_worlds(coordinator, pool, stop), name="follow-worlds")
            if await pool.until_connected(stop):
                health = asyncio.create_task(_track_health(server, pool), name="track-health")
                log.info("gateway serving on %s: %s, context %d, %d workers", address, model.model_dir,
                         model.context, len(pool.links))
                print(f"gateway serving on {address}", flush=True)
                await stop.wait()
        log.info("gateway stopping (grace %.1f s)", settings.grace_s)
    finally:
        await _cancel(health)
        await server.stop(settings.grace_s)
        await _cancel(follower)
        await pool.close()
        await coordinator.close()
        await _cancel(watchdog)
        if exporter is not None:
            await asyncio.to_thread(exporter.stop)


async def _follow_worlds(coordinator: CoordinatorClient, pool: WorkerPool, stop: asyncio.Event) -> None:
    """Apply every newer world to the pool until `stop`; the world in force keeps serving while the
    coordinator is away."""
    while not stop.is_set():
        try:
            world = await coordinator.next_world(pool.generation, stop)
        except UnavailableError as exc:
            log.warning("%s; asking again in %.0f s", exc, FOLLOW_RETRY_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), FOLLOW_RETRY_S)
            continue
        if world is None:
            return
        pool.apply_world(world)


async def _track_health(server: rpc.Server, pool: WorkerPool) -> None:
    """SERVING while a request can be placed, NOT_SERVING (with the reason in the log) otherwise."""
    async for reason in pool.watch_serving():
        if not reason:
            await server.set_ready()
            log.info("SERVING (world %d, %d live workers)", pool.generation, pool.live_workers)
            continue
        await server.set_not_serving()
        log.warning("NOT_SERVING: %s", reason)


async def _cancel(task: asyncio.Task | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
