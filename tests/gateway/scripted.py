"""Scripted workers and coordinator for fast gateway tests: real Worker / Coordinator gRPC services
on loopback that answer as a test's script says, and the real WorkerPool connected to them.

A script maps a Submit to the steps the worker sends on its Serve stream: WorkerEvent messages
(sent as they are: single events or a Batch), `BREAK` (the worker fails the stream with
UNAVAILABLE, as a crashed or restarted worker would look) or nothing more (the request runs until
the gateway cancels it; a Cancel is answered with Finished{CANCELLED}, like a real worker).
The scripted coordinator publishes the worlds a test gives it (`publish`) through a real
WaitForWorld that waits for a newer generation up to the call's deadline, as the coordinator does.
Nothing here is a stand-in for the gateway: the pool, its links and gRPC are the real ones.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence

import grpc

from gateway.served_model import Prepared
from gateway.workers import WorkerPool
from moemesh.engine.sampling import SamplingParams
from moemesh.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, worker_pb2, worker_pb2_grpc

HANG_BOUND_S = 10.0  # only catches a hang: every wait below ends on an event long before
BREAK = "break"
Step = worker_pb2.WorkerEvent | str
Script = Callable[[worker_pb2.WorkerRequest.Submit], Sequence[Step]]


def tokens(rid: str, *ids: int) -> worker_pb2.WorkerEvent:
    return worker_pb2.WorkerEvent(tokens=worker_pb2.WorkerEvent.Tokens(request_id=rid, token_ids=ids))


def finished(rid: str, reason: int, completion: int = 0, error: str = "") -> worker_pb2.WorkerEvent:
    return worker_pb2.WorkerEvent(finished=worker_pb2.WorkerEvent.Finished(
        request_id=rid, reason=reason, completion_tokens=completion, error=error))  # type: ignore[arg-type]


def rejected(rid: str, code: grpc.StatusCode, message: str) -> worker_pb2.WorkerEvent:
    return worker_pb2.WorkerEvent(rejected=worker_pb2.WorkerEvent.Rejected(
        request_id=rid, code=code.value[0], message=message))


def batch(*events: worker_pb2.WorkerEvent) -> worker_pb2.WorkerEvent:
    return worker_pb2.WorkerEvent(batch=worker_pb2.WorkerEvent.Batch(events=events))


def prepared(prompt: Sequence[int] = (1, 2, 3), max_new_tokens: int = 8, include_text: bool = False,
             **sampling) -> Prepared:
    return Prepared(tuple(prompt), SamplingParams(max_new_tokens=max_new_tokens, **sampling), "client-id",
                    include_text)


def world(generation: int, *workers: ScriptedWorker | tuple[ScriptedWorker, int],
          unservable_reason: str = "") -> coordinator_pb2.World:
    """A world of `workers` (served ones) in rank order; (worker, incarnation) gives an incarnation."""
    w = coordinator_pb2.World(generation=generation, world_size=len(workers), transport="gloo", rank=-1,
                              unservable_reason=unservable_reason)
    for rank, item in enumerate(workers):
        worker, incarnation = item if isinstance(item, tuple) else (item, 0)
        w.members.add(rank=rank, worker_id=worker.worker_id, incarnation=incarnation, address=worker.address)
    return w


class ScriptedWorker(worker_pb2_grpc.WorkerServicer):
    """A real Worker service replying as `script` says; records what the gateway sent."""

    def __init__(self, rank: int, script: Script):
        self.rank = rank
        self.worker_id = f"w{rank}"
        self.address = ""  # set once served
        self.script = script
        self.submits: list[worker_pb2.WorkerRequest.Submit] = []
        self.cancels: list[str] = []
        self.streams = 0  # Serve streams opened so far
        self._changed = asyncio.Condition()

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        """Until `condition()` holds (checked whenever a request or stream arrives)."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(condition), HANG_BOUND_S)

    async def Status(self, request, context):
        return worker_pb2.WorkerStatus(rank=self.rank)

    async def Serve(self, request_iterator, context):
        out: asyncio.Queue[Step] = asyncio.Queue()
        reader = asyncio.create_task(self._read(request_iterator, out))
        async with self._changed:
            self.streams += 1
            self._changed.notify_all()
        try:
            while True:
                step = await out.get()
                if step == BREAK:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"scripted worker {self.rank} broke")
                yield step
        finally:
            reader.cancel()

    async def _read(self, requests, out: asyncio.Queue) -> None:
        async for req in requests:
            async with self._changed:
                if req.HasField("submit"):
                    self.submits.append(req.submit)
                    steps = list(self.script(req.submit))
                else:
                    self.cancels.append(req.cancel.request_id)
                    steps = [finished(req.cancel.request_id, common_pb2.FINISH_REASON_CANCELLED)]
                self._changed.notify_all()
            for step in steps:
                out.put_nowait(step)


class ScriptedCoordinator(coordinator_pb2_grpc.CoordinatorServicer):
    """A real Coordinator service answering WaitForWorld with the worlds a test publishes."""

    def __init__(self) -> None:
        self.address = ""  # set once served
        self.worlds: list[coordinator_pb2.World] = []
        self._published = asyncio.Condition()

    async def publish(self, world: coordinator_pb2.World) -> None:
        async with self._published:
            self.worlds.append(world)
            self._published.notify_all()

    async def WaitForWorld(self, request, context):
        def newer() -> bool:
            return bool(self.worlds) and self.worlds[-1].generation > request.after_generation

        async with self._published:
            try:
                await asyncio.wait_for(self._published.wait_for(newer), context.time_remaining())
            except TimeoutError:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no newer world yet")
            return self.worlds[-1]

    async def GetPlacement(self, request, context):
        return coordinator_pb2.GetPlacementResponse(placement=coordinator_pb2.Placement(epoch=1),
                                                    balancing_policy="none")


@contextlib.asynccontextmanager
async def served(workers: Sequence[ScriptedWorker] = (),
                 coordinator: ScriptedCoordinator | None = None) -> AsyncIterator[None]:
    """Serve each scripted service on its own loopback port (sets its `address`); stopped after."""
    servers = []
    try:
        for service in [*workers, *([coordinator] if coordinator is not None else [])]:
            server = grpc.aio.server()
            if isinstance(service, ScriptedWorker):
                worker_pb2_grpc.add_WorkerServicer_to_server(service, server)
            else:
                coordinator_pb2_grpc.add_CoordinatorServicer_to_server(service, server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            servers.append(server)
            service.address = f"127.0.0.1:{port}"
        yield None
    finally:
        for server in servers:
            await server.stop(None)


@contextlib.asynccontextmanager
async def scripted_pool(workers: Sequence[ScriptedWorker], max_inflight: int = 16, *, connect: bool = True,
                        **pool_settings) -> AsyncIterator[WorkerPool]:
    """A WorkerPool following a first world of `workers` (connected unless `connect=False`),
    each served on its own loopback port; all stopped after."""
    pool = WorkerPool(max_inflight, call_timeout_s=HANG_BOUND_S, **pool_settings)
    async with served(workers):
        try:
            if connect:
                assert await asyncio.wait_for(pool.connect(world(1, *workers), asyncio.Event()), HANG_BOUND_S)
            yield pool
        finally:
            await pool.close()
