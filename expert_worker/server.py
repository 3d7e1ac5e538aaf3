"""Expert worker lifecycle: serve, register, join the world, load, run, stop.

1. Start the gRPC server (health NOT_SERVING) and register with the coordinator.
2. Wait for the world to form; read the first placement.
3. Load the dense part and this rank's experts, join the gloo process group (off the loop).
4. Start the engine thread; health SERVING.
5. Follow placement epochs (prepared in the background), heartbeat, report load.
6. On SIGINT/SIGTERM, a peer's stop, or a broken world: stop the engine thread at a lockstep
   boundary, leave the process group, stop the server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import uuid
from pathlib import Path

import grpc
import torch

from expert_worker.epochs import prepare_epoch
from expert_worker.runner import MeshRunner
from expert_worker.servicer import MeshMember, WorkerServicer
from expert_worker.settings import WorkerSettings
from moemesh.engine.engine import Engine, EngineSettings
from moemesh.mesh.backend import choose_backend, join_world
from moemesh.mesh.gloo import StoreWaker
from moemesh.mesh.placement_wire import placement_from_proto
from moemesh.mesh.routing_counts import LoadRecorder
from moemesh.mesh.transport import AllToAllTransport
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
from moemesh.v1 import coordinator_pb2 as cpb
from moemesh.v1 import coordinator_pb2_grpc, worker_pb2_grpc

log = logging.getLogger("moemesh.worker")


async def serve(settings: WorkerSettings) -> int:
    torch.set_num_threads(settings.threads)
    # The engine thread releases the GIL around every torch op; with the default 5 ms switch
    # interval it then waits behind the gRPC thread for up to 5 ms each time (measured: decode
    # steps ~2x slower). A short interval hands the GIL back quickly.
    sys.setswitchinterval(settings.gil_switch_interval_s)
    stop = stop_event_on_signals()
    parent_watch = asyncio.create_task(exit_with_parent(stop)) if settings.exit_with_parent else None
    try:
        return await _serve(settings, stop)
    finally:
        if parent_watch is not None:
            parent_watch.cancel()


async def _serve(settings: WorkerSettings, stop: asyncio.Event) -> int:
    servicer = WorkerServicer()
    server = Server(["moemesh.v1.Worker"])
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server.grpc)
    port = await server.start(settings.host, settings.port)
    write_port_file(settings.port_file, port)
    address = f"{settings.advertise_host}:{port}"
    worker_id = settings.worker_id or f"worker-{uuid.uuid4().hex[:8]}"
    async with channel(settings.coordinator) as ch:
        coord = coordinator_pb2_grpc.CoordinatorStub(ch)
        joined = await _join(coord, settings, worker_id, address, stop)
        if joined is None:
            await server.stop(1.0)
            return 0
        node, collective, reader = joined
        servicer.attach(node)
        return await _run(settings, server, servicer, node, collective, reader, coord, worker_id, stop)


async def _join(coord, settings: WorkerSettings, worker_id: str, address: str, stop: asyncio.Event):
    incarnation = os.getpid()
    reg = await _retry_until_up(
        lambda: coord.RegisterWorker(cpb.RegisterWorkerRequest(
            worker_id=worker_id, incarnation=incarnation, address=address, device=settings.device,
            node=settings.node, memory_bytes=settings.expert_memory_bytes,
            weight_bytes_per_element=compute_dtype(settings.dtype, settings.device).itemsize),
            timeout=settings.rpc_timeout_s), stop, "coordinator")
    if reg is None:
        return None
    log.info("registered %s at %s as rank %d; waiting for the world", worker_id, address, reg.rank)
    world = await _retry_until_up(
        lambda: coord.WaitForWorld(cpb.WaitForWorldRequest(worker_id=worker_id, incarnation=incarnation),
                                   timeout=settings.rpc_timeout_s), stop, "world")
    if world is None:
        return None
    placement = placement_from_proto(
        (await coord.GetPlacement(cpb.GetPlacementRequest(), timeout=settings.rpc_timeout_s)).placement)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, _build_node, settings, Path(reg.model_path), world, placement)


async def _retry_until_up(call, stop: asyncio.Event, what: str):
    """Retry while the peer is unavailable or slow (it may still be starting); None if stopped."""
    return await retry(call, is_not_yet, stop=stop, backoff=Backoff(first_s=0.1, cap_s=2.0),
                       on_retry=lambda attempt, exc: log.info("waiting for %s (%s)", what, exc))


def _build_node(settings: WorkerSettings, model_dir: Path, world, placement):
    """Blocking: load weights, join the process group, assemble engine and engine thread."""
    rank, size = world.rank, world.world_size
    reader = CheckpointReader(model_dir)
    runtime = RuntimeShape(max_seqs=settings.max_seqs, max_model_len=settings.max_model_len,
                           dtype=compute_dtype(settings.dtype, settings.device), device=settings.device)
    log.info("rank %d/%d: loading dense part and experts %s", rank, size, placement.assignment(rank))
    rv = world.rendezvous
    choice = choose_backend(world.transport or "gloo", settings.device)
    log.info("rank %d: data plane %s (%s)", rank, choice.name, choice.reason)
    collective = join_world(choice, rv.store_host, rv.store_port, rv.store_prefix, rank, size, settings.device,
                            settings.collective_timeout_s, micro_batches=settings.micro_batches)
    recorder = LoadRecorder.for_placement(placement, settings.device)
    transport = AllToAllTransport(collective, placement, settings.device, observer=recorder)
    pieces = {layer: placement.pieces_on(rank, layer) for layer in placement.layers}
    model = build_model(model_dir, runtime, transport=transport, assignment=placement.assignment(rank), reader=reader,
                        shards=pieces, overflow=settings.overflow, capacity_factor=settings.capacity_factor,
                        recorder=recorder)
    engine = Engine(model, EngineSettings(max_new_tokens_limit=settings.max_new_tokens_limit,
                                          micro_batches=settings.micro_batches))
    waker = StoreWaker(rv.store_host, rv.store_port, f"{rv.store_prefix}wake/", timeout_s=3600.0)
    runner = MeshRunner(engine, collective, waker, placement.epoch, on_events=lambda ev: None, recorder=recorder,
                        report_every_tokens=settings.report_every_tokens)
    node = MeshMember(rank=rank, world_generation=world.generation, runner=runner, engine=engine,
                      device=settings.device)
    return node, collective, reader


def compute_dtype(requested: str, device: str) -> torch.dtype:
    """auto: fp32 on CPU (this class of CPU runs half precision ~100x slower), bf16 on GPU."""
    if requested == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[requested]


async def _run(settings, server, servicer, node, collective, reader, coord, worker_id, stop) -> int:
    loop = asyncio.get_running_loop()
    runner = node.runner
    runner.on_events = lambda events: loop.call_soon_threadsafe(servicer.requests.deliver, events)
    reports: set[asyncio.Task[None]] = set()  # load reports in flight (the loop keeps only weak references)
    runner.on_load = lambda sample: loop.call_soon_threadsafe(
        _report_load, coord, settings, node, worker_id, sample, reports)
    thread = threading.Thread(target=runner.run, name="engine", daemon=True)
    thread.start()
    finished = asyncio.Event()
    thread_done = loop.run_in_executor(None, thread.join)
    thread_done.add_done_callback(lambda _: finished.set())
    watcher = asyncio.create_task(_follow_placements(coord, settings, node, reader))
    beats = asyncio.create_task(_heartbeat(coord, settings, node, worker_id))
    await server.set_ready()
    log.info("rank %d serving", node.rank)
    await asyncio.wait({asyncio.create_task(stop.wait()), asyncio.create_task(finished.wait())},
                       return_when=asyncio.FIRST_COMPLETED)
    runner.request_stop()
    await thread_done
    for task in (watcher, beats, *reports):
        task.cancel()
    collective.close()
    await server.stop(2.0)
    log.info("rank %d stopped after %d steps", node.rank, runner.steps)
    return 1 if runner.failure is not None else 0


async def _follow_placements(coord, settings: WorkerSettings, node: MeshMember, reader) -> None:
    """Prepare every new epoch, in order, off the loop; the engine thread switches at a step."""
    loop = asyncio.get_running_loop()
    cfg = node.engine.model.cfg
    async for msg in coord.WatchPlacement(cpb.WatchPlacementRequest(after_epoch=node.runner.epoch)):
        placement = placement_from_proto(msg)
        if placement.epoch <= node.runner.loaded_epoch:
            continue
        current = dict(node.engine.model.moe.experts.layers)
        runtime = node.engine.model.runtime
        prepared = await loop.run_in_executor(
            None, prepare_epoch, placement, node.rank, current, reader, cfg, runtime.dtype, runtime.device)
        node.runner.offer_epoch(prepared)
        log.info("rank %d: placement epoch %d loaded", node.rank, placement.epoch)


async def _heartbeat(coord, settings: WorkerSettings, node: MeshMember, worker_id: str) -> None:
    while True:
        try:
            await coord.Heartbeat(cpb.HeartbeatRequest(
                worker_id=worker_id, incarnation=os.getpid(), world_generation=node.world_generation,
                loaded_epoch=node.runner.loaded_epoch), timeout=settings.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            log.warning("heartbeat failed: %s", exc.code().name)
        await asyncio.sleep(1.0)


def _report_load(coord, settings, node: MeshMember, worker_id: str, sample, reports: set[asyncio.Task[None]]) -> None:
    async def send():
        try:
            await coord.ReportLoad(cpb.ReportLoadRequest(
                worker_id=worker_id, incarnation=os.getpid(), rank=node.rank,
                world_generation=node.world_generation, placement_epoch=node.runner.epoch,
                window_tokens=sample.tokens, expert_counts=to_proto(sample.expert_counts),
                link_counts=to_proto(sample.link_counts)), timeout=settings.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            log.warning("load report failed: %s", exc.code().name)

    task = asyncio.create_task(send())
    reports.add(task)
    task.add_done_callback(reports.discard)
