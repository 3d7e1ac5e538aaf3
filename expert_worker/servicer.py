"""Worker gRPC service, thin: protos in, a call on the data plane (expert_worker.requests), protos
out. The engine thread (`MeshRunner`) does the work; the request table decides what is sent."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import psutil

from expert_worker.errors import NotReadyError
from expert_worker.requests import (
    Finished,
    Outcome,
    Rejected,
    RequestTable,
    Stream,
    Submission,
    Tokens,
)
from expert_worker.runner import MeshRunner
from moemesh.engine.engine import Engine, FinishReason
from moemesh.engine.sampling_wire import logprob_to_proto, sampling_from_proto
from moemesh.status import status_for
from moemesh.v1 import common_pb2, worker_pb2, worker_pb2_grpc

_REASON = {
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.CANCELLED: common_pb2.FINISH_REASON_CANCELLED,
    None: common_pb2.FINISH_REASON_ERROR,
}


@dataclass
class MeshMember:
    """What the servicer needs once the worker has joined its world."""

    runner: MeshRunner
    engine: Engine
    device: str

    @property
    def rank(self) -> int:
        """Rank in the world generation the engine thread serves (it changes with the generation)."""
        return self.runner.collective.rank

    @property
    def world_generation(self) -> int:
        return self.runner.generation


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self) -> None:
        self.node: MeshMember | None = None
        self.requests: RequestTable | None = None

    def attach(self, node: MeshMember) -> None:
        """The worker joined its world: serve requests on its engine thread."""
        self.node = node
        self.requests = RequestTable(node.runner.submit, lambda: node.runner.accepting, node.engine.validate)

    def _require_node(self) -> tuple[MeshMember, RequestTable]:
        if self.node is None or self.requests is None:
            raise NotReadyError("worker has not joined its mesh yet")
        return self.node, self.requests

    async def Serve(self, request_iterator, context):
        _, table = self._require_node()
        stream = table.open_stream()
        reader = asyncio.create_task(self._read_requests(request_iterator, table, stream))
        try:
            while True:
                getter = asyncio.create_task(stream.out.get())
                done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    reader.result()  # re-raise a reader failure; else the client closed its side
                    return
                yield _message(getter.result())
        finally:
            reader.cancel()
            table.close_stream(stream)

    async def _read_requests(self, requests, table: RequestTable, stream: Stream) -> None:
        async for req in requests:
            kind = req.WhichOneof("kind")
            if kind == "submit":
                table.submit(stream, _submission(req.submit))
            elif kind == "cancel":
                table.cancel(stream, req.cancel.request_id)

    async def Status(self, request, context):
        node, _ = self._require_node()
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


def _submission(msg: worker_pb2.WorkerRequest.Submit) -> Submission:
    return Submission(msg.request_id, tuple(msg.prompt_token_ids), sampling_from_proto(msg.sampling),
                      tuple(msg.generated_token_ids))


def _message(outcomes: list[Outcome]) -> worker_pb2.WorkerEvent:
    """One step's outcomes for a stream as ONE message: the event itself, or a Batch of them."""
    events = [_event(o) for o in outcomes]
    if len(events) == 1:
        return events[0]
    return worker_pb2.WorkerEvent(batch=worker_pb2.WorkerEvent.Batch(events=events))


def _event(outcome: Outcome) -> worker_pb2.WorkerEvent:
    match outcome:
        case Tokens(request_id=rid, token_ids=ids):
            return worker_pb2.WorkerEvent(tokens=worker_pb2.WorkerEvent.Tokens(
                request_id=rid, token_ids=ids, logprobs=[logprob_to_proto(lp) for lp in outcome.logprobs],
                prompt_logprobs=[logprob_to_proto(lp) for lp in outcome.prompt_logprobs]))
        case Finished():
            return worker_pb2.WorkerEvent(finished=worker_pb2.WorkerEvent.Finished(
                request_id=outcome.request_id, reason=_REASON[outcome.reason], prompt_tokens=outcome.prompt_tokens,
                completion_tokens=outcome.completion_tokens, error=outcome.error))
        case Rejected(request_id=rid, error=error):
            return worker_pb2.WorkerEvent(rejected=worker_pb2.WorkerEvent.Rejected(
                request_id=rid, code=status_for(error).value[0], message=str(error)))
    raise AssertionError(f"unexpected outcome {outcome!r}")
