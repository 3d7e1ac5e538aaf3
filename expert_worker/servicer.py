"""Worker gRPC service: the gateway's request stream in, token events out. Thin: the engine thread
(`MeshRunner`) does the work; this file converts messages and routes events to their stream."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace

import grpc
import psutil

from expert_worker.errors import DuplicateRequestError, NotReadyError
from expert_worker.runner import Cancel, Event, MeshRunner, Rejected, Submit
from moemesh.engine.engine import Engine, FinishReason, TokenEvent
from moemesh.engine.sampling_wire import sampling_from_proto
from moemesh.errors import MoemeshError
from moemesh.rpc import status_for
from moemesh.v1 import common_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

_REASON = {
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.CANCELLED: common_pb2.FINISH_REASON_CANCELLED,
}


@dataclass
class _Route:
    """Where a request's events go, and what its Finished message must count."""

    out: asyncio.Queue
    prompt_tokens: int
    completion_tokens: int = 0
    done: bool = field(default=False)


@dataclass
class Node:
    """What the servicer needs once the worker has joined its world."""

    rank: int
    world_generation: int
    runner: MeshRunner
    engine: Engine
    device: str


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self):
        self.node: Node | None = None
        self.routes: dict[str, _Route] = {}

    def attach(self, node: Node) -> None:
        self.node = node

    def _require_node(self) -> Node:
        if self.node is None:
            raise NotReadyError("worker has not joined its mesh yet")
        return self.node

    # ---- events from the engine thread (hopped onto the loop by the server) ----------------------
    def deliver(self, events: list[Event]) -> None:
        """One step's events: a single Batch message per stream (not one message per token)."""
        per_stream: dict[int, tuple[asyncio.Queue, list]] = {}
        for ev in events:
            route = self.routes.get(ev.request_id)
            if route is None:
                continue  # its stream is gone; the request was cancelled
            per_stream.setdefault(id(route.out), (route.out, []))[1].extend(_event_messages(ev, route))
            if route.done:
                del self.routes[ev.request_id]
        for out, msgs in per_stream.values():
            out.put_nowait(msgs[0] if len(msgs) == 1 else worker_pb2.WorkerEvent(
                batch=worker_pb2.WorkerEvent.Batch(events=msgs)))

    # ---- RPCs -----------------------------------------------------------------------------------
    async def Serve(self, request_iterator, context):
        node = self._require_node()
        out: asyncio.Queue = asyncio.Queue()
        mine: set[str] = set()
        reader = asyncio.create_task(self._read_requests(request_iterator, node, out, mine))
        try:
            while True:
                getter = asyncio.create_task(out.get())
                done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    reader.result()  # re-raise a reader failure; else the client closed its side
                    return
                yield getter.result()
        finally:
            reader.cancel()
            for rid in mine:
                if self.routes.pop(rid, None) is not None:
                    node.runner.submit(Cancel(rid))

    async def _read_requests(self, requests, node: Node, out: asyncio.Queue, mine: set[str]) -> None:
        async for req in requests:
            kind = req.WhichOneof("kind")
            if kind == "submit":
                self._submit(req.submit, node, out, mine)
            elif kind == "cancel":
                node.runner.submit(Cancel(req.cancel.request_id))

    def _submit(self, msg, node: Node, out: asyncio.Queue, mine: set[str]) -> None:
        rid = msg.request_id
        generated = list(msg.generated_token_ids)
        prompt = list(msg.prompt_token_ids) + generated  # a resubmitted request resumes
        params = sampling_from_proto(msg.sampling)
        try:
            if not node.runner.accepting:
                raise NotReadyError("worker is leaving its mesh (stopping or failed); send this elsewhere")
            if rid in self.routes:
                raise DuplicateRequestError(f"request id {rid!r} is already running on this worker")
            if generated:
                params = _remaining(params, len(generated))
            node.engine.validate(prompt, params)
        except MoemeshError as exc:
            out.put_nowait(_rejected(rid, exc))
            return
        self.routes[rid] = _Route(out=out, prompt_tokens=len(msg.prompt_token_ids), completion_tokens=len(generated))
        mine.add(rid)
        node.runner.submit(Submit(rid, prompt, params))

    async def Status(self, request, context):
        node = self._require_node()
        engine = node.engine
        experts = engine.model.moe.experts
        msg = worker_pb2.WorkerStatus(
            rank=node.rank, world_generation=node.world_generation, placement_epoch=node.runner.epoch,
            loaded_epoch=node.runner.loaded_epoch, running_requests=engine.num_running,
            waiting_requests=engine.num_waiting, free_slots=engine.free_slots, expert_bytes=experts.nbytes,
            rss_bytes=psutil.Process().memory_info().rss, device=node.device, steps=node.runner.steps,
            step_seconds=node.runner.step_seconds, collective_seconds=node.runner.collective_seconds,
            tokens=node.runner.tokens, exchange_seconds=node.runner.exchange_seconds,
            hidden_seconds=node.runner.hidden_seconds,
        )
        for layer, held in sorted(experts.layers.items()):
            msg.experts.add(layer=layer, expert_ids=list(held.expert_ids))
        return msg


def _remaining(params, produced: int):
    return replace(params, max_new_tokens=params.max_new_tokens - produced)


def _rejected(rid: str, exc: MoemeshError) -> worker_pb2.WorkerEvent:
    code: grpc.StatusCode = status_for(exc)
    return worker_pb2.WorkerEvent(
        rejected=worker_pb2.WorkerEvent.Rejected(request_id=rid, code=code.value[0], message=str(exc))
    )


def _event_messages(ev: Event, route: _Route) -> list[worker_pb2.WorkerEvent]:
    if isinstance(ev, Rejected):
        route.done = True
        if route.completion_tokens == 0:
            return [_rejected(ev.request_id, ev.error)]
        # Tokens already streamed: the contract ends such a request with Finished{ERROR}.
        return [worker_pb2.WorkerEvent(finished=worker_pb2.WorkerEvent.Finished(
            request_id=ev.request_id, reason=common_pb2.FINISH_REASON_ERROR, prompt_tokens=route.prompt_tokens,
            completion_tokens=route.completion_tokens, error=str(ev.error)))]
    assert isinstance(ev, TokenEvent)
    msgs = []
    if ev.token_id is not None:
        route.completion_tokens += 1
        msgs.append(worker_pb2.WorkerEvent(tokens=worker_pb2.WorkerEvent.Tokens(
            request_id=ev.request_id, token_ids=[ev.token_id])))
    if ev.finish is not None:
        route.done = True
        msgs.append(worker_pb2.WorkerEvent(finished=worker_pb2.WorkerEvent.Finished(
            request_id=ev.request_id, reason=_REASON[ev.finish], prompt_tokens=route.prompt_tokens,
            completion_tokens=route.completion_tokens)))
    return msgs
