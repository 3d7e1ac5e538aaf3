"""Expert worker lifecycle: serve, register, join a world, load, run, follow worlds, leave.

1. Start the gRPC server (health NOT_SERVING) and register with the coordinator.
2. Wait for a world that lists this worker; read its placement.
3. Load the dense part and this rank's experts, join the world's communicator (off the loop).
4. Start the engine thread; health SERVING.
5. Follow placement epochs (prepared in the background), world generations (expert_worker.worlds:
   a lost peer or a joining worker means a new world, joined in-process, requests kept),
   heartbeat, report load and lost worlds.
6. On SIGINT/SIGTERM: stop taking requests, tell the coordinator (LeaveWorld), stop the engine
   thread at a step header (the others go on in a world without this one); the requests still
   here go back to the gateway as UNAVAILABLE, which moves them to live workers. The same when
   a world no longer lists this worker (evicted).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import uuid
from pathlib import Path

import grpc
import torch

from expert_worker.epochs import prepare_epoch
from expert_worker.metrics import WorkerMetrics
from expert_worker.runner import MeshRunner
from expert_worker.servicer import MeshMember, WorkerServicer
from expert_worker.settings import WorkerSettings
from expert_worker.worlds import Identity, WorldFollower, first_placement, join, leave, report_lost
from moemesh.engine.engine import Engine, EngineSettings
from moemesh.mesh.placement_wire import placement_from_proto
from moemesh.mesh.routing_counts import LoadRecorder
from moemesh.mesh.transport import AllToAllTransport
from moemesh.metrics import model_name, new_registry, serve_metrics
from moemesh.model.checkpoint import CheckpointReader
from moemesh.model.decoder import RuntimeShape, build_model
from moemesh.retry import Backoff, retry
from moemesh.rpc import (
    Server,
    channel,
    exit_with_parent,
    stop_event_on_signals,
    write_port_file,
)
from moemesh.status import is_not_yet
from moemesh.tensor_wire import to_proto
from moemesh.tls import tls_of
from moemesh.v1 import coordinator_pb2 as cpb
from moemesh.v1 import coordinator_pb2_grpc, worker_pb2_grpc

log = logging.getLogger("moemesh.worker")

# Who may call what, by the caller's certificate role (enforced with mTLS only: moemesh.rpc.RoleGate):
# requests come only through a gateway (its admission control, its API keys).
ACCESS: dict[str, tuple[str, ...]] = {
    "/moemesh.v1.Worker/Serve": ("gateway",),
    "/moemesh.v1.Worker/Status": ("gateway", "admin"),
}


async def serve(settings: WorkerSettings) -> int:
    torch.set_num_threads(settings.threads)
    # The engine thread releases the GIL around every torch op; with the default 5 ms switch
    # interval it then waits behind the gRPC thread for up to 5 ms each time (measured: decode
    # steps ~2x slower). A short interval hands the GIL back quickly.
    sys.setswitchinterval(settings.gil_switch_interval_s)
    stop = stop_event_on_signals()
    parent_watch = asyncio.create_task(exit_with_parent(stop)) if settings.exit_with_parent else None
    registry, metrics = new_registry(), WorkerMetrics("")
    registry.register(metrics)
    exporter = serve_metrics(registry, settings.host, settings.metrics_port)  # up before registering: it is listed
    if exporter is not None:
        write_port_file(settings.metrics_port_file, exporter.port)
        log.info("metrics on http://%s/metrics", exporter.address)
    try:
        return await _serve(settings, stop, metrics,
                            f"{settings.advertise_host}:{exporter.port}" if exporter is not None else "")
    finally:
        if parent_watch is not None:
            parent_watch.cancel()
        if exporter is not None:
            await asyncio.to_thread(exporter.stop)


async def _serve(settings: WorkerSettings, stop: asyncio.Event, metrics: WorkerMetrics, metrics_address: str) -> int:
    servicer = WorkerServicer()
    server = Server(["moemesh.v1.Worker"], settings.max_concurrent_rpcs, tls=tls_of(settings), roles=ACCESS)
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server.grpc)
    port = await server.start(settings.host, settings.port)
    write_port_file(settings.port_file, port)
    address = f"{settings.advertise_host}:{port}"
    # Incarnation: microseconds since the epoch, so a restarted process (same worker id) is always newer.
    me = Identity(settings.worker_id or f"worker-{uuid.uuid4().hex[:8]}", time.time_ns() // 1000)
    async with channel(settings.coordinator, tls_of(settings)) as ch:
        coord = coordinator_pb2_grpc.CoordinatorStub(ch)
        beats: asyncio.Task | None = None
        try:
            while True:
                metrics.at("registering")
                reg = await _register(coord, settings, me, (address, metrics_address), stop)
                if reg is None:
                    await server.stop(1.0)
                    return 0
                metrics.model = model_name(reg.model_path)
                # Heartbeats start with the registration: loading weights must not look like a stall.
                if beats is None:
                    beats = asyncio.create_task(_heartbeat(coord, settings, servicer, me,
                                                           reg.heartbeat_interval_seconds or 1.0))
                try:
                    metrics.at("waiting")
                    first = await _first_world(coord, settings, me, stop)
                    break
                except _NotRegistered:
                    log.warning("%s is not registered (evicted before its first world, or the coordinator "
                                "restarted without it): registering again", me.worker_id)
                    await asyncio.sleep(1.0)
            if first is None:
                await server.stop(1.0)
                return 0
            world, placement = first
            metrics.loading(CheckpointReader(Path(reg.model_path)))
            assert metrics.reader is not None
            node, reader = await asyncio.get_running_loop().run_in_executor(
                None, _build_node, settings, metrics.reader, world, placement)
            servicer.attach(node)
            metrics.attach(node)
            return await _run(settings, server, servicer, node, reader, coord, me, stop)
        finally:
            if beats is not None:
                beats.cancel()


class _NotRegistered(Exception):
    """The coordinator answered a world that does not list this worker and is not new."""


async def _register(coord, settings: WorkerSettings, me: Identity, addresses: tuple[str, str], stop: asyncio.Event):
    """`addresses`: its Worker service's and its metrics endpoint's ("" = off)."""
    address, metrics_address = addresses
    reg = await _retry_until_up(
        lambda: coord.RegisterWorker(cpb.RegisterWorkerRequest(
            worker_id=me.worker_id, incarnation=me.incarnation, address=address, metrics_address=metrics_address,
            device=settings.device, node=settings.node, memory_bytes=settings.expert_memory_bytes,
            weight_bytes_per_element=compute_dtype(settings.dtype, settings.device).itemsize),
            timeout=settings.rpc_timeout_s), stop, "coordinator")
    if reg is not None:
        log.info("registered %s at %s; waiting for a world that lists it", me.worker_id, address)
    return reg


async def _first_world(coord, settings: WorkerSettings, me: Identity, stop: asyncio.Event):
    """The first world that lists this worker (a worker that joins a running mesh waits for the
    generation formed for it) and the placement it starts on; None if stopped first."""
    after = 0
    while True:
        request = cpb.WaitForWorldRequest(after_generation=after, worker_id=me.worker_id, incarnation=me.incarnation)
        world = await _retry_until_up(
            lambda req=request: coord.WaitForWorld(req, timeout=settings.world_poll_s), stop, "world")
        if world is None:
            return None
        if world.rank < 0 and world.generation <= after:
            raise _NotRegistered()
        after = world.generation
        if world.rank < 0 or world.unservable_reason:
            continue
        placement = await first_placement(coord, settings, world, stop)
        return None if placement is None else (world, placement)


async def _retry_until_up(call, stop: asyncio.Event, what: str):
    """Retry while the peer is unavailable or slow (it may still be starting); None if stopped."""
    return await retry(call, is_not_yet, stop=stop, backoff=Backoff(first_s=0.1, cap_s=2.0),
                       on_retry=lambda attempt, exc: log.info("waiting for %s (%s)", what, exc))


def _build_node(settings: WorkerSettings, reader: CheckpointReader, world, placement):
    """Blocking: load weights, join the communicator, assemble engine and engine thread."""
    rank, size = world.rank, world.world_size
    model_dir = reader.model_dir
    runtime = RuntimeShape(max_seqs=settings.max_seqs, max_model_len=settings.max_model_len,
                           dtype=compute_dtype(settings.dtype, settings.device), device=settings.device)
    log.info("rank %d/%d: loading dense part and experts %s", rank, size, placement.assignment(rank))
    runner: MeshRunner | None = None  # the collective asks it whether a newer world exists
    collective, waker = join(world, lambda g: runner is not None and runner.abandoned(g), settings)
    recorder = LoadRecorder.for_placement(placement, settings.device)
    transport = AllToAllTransport(collective, placement, settings.device, observer=recorder)
    pieces = {layer: placement.pieces_on(rank, layer) for layer in placement.layers}
    model = build_model(model_dir, runtime, transport=transport, assignment=placement.assignment(rank), reader=reader,
                        shards=pieces, overflow=settings.overflow, capacity_factor=settings.capacity_factor,
                        recorder=recorder)
    model.moe.set_gating(placement)  # the first placement's factors (later epochs: MeshRunner)
    engine = Engine(model, EngineSettings(max_new_tokens_limit=settings.max_new_tokens_limit,
                                          micro_batches=settings.micro_batches,
                                          chunked_prefill=settings.chunked_prefill,
                                          max_batched_tokens=settings.max_batched_tokens))
    runner = MeshRunner(engine, collective, waker, placement.epoch, on_events=lambda ev: None, recorder=recorder,
                        report_every_tokens=settings.report_every_tokens, generation=world.generation)
    return MeshMember(runner=runner, engine=engine, device=settings.device), reader


def compute_dtype(requested: str, device: str) -> torch.dtype:
    """auto: fp32 on CPU (this class of CPU runs half precision ~100x slower), bf16 on GPU."""
    if requested == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[requested]


async def _run(settings, server, servicer, node: MeshMember, reader, coord, me: Identity, stop) -> int:
    loop = asyncio.get_running_loop()
    runner = node.runner
    background: set[asyncio.Task] = set()  # fire-and-forget calls in flight (the loop keeps only weak references)
    evicted = asyncio.Event()

    def on_events(events) -> None:  # these three run on the engine thread: hop onto the loop
        loop.call_soon_threadsafe(servicer.requests.deliver, events)

    def on_load(sample) -> None:
        loop.call_soon_threadsafe(_spawn, background, _report_load(coord, settings, me, sample))

    def on_world_lost(generation: int, reason: str) -> None:
        loop.call_soon_threadsafe(_spawn, background, _report_lost(coord, settings, me, generation, reason, evicted))

    runner.on_events, runner.on_load, runner.on_world_lost = on_events, on_load, on_world_lost
    thread = threading.Thread(target=runner.run, name="engine", daemon=True)
    thread.start()
    finished = asyncio.Event()
    thread_done = loop.run_in_executor(None, thread.join)
    thread_done.add_done_callback(lambda _: finished.set())
    follower = WorldFollower(coord, settings, me, runner, reader)
    following = asyncio.create_task(_follow_worlds(follower, stop, evicted))
    watcher = asyncio.create_task(_follow_placements(coord, settings, node, reader))
    await server.set_ready()
    log.info("rank %d serving", node.rank)
    await asyncio.wait({asyncio.create_task(stop.wait()), asyncio.create_task(finished.wait()),
                        asyncio.create_task(evicted.wait())}, return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set() and not finished.is_set() and not evicted.is_set():
        runner.stop_accepting()  # new submits go elsewhere (UNAVAILABLE) while the coordinator hears of it
        await leave(coord, settings, me)
    runner.request_stop()
    await thread_done
    for task in (following, watcher, *background):
        task.cancel()
    runner.collective.close()
    await server.stop(2.0)
    log.info("rank %d stopped after %d steps in %d world generations", node.rank, runner.steps,
             1 + follower.generations_joined)
    return 1 if runner.failure is not None or evicted.is_set() else 0


def _spawn(tasks: set[asyncio.Task], coro) -> None:
    task = asyncio.create_task(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)


async def _follow_worlds(follower: WorldFollower, stop: asyncio.Event, evicted: asyncio.Event) -> None:
    """Until this worker is no longer a member of the newest world (then `evicted` is set)."""
    try:
        await follower.follow(stop)
    except Exception:  # the follower must never die silently: without it the worker cannot heal
        log.exception("following world generations failed; this worker stops")
    if not stop.is_set():
        evicted.set()


async def _report_lost(coord, settings, me: Identity, generation: int, reason: str, evicted: asyncio.Event) -> None:
    if not await report_lost(coord, settings, me, generation, reason):
        log.warning("the coordinator no longer lists %s (evicted): stopping", me.worker_id)
        evicted.set()


async def _follow_placements(coord, settings: WorkerSettings, node: MeshMember, reader) -> None:
    """Prepare every new epoch, in order, off the loop; the engine thread switches at a step. The
    first epoch of a new world generation is the world follower's; later ones of that generation
    wait until the engine thread is in it. Reconnects (from the last epoch seen) when the
    coordinator goes away."""
    seen = node.runner.epoch
    while True:
        try:
            async for msg in coord.WatchPlacement(cpb.WatchPlacementRequest(after_epoch=seen)):
                seen = msg.epoch
                await _prepare_and_offer(node, reader, msg)
        except grpc.aio.AioRpcError as exc:
            log.info("placement watch interrupted (%s); reconnecting", exc.code().name)
        await asyncio.sleep(1.0)


async def _prepare_and_offer(node: MeshMember, reader, msg) -> None:
    runner = node.runner
    generation = msg.world_generation
    while runner.generation < generation and not runner.abandoned(generation):
        await asyncio.sleep(0.05)  # the world follower is bringing the engine thread into it
    if runner.generation != generation or msg.epoch <= runner.loaded_epoch:
        return
    placement = placement_from_proto(msg)
    cfg, runtime = node.engine.model.cfg, node.engine.model.runtime
    current = dict(node.engine.model.moe.experts.layers)
    prepared = await asyncio.get_running_loop().run_in_executor(
        None, prepare_epoch, placement, node.rank, current, reader, cfg, runtime.dtype, runtime.device)
    if runner.offer_epoch(prepared, generation):
        log.info("rank %d: placement epoch %d loaded", node.rank, placement.epoch)


async def _heartbeat(coord, settings: WorkerSettings, servicer: WorkerServicer, me: Identity,
                     interval_s: float) -> None:
    """Every `interval_s` (the coordinator's) from registration on (before the world forms,
    generation and epoch are 0)."""
    while True:
        node = servicer.node
        try:
            await coord.Heartbeat(cpb.HeartbeatRequest(
                worker_id=me.worker_id, incarnation=me.incarnation,
                world_generation=node.world_generation if node is not None else 0,
                loaded_epoch=node.runner.loaded_epoch if node is not None else 0), timeout=settings.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            log.warning("heartbeat failed: %s", exc.code().name)
        await asyncio.sleep(interval_s)


async def _report_load(coord, settings, me: Identity, sample) -> None:
    try:
        await coord.ReportLoad(cpb.ReportLoadRequest(
            worker_id=me.worker_id, incarnation=me.incarnation, rank=sample.rank,
            world_generation=sample.generation, placement_epoch=sample.epoch,
            window_tokens=sample.tokens, expert_counts=to_proto(sample.expert_counts),
            link_counts=to_proto(sample.link_counts)), timeout=settings.rpc_timeout_s)
    except grpc.aio.AioRpcError as exc:
        log.warning("load report failed: %s", exc.code().name)
