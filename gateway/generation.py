"""Turning a request's pool events (gateway.events) into Generate / GenerateBatch responses.

A request's events arrive on a sink (see gateway.workers). Tokens already waiting when the
gateway gets to them are coalesced into one TokenChunk, so a slow client receives fewer, larger
chunks instead of falling behind. Bookkeeping is freed in `finally`, which also runs when the
handler is cancelled (client gone, deadline passed): `WorkerPool.release` then sends Cancel.

Failure semantics (gateway.proto), decided only in `Progress.failed`: a Failed event (the worker
rejected the request, or its worker let go of it and it could not be migrated) before any token
fails a Generate call with the event's status code; after tokens were streamed, and always inside
a batch (where other prompts keep going), it ends that generation with
Finished{FINISH_REASON_ERROR, error}. A failure of the gateway's own detokenizing ends only its
request the same way (`Progress.undecodable`); the worker is told to cancel it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

from gateway.errors import WorkerFailedError
from gateway.events import Event, Failed, Finished, Tokens
from gateway.metrics import GatewayMetrics, finished_reason
from gateway.served_model import Prepared, ServedModel
from gateway.workers import Handle, WorkerPool
from moemesh.engine.sampling_wire import logprob_to_proto
from moemesh.v1 import common_pb2, gateway_pb2

Response = gateway_pb2.GenerateResponse


class Progress:
    """One prompt's response state: text decoding and timing; token counts are the handle's.
    `metrics` (optional) hears of the request once it is placed, of each chunk and of its end."""

    def __init__(self, model: ServedModel, handle: Handle, received_at: float, metrics: GatewayMetrics | None = None):
        self.handle = handle
        self.prepared: Prepared = handle.prepared
        self.received_at = received_at
        self.decoder = model.decoder() if self.prepared.include_text else None
        self.first_token_at: float | None = None
        self.last_chunk_at = received_at
        self.metrics = metrics
        self.ended = False  # its end was counted (by finished, failed or abandoned)
        if metrics is not None:
            metrics.placed(len(self.prepared.prompt))

    def on_event(self, event: Event, strict: bool) -> tuple[Response, bool]:
        """(response, ended) for one coalesced event; `strict`: see `failed`."""
        match event:
            case Tokens():
                try:
                    return self.chunk(event), False
                except Exception as exc:  # its text could not be made: this request alone ends
                    return self.undecodable(event, exc), True
            case Finished(reason=reason, error=error):
                return self.finished(reason, error), True
            case Failed():
                return self.failed(event, strict), True
        raise AssertionError(f"unexpected event {event!r}")

    def chunk(self, tokens: Tokens) -> Response:
        """A TokenChunk for `tokens`, with their text when asked for."""
        text = self.decoder.push(list(tokens.ids)) if self.decoder is not None else ""
        now = time.monotonic()
        if self.metrics is not None:
            self.metrics.streamed(len(tokens.ids), now - self.last_chunk_at, first=self.first_token_at is None)
        self.last_chunk_at = now
        if self.first_token_at is None:
            self.first_token_at = now
        return Response(chunk=Response.TokenChunk(
            token_ids=tokens.ids, text=text, offset=tokens.offset,
            logprobs=[logprob_to_proto(lp) for lp in tokens.logprobs],
            prompt_logprobs=[logprob_to_proto(lp) for lp in tokens.prompt_logprobs]))

    def undecodable(self, tokens: Tokens, exc: Exception) -> Response:
        """Finished{ERROR} for a chunk whose text could not be decoded (its tokens are not sent)."""
        return self.finished(common_pb2.FINISH_REASON_ERROR,
                             f"the gateway could not decode tokens {list(tokens.ids)} to text: "
                             f"{type(exc).__name__}: {exc}", unsent=len(tokens.ids))

    def failed(self, event: Failed, strict: bool) -> Response:
        """THE failure rule. `strict` (a single Generate) and no token yet: raise, so the call fails
        with the event's status code; otherwise end this generation with Finished{ERROR}."""
        if strict and self.handle.tokens == 0:
            self._count_end("error", 0)
            raise WorkerFailedError(event.code, event.message)
        return self.finished(common_pb2.FINISH_REASON_ERROR, f"{event.code.name}: {event.message}")

    def finished(self, reason: common_pb2.FinishReason.ValueType, error: str = "", unsent: int = 0) -> Response:
        """The final message; counts and timings are the gateway's own (the handle's count: every
        token the pool delivered before the end, so every token streamed, less `unsent`)."""
        now = time.monotonic()
        ttft = self.first_token_at - self.received_at if self.first_token_at is not None else 0.0
        msg = Response.Finished(
            reason=reason, prompt_tokens=len(self.prepared.prompt), completion_tokens=self.handle.tokens - unsent,
            ttft_seconds=ttft, latency_seconds=now - self.received_at, request_id=self.prepared.request_id,
            error=error if reason == common_pb2.FINISH_REASON_ERROR else "",
        )
        self._count_end(finished_reason(reason), msg.completion_tokens, now)
        return Response(finished=msg)

    def abandoned(self) -> None:
        """The call ended before its Finished (the client went away, its deadline passed)."""
        self._count_end("cancelled", self.handle.tokens)

    def _count_end(self, reason: str, generated: int, now: float | None = None) -> None:
        if self.metrics is not None and not self.ended:
            now = time.monotonic() if now is None else now
            self.metrics.ended(reason, now - self.received_at, generated)
        self.ended = True


def coalesce(items: Sequence[tuple[int, Event]]) -> list[tuple[int, Event]]:
    """Merge each tag's consecutive Tokens into its first one (keeping that one's offset); other
    events and the order per tag are kept. Pure."""
    out: list[tuple[int, Event]] = []
    open_at: dict[int, int] = {}  # tag -> index in `out` of its Tokens that takes more ids
    more: dict[int, list[Tokens]] = {}  # index in `out` -> Tokens merged into that one
    for tag, event in items:
        at = open_at.get(tag)
        if isinstance(event, Tokens) and at is not None:
            more.setdefault(at, []).append(event)
            continue
        if isinstance(event, Tokens):
            open_at[tag] = len(out)
        else:
            open_at.pop(tag, None)
        out.append((tag, event))
    for at, rest in more.items():
        tag, first = out[at]
        assert isinstance(first, Tokens)
        out[at] = (tag, Tokens(first.ids + tuple(i for t in rest for i in t.ids), first.offset,
                               first.logprobs + tuple(lp for t in rest for lp in t.logprobs),
                               first.prompt_logprobs + tuple(lp for t in rest for lp in t.prompt_logprobs)))
    return out


async def next_events(sink: asyncio.Queue) -> list[tuple[int, Event]]:
    """Wait for at least one event, take all that are waiting, coalesce them."""
    items = [await sink.get()]
    while not sink.empty():
        items.append(sink.get_nowait())
    return coalesce(items)


async def generate_one(pool: WorkerPool, model: ServedModel, prepared: Prepared, received_at: float,
                       deadline: float | None = None, metrics: GatewayMetrics | None = None
                       ) -> AsyncIterator[Response]:
    """Run one request: chunks as tokens arrive, then exactly one Finished. `deadline`: when the
    call ends (time.monotonic()), bounding any wait for a worker and every migration."""
    sink: asyncio.Queue = asyncio.Queue()
    (handle,) = await pool.submit([prepared], sink, deadline)
    progress = Progress(model, handle, received_at, metrics)
    try:
        while True:
            for _, event in await next_events(sink):
                response, ended = progress.on_event(event, strict=True)
                yield response
                if ended:
                    return
    finally:
        progress.abandoned()
        pool.release(handle)


async def generate_batch(pool: WorkerPool, model: ServedModel, items: Sequence[Prepared], received_at: float,
                         deadline: float | None = None, metrics: GatewayMetrics | None = None
                         ) -> AsyncIterator[gateway_pb2.GenerateBatchResponse]:
    """Run all requests concurrently; responses tagged with their index, interleaved."""
    sink: asyncio.Queue = asyncio.Queue()
    handles = await pool.submit(items, sink, deadline)
    progress = [Progress(model, h, received_at, metrics) for h in handles]
    over: set[int] = set()  # tags that ended (a gateway-side failure ends one before its worker does)
    try:
        while len(over) < len(handles):
            for tag, event in await next_events(sink):
                if tag in over:
                    continue
                response, ended = progress[tag].on_event(event, strict=False)
                yield gateway_pb2.GenerateBatchResponse(index=tag, response=response)
                if ended:
                    over.add(tag)
                    pool.release(handles[tag])
    finally:
        for handle, each in zip(handles, progress):
            each.abandoned()
            pool.release(handle)
