"""Gateway process lifecycle: bind, learn the world, open worker streams, serve, follow worlds, stop.

Health stays NOT_SERVING until a Serve stream is open to every worker of the world. From then on
the gateway follows the coordinator's worlds (`_follow_worlds`: each newer generation is applied
to the pool) and health tells the truth (`_track_health`): NOT_SERVING while no world can serve
(no live worker stream, or the world is unservable), SERVING again when one can. SIGINT / SIGTERM
(or the parent going away, with exit_with_parent) sets health NOT_SERVING, lets in-flight calls
finish for `grace_s` (migrations still happen meanwhile), then closes the worker streams. Every
gRPC object is created inside the running loop (uvloop). The OpenAI-compatible HTTP API
(gateway.http: uvicorn in this same loop, `--http-port`) is bound next to gRPC at start-up; its
/health reports the same truth as gRPC health (`Serving`), and it stops with gRPC, with the same grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import uvloop

from gateway.api_keys import ApiKeyGate
from gateway.coordinator_client import CoordinatorClient
from gateway.http.app import create_app
from gateway.http.server import HttpServer
from gateway.metrics import GatewayMetrics
from gateway.served_model import ServedModel
from gateway.servicer import GatewayServicer
from gateway.settings import GatewaySettings
from gateway.workers import WorkerPool
from moemesh import rpc
from moemesh.auth import KeyGuard, load_key_file
from moemesh.errors import UnavailableError
from moemesh.metrics import model_name, new_registry, serve_metrics
from moemesh.tls import tls_of
from moemesh.v1 import gateway_pb2, gateway_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name  # "moemesh.v1.Gateway"
FOLLOW_RETRY_S = 2.0  # wait after the coordinator answered WaitForWorld with an unexpected error


class Serving:
    """Why the gateway does not serve now ("" = it serves): what gRPC health and HTTP /health report."""

    def __init__(self) -> None:
        self.reason = "starting: waiting for the world and a Serve stream to every worker"

    async def set(self, server: rpc.Server, reason: str) -> None:
        self.reason = reason
        await (server.set_not_serving() if reason else server.set_ready())


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
    tls = tls_of(settings)
    keys = _keys(settings)
    gates = (ApiKeyGate(keys, settings.default_max_new_tokens, settings.api_keys_guard_health),) if keys else ()
    coordinator = CoordinatorClient(settings.coordinator, settings.call_timeout_s, tls)
    pool = WorkerPool(settings.max_inflight, settings.call_timeout_s, settings.max_migrations,
                      settings.recovery_wait_s, tls)
    metrics = GatewayMetrics(new_registry(), model_name(settings.model_dir), model.context)
    metrics.watch_pool(pool, asyncio.get_running_loop())
    server = rpc.Server([SERVICE_NAME], settings.concurrent_rpcs_limit, tls=tls, gates=gates)
    gateway_pb2_grpc.add_GatewayServicer_to_server(GatewayServicer(model, pool, coordinator, metrics), server.grpc)
    serving = Serving()
    port = await server.start(settings.host, settings.port)
    exporter = serve_metrics(metrics.registry, settings.host, settings.metrics_port)
    if exporter is not None:
        rpc.write_port_file(settings.metrics_port_file, exporter.port)
        log.info("metrics on http://%s/metrics", exporter.address)
    http = HttpServer(create_app(model, pool, lambda: serving.reason, metrics=metrics, keys=keys,
                                 guard_health=settings.api_keys_guard_health)) if settings.http else None
    follower = health = None
    try:
        if http is not None:
            http_port = await http.start(settings.host, settings.http_port, settings.grace_s,
                                         settings.concurrent_rpcs_limit)
            rpc.write_port_file(settings.http_port_file, http_port)
            log.info("OpenAI-compatible HTTP API on http://%s:%d/v1", settings.host, http_port)
        rpc.write_port_file(settings.port_file, port)
        address = f"{settings.host}:{port}"
        log.info("gateway listening on %s (NOT_SERVING until every worker stream is open)", address)
        world = await coordinator.next_world(0, stop)
        if world is not None:
            pool.apply_world(world)
            follower = asyncio.create_task(_follow_worlds(coordinator, pool, stop), name="follow-worlds")
            if await pool.until_connected(stop):
                health = asyncio.create_task(_track_health(server, pool, serving), name="track-health")
                log.info("gateway serving on %s: %s, context %d, %d workers", address, model.model_dir,
                         model.context, len(pool.links))
                print(f"gateway serving on {address}", flush=True)
                await stop.wait()
        log.info("gateway stopping (grace %.1f s)", settings.grace_s)
    finally:
        await _cancel(health)
        serving.reason = "stopping"
        await asyncio.gather(server.stop(settings.grace_s), *([http.stop()] if http is not None else []))
        await _cancel(follower)
        await pool.close()
        await coordinator.close()
        await _cancel(watchdog)
        if exporter is not None:
            await asyncio.to_thread(exporter.stop)


def _keys(settings: GatewaySettings) -> KeyGuard | None:
    """The one KeyGuard of both fronts (gRPC and HTTP share each key's limits) when --api-keys-file
    is set (read once, at start-up); None otherwise."""
    if settings.api_keys_file is None:
        return None
    keys = load_key_file(settings.api_keys_file)
    log.info("API keys required (%d keys from %s; health, reflection and metrics %s)", len(keys.entries),
             settings.api_keys_file, "need one too" if settings.api_keys_guard_health else "open")
    return KeyGuard(keys)


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


async def _track_health(server: rpc.Server, pool: WorkerPool, serving: Serving) -> None:
    """SERVING while a request can be placed, NOT_SERVING (with the reason in the log) otherwise."""
    async for reason in pool.watch_serving():
        await serving.set(server, reason)
        if not reason:
            log.info("SERVING (world %d, %d live workers)", pool.generation, pool.live_workers)
            continue
        log.warning("NOT_SERVING: %s", reason)


async def _cancel(task: asyncio.Task | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
