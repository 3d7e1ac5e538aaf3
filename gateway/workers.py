"""The worker-stream pool: one long-lived Worker.Serve stream per worker, requests multiplexed on it.

- `WorkerLink` is one worker's transport: channel, Serve call, a writer task draining an outbox
  (so sending a Submit or Cancel never awaits, and works from a `finally` during cancellation).
- `WorkerPool` submits requests (admission limit, least-loaded worker from `gateway.least_loaded`),
  converts each worker event ONCE into a `gateway.events` event and puts it on the queue ("sink")
  of the request it belongs to, and handles a broken stream: every request on it gets
  `Failed(UNAVAILABLE)`, the link reconnects with backoff.

Events reach consumers as `(tag, event)` tuples on the sink they passed to `submit`. Each request's
`Handle` owns its token record (`generated`, counted by `Handle.tokens`): the balancer, the
generation and a future re-submission read it, nobody counts again. A request's bookkeeping stays
until the consumer calls `release` (which sends Cancel if the request had not ended).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from gateway import least_loaded
from gateway.errors import NoWorkerError
from gateway.events import (
    Event,
    Failed,
    Tokens,
    from_worker,
    lost,
    request_id_of,
    worker_events,
)
from gateway.served_model import Prepared
from moemesh import rpc
from moemesh.engine.sampling_wire import sampling_to_proto
from moemesh.errors import CapacityError, UnavailableError
from moemesh.retry import Backoff, retry
from moemesh.v1 import coordinator_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

Sink = asyncio.Queue  # of (tag, gateway.events.Event)


@dataclass(eq=False)
class Handle:
    """One submitted request: its worker-side id, where it runs, where its events go, and the
    tokens received for it (the request's one token count)."""

    worker_request_id: str
    tag: int
    rank: int
    worker: str  # the worker's name, for messages
    prepared: Prepared
    sink: Sink
    generated: list[int] = field(default_factory=list)  # every token received, in order
    done: bool = False  # its last event (Finished or Failed) has been delivered, or it was released

    @property
    def tokens(self) -> int:
        """Tokens received for this request so far."""
        return len(self.generated)

    def deliver(self, event: Event) -> None:
        """Record `event` (tokens extend the count; Finished / Failed end it) and pass it on."""
        assert not self.done, f"event {event!r} after the end of {self.worker_request_id}"
        if isinstance(event, Tokens):
            self.generated.extend(event.ids)
        else:
            self.done = True
        self.sink.put_nowait((self.tag, event))


class WorkerLink:
    """One worker's Serve stream. `open()` connects; `events()` yields what the worker sends."""

    def __init__(self, member: coordinator_pb2.WorldMember, call_timeout_s: float):
        self.rank = member.rank
        self.address = member.address
        self.name = f"worker rank {member.rank} ({member.worker_id or '?'} at {member.address})"
        self.call_timeout_s = call_timeout_s
        self.up = False
        self._channel: grpc.aio.Channel | None = None
        self._call = None
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._writer: asyncio.Task | None = None

    async def open(self) -> None:
        """Connect and open the Serve stream; UnavailableError if the worker cannot be reached."""
        channel = rpc.channel(self.address)
        try:
            await asyncio.wait_for(channel.channel_ready(), timeout=self.call_timeout_s)
            stub = worker_pb2_grpc.WorkerStub(channel)
            await stub.Status(worker_pb2.StatusRequest(), timeout=self.call_timeout_s)
            # The Serve stream lives as long as the gateway, so it has no deadline: a dead peer is
            # noticed by the stream failing (HTTP/2 keepalive is on in rpc.CHANNEL_OPTIONS).
            call = stub.Serve()
        except (TimeoutError, grpc.aio.AioRpcError) as exc:
            await channel.close()
            raise UnavailableError(f"cannot reach {self.name}: {_describe(exc)}") from exc
        self._channel, self._call = channel, call
        self._outbox = asyncio.Queue()
        self._writer = asyncio.create_task(self._write(call, self._outbox), name=f"write-{self.rank}")
        self.up = True

    def send(self, message: worker_pb2.WorkerRequest) -> None:
        """Queue a message for the worker (never blocks); dropped if the stream is down."""
        if self.up:
            self._outbox.put_nowait(message)

    async def events(self):
        """Yield WorkerEvents; when the stream ends or breaks, raise UnavailableError saying why."""
        try:
            async for event in self._call:
                yield event
        except grpc.aio.AioRpcError as exc:
            raise UnavailableError(f"{self.name}: Serve stream broke: {_describe(exc)}") from exc
        raise UnavailableError(f"{self.name}: the worker ended its Serve stream")

    async def close(self) -> None:
        """Stop the stream (the worker cancels everything submitted on it) and the channel."""
        self.up = False
        if self._writer is not None:
            self._writer.cancel()
        if self._call is not None:
            self._call.cancel()
        if self._channel is not None:
            await self._channel.close()
        self._writer = self._call = self._channel = None

    async def _write(self, call, outbox: asyncio.Queue) -> None:
        while True:
            message = await outbox.get()
            try:
                await call.write(message)
            except Exception as exc:
                log.debug("%s: write failed: %s", self.name, exc)
                return


class WorkerPool:
    """All worker links of the current world and the requests in flight (balanced by gateway.least_loaded)."""

    def __init__(self, max_inflight: int, call_timeout_s: float):
        self.max_inflight = max_inflight
        self.call_timeout_s = call_timeout_s
        self.world: coordinator_pb2.World | None = None
        self._links: dict[int, WorkerLink] = {}
        self._handles: dict[str, Handle] = {}
        self._pumps: list[asyncio.Task] = []
        self._closing = asyncio.Event()
        self._ids = itertools.count()
        self._prefix = secrets.token_hex(4)

    @property
    def inflight(self) -> int:
        """Requests submitted and not yet released."""
        return len(self._handles)

    @property
    def links(self) -> dict[int, WorkerLink]:
        """The current world's links by rank (a copy)."""
        return dict(self._links)

    def outstanding(self, ranks: Sequence[int]) -> dict[int, int]:
        """Tokens the running requests on each of `ranks` may still produce (see gateway.least_loaded)."""
        booked = (least_loaded.Booked(h.rank, h.prepared.params.max_new_tokens, h.tokens)
                  for h in self._handles.values() if not h.done)
        return least_loaded.outstanding_by_rank(booked, ranks)

    async def connect(self, world: coordinator_pb2.World, stop: asyncio.Event) -> bool:
        """Open a stream to every member of `world`, retrying each; False if `stop` came first."""
        self.world = world
        self._links = {m.rank: WorkerLink(m, self.call_timeout_s) for m in world.members}
        opened = await asyncio.gather(*(self._open_until_up(link, stop) for link in self._links.values()))
        if not all(opened):
            return False
        self._pumps = [asyncio.create_task(self._pump(link), name=f"pump-{link.rank}") for link in self._links.values()]
        log.info("Serve streams open to all %d workers", len(self._links))
        return True

    def submit(self, items: Sequence[Prepared], sink: Sink) -> list[Handle]:
        """Submit every item (tag = its index) or none: CapacityError / NoWorkerError otherwise."""
        if self.inflight + len(items) > self.max_inflight:
            raise CapacityError(
                f"gateway is full: {self.inflight} requests in flight, limit {self.max_inflight}; retry later"
            )
        ranks = [rank for rank, link in self._links.items() if link.up]
        if not ranks:
            raise NoWorkerError(f"no worker stream is open ({len(self._links)} workers known); retry later")
        placed = least_loaded.assign([item.params.max_new_tokens for item in items], self.outstanding(ranks))
        return [self._submit_one(tag, item, sink, rank) for tag, (item, rank) in enumerate(zip(items, placed))]

    def release(self, handle: Handle) -> None:
        """Forget the request; cancel it on its worker if it has not ended. Idempotent, never awaits."""
        if self._handles.pop(handle.worker_request_id, None) is None:
            return
        link = self._links.get(handle.rank)
        if not handle.done and link is not None:
            cancel = worker_pb2.WorkerRequest.Cancel(request_id=handle.worker_request_id)
            link.send(worker_pb2.WorkerRequest(cancel=cancel))
        handle.done = True

    async def close(self) -> None:
        """Stop pumping and close every stream (the workers cancel what was submitted on them)."""
        self._closing.set()
        for task in self._pumps:
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        await asyncio.gather(*(link.close() for link in self._links.values()))

    def _submit_one(self, tag: int, item: Prepared, sink: Sink, rank: int) -> Handle:
        link = self._links[rank]
        handle = Handle(f"{self._prefix}-{next(self._ids)}", tag, rank, link.name, item, sink)
        self._handles[handle.worker_request_id] = handle
        submit = worker_pb2.WorkerRequest.Submit(
            request_id=handle.worker_request_id, prompt_token_ids=list(item.prompt),
            sampling=sampling_to_proto(item.params),
        )
        link.send(worker_pb2.WorkerRequest(submit=submit))
        log.debug("request %s (%s) -> %s", item.request_id, handle.worker_request_id, link.name)
        return handle

    async def _open_until_up(self, link: WorkerLink, stop: asyncio.Event) -> bool:
        """Open `link`, retrying while its worker is unavailable; False if `stop` or close() came first."""

        async def attempt() -> bool:
            if self._closing.is_set():
                return False
            await link.open()
            return True

        def note(attempt: int, exc: Exception) -> None:
            if attempt == 1 or attempt % 10 == 0:
                log.info("%s (attempt %d; retrying)", exc, attempt)

        opened = await retry(attempt, lambda exc: isinstance(exc, UnavailableError), stop=stop,
                             backoff=Backoff(first_s=0.2, cap_s=5.0), on_retry=note)
        return bool(opened)

    async def _pump(self, link: WorkerLink) -> None:
        """Route the link's events to their requests; on a break fail them and reconnect."""
        while not self._closing.is_set():
            reason = f"{link.name}: Serve stream ended"
            try:
                async for event in link.events():
                    self._dispatch(link, event)
            except UnavailableError as exc:
                reason = str(exc)
            await link.close()
            log.warning("%s; its requests fail, reconnecting", reason)
            self._orphaned(link, reason)
            if not await self._open_until_up(link, self._closing):
                return
            log.info("%s: Serve stream re-opened", link.name)

    def _dispatch(self, link: WorkerLink, message: worker_pb2.WorkerEvent) -> None:
        """The edge: each single event of `message`, converted once, to the request it is for."""
        for single in worker_events(message):
            handle = self._handles.get(request_id_of(single))
            if handle is None or handle.rank != link.rank or handle.done:
                continue  # released already (cancelled by the client) or a stale id
            handle.deliver(from_worker(single, handle.tokens, link.name))

    def _orphaned(self, link: WorkerLink, reason: str) -> None:
        """Requests whose worker stream broke. Hook for re-submission (a later issue): submit each
        to a surviving worker with `generated_token_ids=handle.generated`; for now they fail."""
        event: Failed = lost(reason)
        for handle in [h for h in self._handles.values() if h.rank == link.rank and not h.done]:
            handle.deliver(event)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
