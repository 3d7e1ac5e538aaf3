"""What a request hears from the worker pool: three typed events, converted once from the wire.

`WorkerPool` turns every WorkerEvent message (or a broken stream) into these at its edge; the
rest of the gateway never sees a worker proto.

- `Tokens(ids, offset, logprobs, prompt_logprobs)`: new tokens; `offset` is how many tokens of this
  request came before; their log-probabilities when the request asked (the prompt's on the first).
- `Finished(reason, error)`: the worker ended the request (error set only for FINISH_REASON_ERROR).
- `Failed(code, message)`: the request ended abnormally: the worker rejected it (its own status
  code), or its worker let go of it and it could not be migrated (UNAVAILABLE). A Failed with
  UNAVAILABLE from a worker (Rejected{UNAVAILABLE}: "leaving / lost its mesh, send it elsewhere")
  never reaches a request: the pool migrates the request instead (gateway.workers).

A request's last event is exactly one Finished or Failed. What a Failed means for the client
(status error or Finished{ERROR}) is decided in one place: `gateway.generation.Progress.failed`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from moemesh.engine.logprobs import TokenLogprob
from moemesh.engine.sampling_wire import logprob_from_proto
from moemesh.status import status_code_of
from moemesh.v1 import common_pb2, worker_pb2


@dataclass(frozen=True)
class Tokens:
    """New tokens of one request, in generation order; never empty."""

    ids: tuple[int, ...]
    offset: int  # tokens of this request received before ids[0]
    logprobs: tuple[TokenLogprob, ...] = ()  # one per id, when the request asked
    prompt_logprobs: tuple[TokenLogprob, ...] = ()  # on the request's first Tokens, when it asked


@dataclass(frozen=True)
class Finished:
    """The worker ended the request; `reason` is a common_pb2.FinishReason, never UNSPECIFIED."""

    reason: common_pb2.FinishReason.ValueType
    error: str = ""  # set only when reason is FINISH_REASON_ERROR


@dataclass(frozen=True)
class Failed:
    """The request ended without a Finished: rejected by its worker, or its worker let go of it
    and the pool could not migrate it."""

    code: grpc.StatusCode
    message: str


Event = Tokens | Finished | Failed


def worker_events(message: worker_pb2.WorkerEvent) -> Iterator[worker_pb2.WorkerEvent]:
    """The single events of a message, a Batch flattened, in order; empty Tokens dropped."""
    if message.WhichOneof("kind") == "batch":
        for inner in message.batch.events:
            yield from worker_events(inner)
    elif message.WhichOneof("kind") is not None and not (message.HasField("tokens") and not message.tokens.token_ids):
        yield message


def request_id_of(message: worker_pb2.WorkerEvent) -> str:
    """The request a single (non-Batch) event belongs to."""
    kind = message.WhichOneof("kind")
    assert kind in ("tokens", "finished", "rejected"), f"not a single event: {kind}"
    return str(getattr(message, kind).request_id)


def from_worker(message: worker_pb2.WorkerEvent, received: int, worker: str) -> Event:
    """The typed event for one single worker event; `received`: the request's tokens so far,
    `worker`: the worker's name for messages."""
    kind = message.WhichOneof("kind")
    if kind == "tokens":
        tokens = message.tokens
        return Tokens(tuple(tokens.token_ids), offset=received,
                      logprobs=tuple(logprob_from_proto(lp) for lp in tokens.logprobs),
                      prompt_logprobs=tuple(logprob_from_proto(lp) for lp in tokens.prompt_logprobs))
    if kind == "finished":
        reason = message.finished.reason or common_pb2.FINISH_REASON_ERROR
        failed = reason == common_pb2.FINISH_REASON_ERROR
        error = (message.finished.error or f"{worker} gave no reason") if failed else ""
        return Finished(reason, error)
    assert kind == "rejected", f"not a single event: {kind}"
    return Failed(status_code_of(message.rejected.code), f"{worker} rejected the request: {message.rejected.message}")

