"""Turning worker events into Generate / GenerateBatch responses.

A request's events arrive on a sink (see gateway.workers). Tokens already waiting when the
gateway gets to them are coalesced into one TokenChunk, so a slow client receives fewer, larger
chunks instead of falling behind. Bookkeeping is freed in `finally`, which also runs when the
handler is cancelled (client gone, deadline passed): `WorkerPool.release` then sends Cancel.

Failure semantics (gateway.proto): before any token has been streamed, a rejection or a lost
worker fails a Generate call with the worker's code / UNAVAILABLE; after tokens were streamed (and
always inside a batch, where other prompts keep going) it ends that generation with
Finished{FINISH_REASON_ERROR, error}.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

from gateway.errors import WorkerLostError, WorkerRejectedError, status_code_of
from gateway.model import Prepared, ServedModel
from gateway.workers import Lost, WorkerPool
from moemesh.v1 import common_pb2, gateway_pb2, worker_pb2

Response = gateway_pb2.GenerateResponse


class Progress:
    """One prompt's response state: tokens streamed, text decoding, timing."""

    def __init__(self, model: ServedModel, prepared: Prepared, worker: str, received_at: float):
        self.prepared = prepared
        self.worker = worker
        self.received_at = received_at
        self.decoder = model.decoder() if prepared.include_text else None
        self.offset = 0  # tokens streamed so far
        self.first_token_at: float | None = None

    def chunk(self, token_ids: list[int]) -> Response:
        """A TokenChunk for `token_ids` (non-empty), with their text when asked for."""
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        text = self.decoder.push(token_ids) if self.decoder is not None else ""
        msg = Response.TokenChunk(token_ids=token_ids, text=text, offset=self.offset)
        self.offset += len(token_ids)
        return Response(chunk=msg)

    def finished(self, reason: int, error: str = "") -> Response:
        """The final message; counts and timings are the gateway's own."""
        now = time.monotonic()
        ttft = self.first_token_at - self.received_at if self.first_token_at is not None else 0.0
        msg = Response.Finished(
            reason=reason, prompt_tokens=len(self.prepared.prompt), completion_tokens=self.offset,
            ttft_seconds=ttft, latency_seconds=now - self.received_at, request_id=self.prepared.request_id,
            error=error if reason == common_pb2.FINISH_REASON_ERROR else "",
        )
        return Response(finished=msg)

    def on_event(self, event: object, strict: bool) -> tuple[Response, bool]:
        """(response, ended) for one coalesced event. `strict` (single Generate): a failure before
        any token raises, so the call fails with a status; otherwise it becomes Finished{ERROR}."""
        if isinstance(event, list):
            return self.chunk(event), False
        if isinstance(event, worker_pb2.WorkerEvent.Finished):
            reason = event.reason or common_pb2.FINISH_REASON_ERROR
            return self.finished(reason, event.error or f"{self.worker} gave no reason"), True
        if isinstance(event, worker_pb2.WorkerEvent.Rejected):
            code = status_code_of(event.code)
            if strict and self.offset == 0:
                raise WorkerRejectedError(code, f"{self.worker} rejected the request: {event.message}")
            return self.finished(common_pb2.FINISH_REASON_ERROR, f"{self.worker} rejected the request: "
                                 f"{code.name}: {event.message}"), True
        assert isinstance(event, Lost), f"unexpected event {event!r}"
        if strict and self.offset == 0:
            raise WorkerLostError(event.message)
        return self.finished(common_pb2.FINISH_REASON_ERROR, event.message), True


async def next_events(sink: asyncio.Queue) -> list[tuple[int, object]]:
    """Wait for at least one event, take all that are waiting, merge each tag's Tokens.

    Returns (tag, event) in arrival order per tag, where Tokens become a list[int] of token ids.
    """
    items = [await sink.get()]
    while not sink.empty():
        items.append(sink.get_nowait())
    out: list[tuple[int, object]] = []
    pending: dict[int, list[int]] = {}
    for tag, event in items:
        if isinstance(event, worker_pb2.WorkerEvent.Tokens):
            if tag in pending:
                pending[tag].extend(event.token_ids)
            elif event.token_ids:
                pending[tag] = list(event.token_ids)
                out.append((tag, pending[tag]))  # extended in place by later Tokens of this tag
        else:
            pending.pop(tag, None)
            out.append((tag, event))
    return out


async def generate_one(pool: WorkerPool, model: ServedModel, prepared: Prepared,
                       received_at: float) -> AsyncIterator[Response]:
    """Run one request: chunks as tokens arrive, then exactly one Finished."""
    sink: asyncio.Queue = asyncio.Queue()
    (handle,) = pool.submit([prepared], sink)
    progress = Progress(model, prepared, handle.worker, received_at)
    try:
        while True:
            for _, event in await next_events(sink):
                response, ended = progress.on_event(event, strict=True)
                yield response
                if ended:
                    return
    finally:
        pool.release(handle)


async def generate_batch(pool: WorkerPool, model: ServedModel, items: Sequence[Prepared],
                         received_at: float) -> AsyncIterator[gateway_pb2.GenerateBatchResponse]:
    """Run all requests concurrently; responses tagged with their index, interleaved."""
    sink: asyncio.Queue = asyncio.Queue()
    handles = pool.submit(items, sink)
    progress = [Progress(model, item, h.worker, received_at) for item, h in zip(items, handles)]
    running = len(handles)
    try:
        while running:
            for tag, event in await next_events(sink):
                response, ended = progress[tag].on_event(event, strict=False)
                yield gateway_pb2.GenerateBatchResponse(index=tag, response=response)
                running -= ended
    finally:
        for handle in handles:
            pool.release(handle)
