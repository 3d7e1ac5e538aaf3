"""The worker's engine thread: owns the engine and runs the lockstep protocol with its peers.

Everything that touches the engine or a collective happens on this one thread; the asyncio side
talks to it only through `submit`, `offer_epoch`, `newer_world`, `offer_world` and `request_stop`
(thread-safe), and hears back through the `on_events` and `on_world_lost` callbacks (called on
this thread; the server hops to its loop).

Worlds. The thread serves one world generation at a time (`_serve_world`) and outlives it: when
a collective breaks (a peer died, stalled or left: CollectiveError) or some rank leaves at a step
header, the thread leaves the world, keeps every request it holds (sequences, KV caches, sampling
positions), goes on taking submits and cancels, and waits for the next generation, which the
asyncio side prepares (placement loaded, communicator joined) and offers (`offer_world`). A step
that broke midway is simply run again in the next world: nothing of it was committed (tokens are
appended only after a whole forward pass; the KV rows it wrote are written again).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from moemesh.engine.batch import StepBatch
from moemesh.engine.engine import Engine, FinishReason, TokenEvent
from moemesh.engine.sampling import SamplingParams
from moemesh.errors import CollectiveError, MoemeshError, UnavailableError
from moemesh.mesh.lockstep import HeaderCollective, StepHeader, Waker, exchange_header
from moemesh.mesh.placement import Placement
from moemesh.mesh.routing_counts import LoadRecorder, LoadSample, LoadTotals
from moemesh.mesh.transport import AllToAllTransport, Collective
from moemesh.model.weights import LayerExperts

log = logging.getLogger(__name__)

BETWEEN_WORLDS_POLL_S = 0.1  # between worlds only: how often the thread looks at its inbox and stop flag


@dataclass(frozen=True)
class Submit:
    request_id: str
    prompt: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class Cancel:
    request_id: str


@dataclass(frozen=True)
class Rejected:
    request_id: str
    error: MoemeshError


@dataclass(frozen=True)
class PreparedEpoch:
    """A placement whose experts are loaded and ready to switch to."""

    placement: Placement
    layers: dict[int, LayerExperts]


Event = TokenEvent | Rejected


class StepCollective(HeaderCollective, Collective, Protocol):
    """What the engine thread needs of its collective: the step header, the exchanges, the counters."""

    seconds: float  # wall time blocked on collectives
    exchange_seconds: float  # all_to_all exchanges in flight, summed
    hidden_seconds: float  # the part of exchange_seconds overlapped with compute
    bytes_to: list[int]  # bytes sent to each rank (index), padding included: what crosses the network

    def close(self) -> None: ...


@dataclass(frozen=True)
class World:
    """One world generation, ready for the engine thread: its collective (joined), the waker of
    its idle rounds, and its first placement epoch (loaded)."""

    generation: int
    collective: StepCollective
    waker: Waker
    first: PreparedEpoch


class MeshRunner:
    """`epoch`: the placement epoch the engine's MoE layer was built for, in world `generation`.
    `recorder`: the load recorder the model's MoE layer and transport feed; its window goes to
    `on_load` every `report_every_tokens` routed tokens. `on_world_lost(generation, reason)` is
    called when a collective of that generation broke."""

    def __init__(
        self,
        engine: Engine,
        collective: StepCollective,
        waker: Waker,
        epoch: int,
        on_events: Callable[[list[Event]], None],
        on_load: Callable[[LoadSample], None] | None = None,
        recorder: LoadRecorder | None = None,
        report_every_tokens: int = 100,
        generation: int = 1,
        on_world_lost: Callable[[int, str], None] | None = None,
    ):
        self.engine = engine
        self.recorder = recorder
        self.collective = collective
        self.waker = waker
        self.generation = generation  # the world generation this thread serves (or last served)
        self.idle_round = 0  # idle headers seen so far in this world: the same count on every rank
        self.on_events = on_events
        self.on_load = on_load
        self.on_world_lost = on_world_lost
        self.report_every = report_every_tokens
        self.epoch = epoch
        self.switches: list[tuple[int, int]] = []  # (epoch, steps executed before it): the same on every rank
        self.worlds_lost = 0  # worlds this thread left because a collective broke
        self._prepared: dict[int, PreparedEpoch] = {}
        self._loaded_epoch = self.epoch
        self._newest_generation = generation  # the newest world generation the asyncio side knows of
        self._worlds: queue.SimpleQueue[World] = queue.SimpleQueue()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._draining = threading.Event()
        self._lock = threading.Lock()
        self.steps = 0
        self.step_seconds = 0.0  # wall time of executed steps, header exchange included
        self.collective_seconds = 0.0  # the part of step_seconds spent in collectives
        self.exchange_seconds = 0.0  # dispatch/combine exchanges in flight, summed over exchanges
        self.hidden_seconds = 0.0  # the part of exchange_seconds overlapped with compute (not in wait())
        self._exchanges_seen = (0.0, 0.0)  # the collective's (exchange, hidden) counters when last read
        self.bytes_sent: dict[tuple[int, int], int] = {}  # (src rank, dst rank) of their world -> bytes, all worlds
        self._bytes_seen = list(collective.bytes_to)  # the collective's bytes_to when last read
        self.tokens = 0
        self.load_totals: LoadTotals | None = None  # the recorder's totals after the last executed step (metrics)
        self.failure: BaseException | None = None
        self._finished = False

    # ---- called from any thread ----------------------------------------------------------------
    def submit(self, item: Submit | Cancel) -> None:
        """Hand a request (or a cancel) to the engine thread. Once the thread has ended, a Submit
        is answered at once with Rejected(UNAVAILABLE): nothing may wait in a dead inbox."""
        with self._lock:
            accepted = not self._finished
            if accepted:
                self._inbox.put(item)
        if accepted:
            self.waker.wake(self.idle_round)
        elif isinstance(item, Submit):
            self.on_events([Rejected(item.request_id, UnavailableError(
                f"worker rank {self.collective.rank} has stopped"))])

    def offer_epoch(self, prepared: PreparedEpoch, generation: int) -> bool:
        """A newer placement of world `generation` is loaded; the mesh switches once every rank has
        it. False (and ignored) when this thread is not in that world (any more)."""
        with self._lock:
            if generation != self.generation or prepared.placement.epoch <= self._loaded_epoch:
                return False
            self._prepared[prepared.placement.epoch] = prepared
            self._loaded_epoch = prepared.placement.epoch
        self.waker.wake(self.idle_round)
        return True

    def newer_world(self, generation: int) -> None:
        """The coordinator has formed world `generation`: leave the current one at the next step
        header (or give up a collective that waits for peers that already left)."""
        with self._lock:
            self._newest_generation = max(self._newest_generation, generation)
        self.waker.wake(self.idle_round)

    def offer_world(self, world: World) -> None:
        """The next generation, joined and loaded: the thread enters it once it left its world."""
        self.newer_world(world.generation)
        self._worlds.put(world)

    def abandoned(self, generation: int) -> bool:
        """True once a world newer than `generation` exists, or this rank is stopping: its
        collectives stop waiting for peers."""
        with self._lock:
            return self._newest_generation > generation or self._stop.is_set()

    def request_stop(self) -> None:
        self._stop.set()
        self.waker.wake(self.idle_round)

    def stop_accepting(self) -> None:
        """This worker is leaving: refuse new requests (they go elsewhere), keep stepping the rest."""
        self._draining.set()

    @property
    def accepting(self) -> bool:
        """False once the engine thread is leaving, stopping or has failed: new requests would
        hang. True between worlds: requests wait for the next one."""
        return not (self._stop.is_set() or self._draining.is_set()) and self.failure is None and not self._finished

    @property
    def loaded_epoch(self) -> int:
        with self._lock:
            return self._loaded_epoch

    # ---- the engine thread -----------------------------------------------------------------------
    def run(self) -> None:
        try:
            device = torch.device(self.engine.model.runtime.device)
            if device.type == "cuda":
                torch.cuda.set_device(device)  # the current device is per thread: this one runs the model
            while self._serve_world():
                world = self._await_world()
                if world is None:
                    break
                self._enter(world)
        except BaseException as exc:  # a bug or a broken invariant (not a lost peer): this worker ends
            self.failure = exc
            log.exception("engine thread stopped")
        finally:
            with self._lock:  # from here on `submit` answers by itself; what came before is drained below
                self._finished = True
            self._fail_everything()

    def _serve_world(self) -> bool:
        """Step in the current world until some rank leaves it or a collective breaks; True when
        this rank goes on to the next generation, False when it stops."""
        try:
            while True:
                self._drain_inbox()
                batch = self.engine.schedule()
                reported = self.loaded_epoch
                started, in_collectives = time.perf_counter(), self.collective.seconds
                leaving = self._leaving()
                header = exchange_header(self.collective, batch.tokens_per_micro, reported, leaving)
                if header.leave:
                    if not leaving and self.on_world_lost is not None:  # a peer left: make sure the coordinator knows
                        self.on_world_lost(self.generation, "a peer left the world at a step header")
                    break
                self._maybe_switch(header)
                if header.idle:
                    self._count_exchanges()  # the header's bytes
                    self._idle(reported)
                    continue
                self._step(header, batch)
                self.step_seconds += time.perf_counter() - started
                self.collective_seconds += self.collective.seconds - in_collectives
                self._count_exchanges()
        except CollectiveError as exc:  # a peer died, stalled or left: this world is over, the requests stay
            self.worlds_lost += 1
            log.warning("rank %d: world generation %d broke: %s", self.collective.rank, self.generation, exc)
            if self.on_world_lost is not None:
                self.on_world_lost(self.generation, str(exc))
        self.collective.close()
        return not self._stop.is_set()

    def _leaving(self) -> bool:
        return self.abandoned(self.generation)

    def _await_world(self) -> World | None:
        """Between worlds: keep taking submits and cancels (requests wait), return the next
        generation once it is offered; None if this rank is asked to stop first."""
        while not self._stop.is_set():
            self._drain_inbox()
            try:
                world = self._worlds.get(timeout=BETWEEN_WORLDS_POLL_S)
            except queue.Empty:
                continue
            if world.generation > self.generation:
                return world
            world.collective.close()  # an offer overtaken by a newer one
        return None

    def _enter(self, world: World) -> None:
        """Switch every world-dependent piece at once: collective, waker, transport, experts and
        routing tables, load recorder, epoch bookkeeping."""
        first = world.first
        with self._lock:
            self.generation = world.generation
            self._prepared = {}
            self._loaded_epoch = first.placement.epoch
        self.collective, self.waker, self.idle_round = world.collective, world.waker, 0
        self._exchanges_seen = (world.collective.exchange_seconds, world.collective.hidden_seconds)
        self._bytes_seen = list(world.collective.bytes_to)
        moe = self.engine.model.moe
        assert isinstance(moe.transport, AllToAllTransport), "a mesh rank runs the all-to-all transport"
        moe.transport.rejoin(world.collective)
        moe.apply_epoch(first.placement, first.layers)
        if self.recorder is not None:
            self.recorder.resize(first.placement.world_size)
        self.epoch = first.placement.epoch
        self.switches.append((self.epoch, self.steps))
        log.info("rank %d of %d: entered world generation %d at placement epoch %d with %d requests",
                 world.collective.rank, world.collective.world_size, world.generation, self.epoch,
                 len(self.engine.request_ids()))

    def _count_exchanges(self) -> None:
        """Add the exchange seconds the collective counted since the last call, in seconds. NCCL
        reads its timing events at the next step header, so its share of a step arrives a step
        late; reading deltas after every executed step loses none of it."""
        seen_exchange, seen_hidden = self._exchanges_seen
        now = (self.collective.exchange_seconds, self.collective.hidden_seconds)
        self.exchange_seconds += now[0] - seen_exchange
        self.hidden_seconds += now[1] - seen_hidden
        self._exchanges_seen = now
        rank = self.collective.rank
        for dst, (n, seen) in enumerate(zip(self.collective.bytes_to, self._bytes_seen)):
            if n != seen:
                self.bytes_sent[(rank, dst)] = self.bytes_sent.get((rank, dst), 0) + n - seen
        self._bytes_seen = list(self.collective.bytes_to)

    def _idle(self, reported_epoch: int) -> None:
        """Sleep until some rank has something to do (see Waker); never poll."""
        self.idle_round += 1  # before the checks: a waker that comes after them wakes this round
        if (not self._inbox.empty() or self._leaving() or self.loaded_epoch > reported_epoch):
            self.waker.wake(self.idle_round)  # ours: end this round for every rank at once
        else:
            self.waker.wait(self.idle_round)

    def _step(self, header: StepHeader, batch: StepBatch) -> None:
        events = self.engine.execute(batch, header.max_tokens)
        self.steps += 1
        self.tokens += batch.num_tokens
        if self.recorder is not None:  # one small read-back per step, after the step's own; before its events go
            # out, so a client that saw its last token finds that step counted (metrics read it)
            self.load_totals = dataclasses.replace(self.recorder.totals(), generation=self.generation,
                                                   rank=self.collective.rank)
        if events:
            self.on_events(list(events))
        if self.on_load is not None and self.recorder is not None and self.recorder.tokens >= self.report_every:
            # Stamped here, on the engine thread: by the time the report is sent the world may have changed.
            self.on_load(dataclasses.replace(self.recorder.take(), generation=self.generation, epoch=self.epoch,
                                             rank=self.collective.rank))

    def _drain_inbox(self) -> None:
        events: list[Event] = []
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Cancel):
                if self.engine.cancel(item.request_id):
                    events.append(TokenEvent(item.request_id, None, FinishReason.CANCELLED))
                continue
            try:
                self.engine.add_request(item.request_id, item.prompt, item.params)
            except MoemeshError as exc:
                events.append(Rejected(item.request_id, exc))
        if events:
            self.on_events(events)

    def _maybe_switch(self, header: StepHeader) -> None:
        if header.epoch <= self.epoch:
            return
        with self._lock:
            prepared = self._prepared[header.epoch]
            for old in [e for e in self._prepared if e <= header.epoch]:
                del self._prepared[old]
        self.engine.model.moe.apply_epoch(prepared.placement, prepared.layers)
        if self.recorder is not None:
            self.recorder.reset()  # a load window never straddles two placements
        log.info("switched to placement epoch %d at step %d", header.epoch, self.steps)
        self.switches.append((header.epoch, self.steps))
        self.epoch = header.epoch

    def _fail_everything(self) -> None:
        """The thread is ending: every request still here gets a closing event."""
        self._drain_inbox()
        leftover = self.engine.request_ids()
        for rid in leftover:
            self.engine.cancel(rid)
        rank = self.collective.rank
        why = (f"worker rank {rank} lost its mesh: {self.failure}" if self.failure
               else f"worker rank {rank} is shutting down")
        if leftover:
            self.on_events([Rejected(rid, UnavailableError(why)) for rid in leftover])
