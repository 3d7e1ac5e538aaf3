"""Scripted workers for fast gateway tests: real Worker gRPC services on loopback that answer
each Submit as a test's script says, and the real WorkerPool connected to them.

A script maps a Submit to the steps the worker sends on its Serve stream: WorkerEvent messages
(sent as they are: single events or a Batch), `BREAK` (the worker fails the stream with
UNAVAILABLE, as a crashed or restarted worker would look) or nothing more (the request runs until
the gateway cancels it; a Cancel is answered with Finished{CANCELLED}, like a real worker).
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
from moemesh.v1 import common_pb2, coordinator_pb2, worker_pb2, worker_pb2_grpc

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


def prepared(prompt: Sequence[int] = (1, 2, 3), max_new_tokens: int = 8, include_text: bool = False) -> Prepared:
    return Prepared(tuple(prompt), SamplingParams(max_new_tokens=max_new_tokens), "client-id", include_text)


class ScriptedWorker(worker_pb2_grpc.WorkerServicer):
    """A real Worker service replying as `script` says; records what the gateway sent."""

    def __init__(self, rank: int, script: Script):
        self.rank = rank
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


@contextlib.asynccontextmanager
async def scripted_pool(workers: Sequence[ScriptedWorker], max_inflight: int = 16) -> AsyncIterator[WorkerPool]:
    """A WorkerPool connected to `workers`, each served on its own loopback port; all stopped after."""
    servers, world = [], coordinator_pb2.World(world_size=len(workers), generation=1, transport="gloo")
    pool = WorkerPool(max_inflight, call_timeout_s=HANG_BOUND_S)
    try:
        for worker in workers:
            server = grpc.aio.server()
            worker_pb2_grpc.add_WorkerServicer_to_server(worker, server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            servers.append(server)
            world.members.add(rank=worker.rank, worker_id=f"w{worker.rank}", address=f"127.0.0.1:{port}")
        assert await asyncio.wait_for(pool.connect(world, asyncio.Event()), HANG_BOUND_S)
        yield pool
    finally:
        await pool.close()
        for server in servers:
            await server.stop(None)
