"""The worker's engine thread: owns the engine and runs the lockstep protocol with its peers.

Everything that touches the engine or a collective happens on this one thread; the asyncio side
talks to it only through `submit`, `cancel`, `offer_epoch` and `request_stop` (thread-safe), and
hears back through the `events` callback (called on this thread; the server hops to its loop).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from moemesh.engine.engine import Engine, FinishReason, StepBatch, TokenEvent
from moemesh.engine.sampling import SamplingParams
from moemesh.errors import MoemeshError, UnavailableError
from moemesh.mesh.lockstep import HeaderCollective, StepHeader, Waker, exchange_header
from moemesh.mesh.placement import Placement
from moemesh.mesh.routing_counts import LoadRecorder, LoadSample
from moemesh.model.weights import LayerExperts

log = logging.getLogger(__name__)


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


class StepCollective(HeaderCollective, Protocol):
    """What the engine thread needs of its collective besides the transport's exchanges."""

    rank: int
    seconds: float  # wall time blocked on collectives
    exchange_seconds: float  # all_to_all exchanges in flight, summed
    hidden_seconds: float  # the part of exchange_seconds overlapped with compute


class MeshRunner:
    """`epoch`: the placement epoch the engine's MoE layer was built for. `recorder`: the load
    recorder the model's MoE layer and transport feed; its window goes to `on_load` every
    `report_every_tokens` routed tokens."""

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
    ):
        self.engine = engine
        self.recorder = recorder
        self.collective = collective
        self.waker = waker
        self.idle_round = 0  # idle headers seen so far: the same count on every rank
        self.on_events = on_events
        self.on_load = on_load
        self.report_every = report_every_tokens
        self.epoch = epoch
        self.switches: list[tuple[int, int]] = []  # (epoch, steps executed before it): the same on every rank
        self._prepared: dict[int, PreparedEpoch] = {}
        self._loaded_epoch = self.epoch
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.steps = 0
        self.step_seconds = 0.0  # wall time of executed steps, header exchange included
        self.collective_seconds = 0.0  # the part of step_seconds spent in collectives
        self.exchange_seconds = 0.0  # dispatch/combine exchanges in flight, summed over exchanges
        self.hidden_seconds = 0.0  # the part of exchange_seconds overlapped with compute (not in wait())
        self._exchanges_seen = (0.0, 0.0)  # the collective's (exchange, hidden) counters when last read
        self.tokens = 0
        self.failure: BaseException | None = None
        self._finished = False

    # ---- called from any thread ----------------------------------------------------------------
    def submit(self, item: Submit | Cancel) -> None:
        self._inbox.put(item)
        self.waker.wake(self.idle_round)

    def offer_epoch(self, prepared: PreparedEpoch) -> None:
        """A newer placement is loaded; the mesh switches once every rank has it."""
        with self._lock:
            assert prepared.placement.epoch > self._loaded_epoch, "epochs must be prepared in order"
            self._prepared[prepared.placement.epoch] = prepared
            self._loaded_epoch = prepared.placement.epoch
        self.waker.wake(self.idle_round)

    def request_stop(self) -> None:
        self._stop.set()
        self.waker.wake(self.idle_round)

    @property
    def accepting(self) -> bool:
        """False once the engine thread is stopping or has failed: new requests would hang."""
        return not self._stop.is_set() and self.failure is None and not self._finished

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
            while True:
                self._drain_inbox()
                batch = self.engine.schedule()
                reported = self.loaded_epoch
                started, in_collectives = time.perf_counter(), self.collective.seconds
                header = exchange_header(self.collective, batch.tokens_per_micro, reported, self._stop.is_set())
                if header.stop:
                    break
                self._maybe_switch(header)
                if header.idle:
                    self._idle(reported)
                    continue
                self._step(header, batch)
                self.step_seconds += time.perf_counter() - started
                self.collective_seconds += self.collective.seconds - in_collectives
                self._count_exchanges()
        except BaseException as exc:  # a peer died or a collective timed out: the world is broken
            self.failure = exc
            log.exception("engine thread stopped")
        finally:
            self._finished = True
            self._fail_everything()

    def _count_exchanges(self) -> None:
        """Add the exchange seconds the collective counted since the last call, in seconds. NCCL
        reads its timing events at the next step header, so its share of a step arrives a step
        late; reading deltas after every executed step loses none of it."""
        seen_exchange, seen_hidden = self._exchanges_seen
        now = (self.collective.exchange_seconds, self.collective.hidden_seconds)
        self.exchange_seconds += now[0] - seen_exchange
        self.hidden_seconds += now[1] - seen_hidden
        self._exchanges_seen = now

    def _idle(self, reported_epoch: int) -> None:
        """Sleep until some rank has something to do (see Waker); never poll."""
        self.idle_round += 1
        if not self._inbox.empty() or self._stop.is_set() or self.loaded_epoch > reported_epoch:
            self.waker.wake(self.idle_round)  # ours: end this round for every rank at once
        else:
            self.waker.wait(self.idle_round)

    def _step(self, header: StepHeader, batch: StepBatch) -> None:
        events = self.engine.execute(batch, header.max_tokens)
        self.steps += 1
        self.tokens += batch.num_tokens
        if events:
            self.on_events(list(events))
        if self.on_load is not None and self.recorder is not None and self.recorder.tokens >= self.report_every:
            self.on_load(self.recorder.take())

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
