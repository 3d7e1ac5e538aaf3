"""The worker pool: one Serve stream per member of the world it follows, requests multiplexed on them.

- `WorkerPool.apply_world` follows the coordinator's worlds: links are keyed by member identity
  (worker_id, incarnation), so a member still present keeps its stream and its requests (only
  its rank changes), a new member gets a stream, a member that is gone has its stream closed and
  its requests migrated (`gateway.migration.world_change`).
- `WorkerPool.submit` admits (the limit answers at once), waits for a live worker while none
  exists (bounded: `--recovery-wait`, never past the call's deadline), and places each request
  on the least loaded live member (`gateway.least_loaded`).
- Each worker event is converted ONCE into a `gateway.events` event and put on the queue
  ("sink") of the request it belongs to. A request whose worker lets go of it (stream broke,
  member gone, Rejected{UNAVAILABLE}) is migrated: submitted again to another live worker under a
  new worker request id with `generated_token_ids` = every token already streamed and the same
  sampling (seed included), so the client sees a pause and then the next tokens at the next
  offset. `gateway.migration.verdict` bounds it (`--max-migrations`, the call's deadline).

Events reach consumers as `(tag, event)` tuples on the sink they passed to `submit`. Each request's
`Handle` owns its token record (`generated`, counted by `Handle.tokens`): the balancer, the
generation and a migration read it, nobody counts again. A request's bookkeeping stays until the
consumer calls `release` (which sends Cancel if the request had not ended).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import grpc

from gateway import least_loaded, migration
from gateway.errors import NoWorkerError
from gateway.events import Event, Failed, Finished, Tokens, from_worker, request_id_of, worker_events
from gateway.links import WorkerLink
from gateway.migration import Key, Member
from gateway.served_model import Prepared
from moemesh.engine.sampling_wire import sampling_to_proto
from moemesh.errors import CapacityError, UnavailableError
from moemesh.retry import Backoff, retry
from moemesh.tls import TlsFiles
from moemesh.v1 import common_pb2, coordinator_pb2, worker_pb2

log = logging.getLogger(__name__)

Sink = asyncio.Queue  # of (tag, gateway.events.Event)


@dataclass(eq=False)
class Handle:
    """One request: where it runs now, where its events go, the tokens received for it (the
    request's one token count) and its migrations."""

    worker_request_id: str  # of its current submission: a new one on every migration
    tag: int
    prepared: Prepared
    sink: Sink
    deadline: float | None = None  # time.monotonic() when its call ends; None = no deadline
    link: WorkerLink | None = None  # the member running it; None while it waits for one
    generated: list[int] = field(default_factory=list)  # every token received, in order
    done: bool = False  # its last event (Finished or Failed) has been delivered, or it was released
    migrations: int = 0
    avoid: set[Key] = field(default_factory=set)  # members that let go of it in this generation

    @property
    def tokens(self) -> int:
        """Tokens received for this request so far."""
        return len(self.generated)

    @property
    def rank(self) -> int:
        """The rank of the member running it now; -1 while it waits for one."""
        return self.link.rank if self.link is not None else -1

    def deliver(self, event: Event) -> None:
        """Record `event` (tokens extend the count; Finished / Failed end it) and pass it on."""
        assert not self.done, f"event {event!r} after the end of {self.worker_request_id}"
        if isinstance(event, Tokens):
            self.generated.extend(event.ids)
        else:
            self.done = True
        self.sink.put_nowait((self.tag, event))


def submit_message(handle: Handle) -> worker_pb2.WorkerRequest:
    """The Submit for `handle`'s current submission: the original prompt and sampling (seed
    included) and, after a migration, every token already streamed (the worker resumes after them)."""
    item = handle.prepared
    return worker_pb2.WorkerRequest(submit=worker_pb2.WorkerRequest.Submit(
        request_id=handle.worker_request_id, prompt_token_ids=list(item.prompt),
        sampling=sampling_to_proto(item.params), generated_token_ids=list(handle.generated),
    ))


def members_of(world: coordinator_pb2.World) -> list[Member]:
    """A world's members as the gateway follows them (identity, rank, address)."""
    return [Member((m.worker_id, m.incarnation), m.rank, m.address) for m in world.members]


class WorkerPool:
    """The links of the world in force and the requests in flight (balanced by gateway.least_loaded)."""

    def __init__(self, max_inflight: int, call_timeout_s: float, max_migrations: int = 3,
                 recovery_wait_s: float = 30.0, tls: TlsFiles | None = None):
        self.max_inflight = max_inflight
        self.tls = tls  # mTLS to the workers (moemesh.tls), or plaintext
        self.call_timeout_s = call_timeout_s
        self.max_migrations = max_migrations
        self.recovery_wait_s = recovery_wait_s
        self.world: coordinator_pb2.World | None = None
        self.migrations = 0  # requests submitted again after their worker let go of them
        self._links: dict[Key, WorkerLink] = {}
        self._runners: dict[Key, asyncio.Task] = {}  # one per link: open, pump, reconnect
        self._waiters: set[asyncio.Task] = set()  # migrated requests waiting for a live worker
        self._closers: set[asyncio.Task] = set()  # streams of members gone, being closed
        self._handles: dict[str, Handle] = {}  # by current worker request id
        self._change = asyncio.Event()  # set (and replaced) whenever links or the world change
        self._closing = asyncio.Event()
        self._ids = itertools.count()
        self._prefix = secrets.token_hex(4)

    @property
    def inflight(self) -> int:
        """Requests submitted and not yet released (waiting ones included)."""
        return len(self._handles)

    @property
    def links(self) -> dict[int, WorkerLink]:
        """The current world's links by rank (a copy)."""
        return {link.rank: link for link in self._links.values()}

    @property
    def generation(self) -> int:
        """Generation of the world in force; 0 = none yet."""
        return self.world.generation if self.world is not None else 0

    @property
    def live_workers(self) -> int:
        """Members with an open Serve stream."""
        return sum(link.up for link in self._links.values())

    @property
    def not_serving_reason(self) -> str:
        """Empty while a request can be placed; otherwise why not, in words."""
        if self.world is None:
            return "no world formed yet (waiting for the coordinator)"
        if self.world.unservable_reason:
            return f"world {self.world.generation} cannot serve: {self.world.unservable_reason}"
        if not self.live_workers:
            return (f"no live worker stream in world {self.world.generation} "
                    f"(0 of {len(self._links)} workers reachable)")
        return ""

    def outstanding(self, ranks: Sequence[int]) -> dict[int, int]:
        """Tokens the running requests on each of `ranks` may still produce (see gateway.least_loaded)."""
        booked = (least_loaded.Booked(h.link.rank, h.prepared.params.max_new_tokens, h.tokens)
                  for h in self._handles.values() if not h.done and h.link is not None)
        return least_loaded.outstanding_by_rank(booked, ranks)

    def apply_world(self, world: coordinator_pb2.World) -> None:
        """Follow `world`: keep the streams of members still present (new rank), open streams to
        new members, close those of members that are gone and migrate their requests."""
        if self.world is not None and world.generation <= self.world.generation:
            return
        change = migration.world_change(self._links.keys(), members_of(world))
        self.world = world
        for key, rank in change.kept.items():
            self._links[key].rank = rank
        for member in change.added:
            link = WorkerLink(member, self.call_timeout_s, self.tls)
            self._links[member.key] = link
            self._runners[member.key] = asyncio.create_task(self._run(link), name=f"link-{member.key[0]}")
        for handle in self._handles.values():
            handle.avoid.clear()  # a new generation: every member may take work again
        for key in change.gone:
            self._retire(key)
        log.info("world %d: %d members (%d kept, %d new, %d gone)%s", world.generation, world.world_size,
                 len(change.kept), len(change.added), len(change.gone),
                 f"; cannot serve: {world.unservable_reason}" if world.unservable_reason else "")
        self._notify()

    async def connect(self, world: coordinator_pb2.World, stop: asyncio.Event) -> bool:
        """Follow `world` and wait until every member's stream is open; False if `stop` came first."""
        self.apply_world(world)
        return await self.until_connected(stop)

    async def until_connected(self, stop: asyncio.Event) -> bool:
        """Wait until every member of the world in force has an open stream; False if `stop` came first."""
        def connected() -> bool:
            return self.world is not None and all(link.up for link in self._links.values())

        if not await self._until(connected, None, stop):
            return False
        log.info("Serve streams open to all %d workers of world %d", len(self._links), self.generation)
        return True

    async def submit(self, items: Sequence[Prepared], sink: Sink, deadline: float | None = None) -> list[Handle]:
        """Submit every item (tag = its index) or none. CapacityError at once when over the limit;
        while no worker is live, wait for one up to `--recovery-wait` (never past `deadline`, a
        time.monotonic() value), then NoWorkerError."""
        if self.inflight + len(items) > self.max_inflight:
            raise CapacityError(
                f"gateway is full: {self.inflight} requests in flight, limit {self.max_inflight}; retry later"
            )
        handles = [Handle(self._new_id(), tag, item, sink, deadline) for tag, item in enumerate(items)]
        self._handles.update((h.worker_request_id, h) for h in handles)  # waiting ones count as in flight
        try:
            started = time.monotonic()
            until = migration.wait_until(started, deadline, self.recovery_wait_s)
            if not await self._until(lambda: bool(self._live()), until, self._closing):
                raise NoWorkerError(f"no live worker: {self.not_serving_reason or 'the gateway is stopping'}; "
                                    f"waited {time.monotonic() - started:.1f} s, retry later")
        except BaseException:
            for handle in handles:
                self.release(handle)
            raise
        self._place(handles)
        return handles

    def release(self, handle: Handle) -> None:
        """Forget the request; cancel it on its worker if it has not ended. Idempotent, never awaits."""
        if self._handles.pop(handle.worker_request_id, None) is None:
            return
        if not handle.done and handle.link is not None:
            cancel = worker_pb2.WorkerRequest.Cancel(request_id=handle.worker_request_id)
            handle.link.send(worker_pb2.WorkerRequest(cancel=cancel))
        if handle.link is None and not handle.done:
            self._notify()  # its migration stops waiting
        handle.done = True

    async def watch_serving(self) -> AsyncIterator[str]:
        """`not_serving_reason` now and every time it changes (empty = serving)."""
        last: str | None = None
        while not self._closing.is_set():
            change = self._change
            reason = self.not_serving_reason
            if reason != last:
                last = reason
                yield reason
            await change.wait()

    async def close(self) -> None:
        """Stop following and close every stream (the workers cancel what was submitted on them)."""
        self._closing.set()
        self._notify()
        for link in self._links.values():
            link.retired.set()
        tasks = [*self._runners.values(), *self._waiters]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*self._closers, *(link.close() for link in self._links.values()))

    # --- placement -------------------------------------------------------------------------------

    def _live(self, avoid: set[Key] | frozenset[Key] = frozenset()) -> dict[int, Key]:
        """rank -> member a request may be placed on now (none while the world cannot serve)."""
        if self.world is None or self.world.unservable_reason:
            return {}
        return migration.candidates({k: link.rank for k, link in self._links.items() if link.up}, avoid)

    def _place(self, handles: Sequence[Handle]) -> None:
        """Submit `handles` (same avoid set) to the least loaded live members."""
        live = self._live(handles[0].avoid)
        assert live, "placing with no live worker"
        budgets = [h.prepared.params.max_new_tokens - h.tokens for h in handles]
        for handle, rank in zip(handles, least_loaded.assign(budgets, self.outstanding(list(live)))):
            handle.link = self._links[live[rank]]
            handle.link.send(submit_message(handle))
            log.debug("request %s (%s, %d tokens already) -> %s", handle.prepared.request_id,
                      handle.worker_request_id, handle.tokens, handle.link.name)

    def _new_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    # --- migration -------------------------------------------------------------------------------

    def _let_go(self, handle: Handle, reason: str, avoid: Key | None) -> None:
        """`handle`'s worker let go of it (`reason`): migrate it, finish it, or fail it."""
        decided = migration.verdict(handle.migrations, self.max_migrations, handle.tokens,
                                    handle.prepared.params.max_new_tokens, time.monotonic(), handle.deadline)
        if isinstance(decided, migration.Complete):
            handle.deliver(Finished(common_pb2.FINISH_REASON_LENGTH))
            return
        if isinstance(decided, migration.GiveUp):
            handle.deliver(Failed(grpc.StatusCode.UNAVAILABLE, f"{reason}; {decided.why}"))
            return
        # A new worker request id: the old one may still be known where it ran (never reuse it).
        del self._handles[handle.worker_request_id]
        handle.worker_request_id, handle.link = self._new_id(), None
        self._handles[handle.worker_request_id] = handle
        handle.migrations += 1
        self.migrations += 1
        if avoid is not None:
            handle.avoid.add(avoid)
        log.info("request %s: %s; migrating it with its %d tokens (migration %d of at most %d)",
                 handle.prepared.request_id, reason, handle.tokens, handle.migrations, self.max_migrations)
        if self._live(handle.avoid):
            self._place([handle])
            return
        waiter = asyncio.create_task(self._place_when_live(handle, reason), name=f"wait-{handle.worker_request_id}")
        self._waiters.add(waiter)
        waiter.add_done_callback(self._waiters.discard)

    async def _place_when_live(self, handle: Handle, reason: str) -> None:
        """Wait (bounded) for a live member that may take `handle`, then place it; else fail it."""
        started = time.monotonic()
        until = migration.wait_until(started, handle.deadline, self.recovery_wait_s)
        placeable = await self._until(lambda: handle.done or bool(self._live(handle.avoid)), until, self._closing)
        if handle.done or self._closing.is_set():
            return
        if placeable:
            self._place([handle])
            return
        why = self.not_serving_reason or "every live worker let go of it"
        handle.deliver(Failed(grpc.StatusCode.UNAVAILABLE, f"{reason}; no worker took it within "
                                                           f"{time.monotonic() - started:.1f} s: {why}"))

    # --- links -----------------------------------------------------------------------------------

    def _retire(self, key: Key) -> None:
        """The member left the world: close its stream, migrate its requests."""
        link = self._links.pop(key)
        link.retired.set()
        link.up = False
        runner = self._runners.pop(key)
        runner.cancel()

        async def closed() -> None:
            await asyncio.gather(runner, return_exceptions=True)
            await link.close()

        closer = asyncio.create_task(closed(), name=f"close-{key[0]}")
        self._closers.add(closer)
        closer.add_done_callback(self._closers.discard)
        self._orphaned(link, f"{link.name} left the world (generation {self.generation})")

    async def _run(self, link: WorkerLink) -> None:
        """Open the link (retrying), route its events; on a break migrate its requests and reopen;
        until the member leaves the world or the pool closes."""
        while not link.retired.is_set():
            if not await self._open_until_up(link):
                return
            self._notify()
            reason = f"{link.name}: Serve stream ended"
            try:
                async for event in link.events():
                    self._dispatch(link, event)
            except UnavailableError as exc:
                reason = str(exc)
            await link.close()
            self._notify()
            log.warning("%s; migrating its requests, reconnecting", reason)
            self._orphaned(link, reason)

    async def _open_until_up(self, link: WorkerLink) -> bool:
        """Open `link`, retrying while its worker is unavailable; False once it is retired first."""

        async def attempt() -> bool:
            await link.open()
            return True

        def note(attempt: int, exc: Exception) -> None:
            if attempt == 1 or attempt % 10 == 0:
                log.info("%s (attempt %d; retrying)", exc, attempt)

        opened = await retry(attempt, lambda exc: isinstance(exc, UnavailableError), stop=link.retired,
                             backoff=Backoff(first_s=0.2, cap_s=5.0), on_retry=note)
        if opened and link.retired.is_set():  # retired while the last attempt was connecting
            await link.close()
            return False
        return bool(opened)

    def _dispatch(self, link: WorkerLink, message: worker_pb2.WorkerEvent) -> None:
        """The edge: each single event of `message`, converted once, to the request it is for; a
        Rejected{UNAVAILABLE} (the worker lets go of it, whatever it streamed) migrates it."""
        for single in worker_events(message):
            handle = self._handles.get(request_id_of(single))
            if handle is None or handle.link is not link or handle.done:
                continue  # released already (cancelled by the client), migrated, or a stale id
            event = from_worker(single, handle.tokens, link.name)
            if isinstance(event, Failed) and event.code == grpc.StatusCode.UNAVAILABLE:
                self._let_go(handle, event.message, avoid=link.key)
            else:
                handle.deliver(event)

    def _orphaned(self, link: WorkerLink, reason: str) -> None:
        """Requests whose worker stream broke or whose member left: each is migrated (or fails)."""
        for handle in [h for h in self._handles.values() if h.link is link and not h.done]:
            self._let_go(handle, reason, avoid=None)

    # --- changes ---------------------------------------------------------------------------------

    def _notify(self) -> None:
        """Wake everything waiting for a change of links or world."""
        self._change.set()
        self._change = asyncio.Event()

    async def _until(self, condition: Callable[[], bool], until: float | None, stop: asyncio.Event) -> bool:
        """Wait until `condition()` holds (True), or until `until` (time.monotonic()) or `stop` (False)."""
        while not condition():
            left = None if until is None else until - time.monotonic()
            if stop.is_set() or (left is not None and left <= 0):
                return False
            change = self._change
            waits = [asyncio.ensure_future(change.wait()), asyncio.ensure_future(stop.wait())]
            try:
                await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in waits:
                    task.cancel()
        return True
