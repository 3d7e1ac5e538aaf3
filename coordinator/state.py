"""The coordinator's domain: membership + worlds + placement epochs + load, with async waiting.

Pure asyncio (no gRPC). Everything runs on one event loop, so methods mutate state without locks;
waiters (WaitForWorld, WatchPlacement) sleep on one `_Signal` that every change notifies, and
re-check their condition when woken.

Worlds: generation 1 forms inside the registration that completes the expected count; every later
generation is formed by `form_next_world`, called only by the one re-formation task
(coordinator/reformation.py), which `changed` wakes whenever something makes a new generation due
(a join, a leave, an eviction, a reported loss) or a member may be dead (`take_suspects`: the
members of a world reported broken, a member whose WaitForWorld vanished).

Placement epochs: the first world publishes epoch 1 (round robin, plus `redundancy` extra
replicas per expert, or the operator's file); a re-formed world publishes its first placement
(coordinator/recovery.py: survivors' replicas kept, orphans placed) as the next epoch, then, when
it differs, the same with redundancy restored and experts per rank levelled as the epoch after;
SetPlacement and the policies publish current + 1. Gating factors restart at none in a new world.
The last `history` placements are kept so a watcher that fell behind receives every epoch it
missed, in order.

Durable: every change a restarted coordinator needs (a registration, a leave, an eviction, a
reported loss, a world, an epoch) hands `snapshot()` to `on_change` (the server writes the state
file, coordinator/durable.py); `restore(snapshot)` resumes from one: the same world, members and
placement, no new generation unless something changes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import replace

import torch

from coordinator.durable import Snapshot
from coordinator.errors import (
    EpochMismatchError,
    GenerationMismatchError,
    NoPlacementError,
    ShuttingDownError,
    WorldNotFormedError,
)
from coordinator.membership import Membership, Silence, WorkerInfo
from coordinator.policies import ModelFacts, Rebalancer, RebalanceSettings
from coordinator.recovery import Forced, Room, reformed_placement, spread
from coordinator.routing_window import LoadSnapshot, LoadWindow, check_counts
from coordinator.splitting import Memory
from coordinator.worlds import (
    Beat,
    DataPlane,
    Published,
    Registration,
    World,
    bytes_moved,
    describe,
    expert_bytes,
    roster,
    shards_for,
)
from moemesh.errors import ConfigError, InvalidRequestError, NotFoundError
from moemesh.mesh.placement import Placement, initial_placement, validate_placement

log = logging.getLogger(__name__)

ROUND_ROBIN = "round_robin"  # origin of the computed initial placement
MANUAL = "manual"  # origin of SetPlacement (the contract's name for an operator override)


class _Signal:
    """Wakes every waiter on each `notify()`; waiters re-check their own predicate."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._event.wait()


class CoordinatorState:
    """Membership, the current world, published placements and load statistics."""

    def __init__(
        self,
        *,
        num_experts: int,
        moe_layer_ids: Iterable[int],
        expected_workers: int,
        data_plane: DataPlane,
        initial: Placement | None = None,
        load_window: int = 32,
        rebalance: RebalanceSettings = RebalanceSettings(),
        facts: ModelFacts | None = None,
        expert_shards: int = 1,
        redundancy: int = 0,
        history: int = 64,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[Snapshot], None] | None = None,
    ):
        self.num_experts = num_experts
        self.moe_layer_ids = tuple(moe_layer_ids)
        self.facts = facts
        self.expert_shards = expert_shards  # 0 = the fewest that fit the workers' memory
        self.redundancy = redundancy  # extra replicas per expert, when ranks and memory allow
        self.policy = rebalance.policy
        self.rebalancer = Rebalancer(rebalance, self.moe_layer_ids, num_experts, facts)
        self.data_plane = data_plane
        self.on_change = on_change
        self.membership = Membership(expected_workers, clock)
        self.load = LoadWindow(len(self.moe_layer_ids), num_experts, load_window)
        self._initial = self._checked_initial(initial, expected_workers)
        self._history: deque[Published] = deque(maxlen=history)
        self._world: World | None = None
        self._closed = False
        self._signal = _Signal()
        self.changed = asyncio.Event()  # set when a new generation may be due (the re-formation task waits)
        self._suspects: dict[str, WorkerInfo] = {}  # members to probe before the next generation
        self._loss_reported = 0  # generation whose data plane a member reported broken; 0 = none
        self._loss_probed = 0  # the generation whose members were last handed out to probe
        self._reporters: set[str] = set()  # members that reported that loss (alive: no probe)
        self._forced: Forced = ()  # groups of the current placement beyond memory (an unservable world)
        # Counters (coordinator/metrics.py exports them).
        self.generations_formed = 0
        self.recoveries = 0  # generations formed because a member was lost or the data plane broke
        self.evictions = 0  # registrations removed because the worker was dead or silent
        self.rebalances = 0  # epochs a balancing policy published
        self.bytes_moved = 0  # expert weight bytes workers loaded for epochs published within a world

    def _checked_initial(self, p: Placement | None, world_size: int) -> Placement | None:
        if p is None:
            return None
        try:
            self._validate(p)
        except InvalidRequestError as exc:
            raise ConfigError(f"initial placement does not fit the model: {exc}") from exc
        if p.world_size != world_size:
            raise ConfigError(f"initial placement is for {p.world_size} ranks but {world_size} workers are expected")
        return p

    # -- membership and worlds -------------------------------------------------------------

    @property
    def world(self) -> World | None:
        """The newest formed world, or None before the first one."""
        return self._world

    def register(self, info: WorkerInfo) -> Registration:
        """Admit a worker; the registration that completes the expected count forms the world,
        a later one waits as a joiner for the next generation."""
        admission = self.membership.admit(info)
        if admission.formed_now:
            self._form_first_world()
        self._wake_if_due()
        world = self._world
        if world is None or not self.membership.is_member(info.worker_id, info.incarnation):
            return Registration(rank=admission.rank, world_size=0, generation=0)
        return Registration(rank=admission.rank, world_size=world.size, generation=world.generation)

    def _form_first_world(self) -> None:
        members = self.membership.members
        room = self._room(members)
        if self._initial is not None:
            placement = replace(self._initial, epoch=self._next_epoch())
        else:
            base = initial_placement(self.num_experts, self.moe_layer_ids, len(members), epoch=self._next_epoch(),
                                     shards=self._shards_for(members))
            if self.redundancy:
                base = spread(base, self.redundancy, room, level=False)
            placement = replace(base, origin=ROUND_ROBIN)
            self._validate(placement)  # an expert hidden size --expert-shards does not divide fails here
        self._start_world(1, members, placement)
        log.info("world generation 1 formed: %s; placement epoch %d (%s)", roster(members), placement.epoch,
                 placement.origin)

    def _start_world(self, generation: int, members: tuple[WorkerInfo, ...], placement: Placement,
                     unservable_reason: str = "") -> None:
        self.load.clear()
        self.rebalancer.reset(Memory([m.memory_bytes for m in members], self._expert_bytes(members)))
        self._world = World(generation, members, self.data_plane, placement.epoch, unservable_reason)
        self.generations_formed += 1
        self._publish(placement, generation)

    def form_next_world(self) -> World | None:
        """Form generation + 1 when one is due and it has members (see coordinator.membership);
        publish its placement (and the spread one after it) first. None when nothing formed."""
        t = self.membership.form_next()
        if t is None:
            return None
        reformed = reformed_placement(self.current().placement, t.rank_map, len(t.members), self._room(t.members),
                                      drop=self._forced)
        self._forced = reformed.forced
        first = replace(reformed.placement, epoch=self._next_epoch())
        self._start_world(t.generation, t.members, first, reformed.unservable_reason)
        epochs = [first.epoch]
        if not reformed.unservable_reason:
            settled = spread(first, self.redundancy, self._room(t.members))
            if settled.replicas != first.replicas:
                epochs.append(self._next_epoch())
                self._publish(replace(settled, epoch=epochs[-1]), t.generation)
        self.recoveries += bool(t.lost or t.broken)
        self._suspects.clear()
        self._reporters.clear()
        (log.warning if reformed.unservable_reason else log.info)("%s", describe(t, epochs, reformed.unservable_reason))
        return self._world

    def _room(self, members: Sequence[WorkerInfo]) -> Room:
        return Room([m.memory_bytes for m in members], self._expert_bytes(members))

    def _shards_for(self, members: Sequence[WorkerInfo]) -> int:
        """How many ways the initial placement splits every expert (--expert-shards)."""
        return shards_for(self.expert_shards, self.facts, members, self.num_experts, len(self.moe_layer_ids))

    def _expert_bytes(self, members: Sequence[WorkerInfo]) -> int:
        return expert_bytes(self.facts, members)

    def _validate(self, p: Placement) -> None:
        hidden = self.facts.expert_intermediate_size if self.facts is not None else None
        validate_placement(p, self.num_experts, self.moe_layer_ids, expert_hidden=hidden)

    async def wait_for_world(self, after_generation: int = 0, worker_id: str = "", incarnation: int = 0) -> World:
        """The first world newer than `after_generation`, waiting for it to form. A registered
        worker waits for a world it is a member of; a worker that is not registered (evicted,
        superseded, left) once a world exists gets the newest world at once (its rank there: -1).

        Cancellation (the caller's deadline) propagates; ShuttingDownError if the coordinator stops.
        """
        def ready() -> bool:
            world = self._world
            if self._closed or world is None:
                return self._closed
            if not worker_id:
                return world.generation > after_generation
            if self.membership.rank_of(worker_id, incarnation) is None:
                return True
            return world.generation > after_generation and world.rank_of(worker_id, incarnation) >= 0

        if worker_id and not ready():
            log.debug("worker %r waits for a world newer than generation %d", worker_id, after_generation)
        await self._signal.wait_for(ready)
        if self._closed:
            raise ShuttingDownError("coordinator is shutting down")
        assert self._world is not None
        return self._world

    def rank_in(self, world: World, worker_id: str, incarnation: int) -> int:
        """The caller's rank in `world`: -1 for observers and for a worker no longer registered."""
        if self.membership.rank_of(worker_id, incarnation) is None:
            return -1
        return world.rank_of(worker_id, incarnation)

    def heartbeat(self, worker_id: str, incarnation: int) -> Beat:
        """Record a heartbeat (UnknownWorkerError if not registered); return what is newest."""
        if self.membership.touch(worker_id, incarnation):
            log.info("worker %r is heartbeating again", worker_id)
        return Beat(world_generation=self.membership.generation, placement_epoch=self.newest_epoch)

    def check_heartbeats(self, timeout_s: float) -> list[Silence]:
        """Log (WARNING) each worker that went silent for longer than `timeout_s`; once the first
        world formed, evict it (the next generation forms without it). Return them."""
        silent = self.membership.newly_silent(timeout_s)
        for s in silent:
            log.warning(
                "worker %r (%s) has not sent a heartbeat for %.1fs (timeout %.1fs)",
                s.worker.worker_id, s.worker.address, s.silent_s, timeout_s,
            )
            if self.membership.formed:
                self.evict(s.worker, f"no heartbeat for {s.silent_s:.1f}s")
        return silent

    # -- what makes a new generation due -----------------------------------------------------

    def report_world_lost(self, worker_id: str, incarnation: int, generation: int, reason: str) -> int:
        """A member says the data plane of `generation` broke; returns the newest generation.

        About the current generation: its members are probed (the reporters count alive) and
        the next generation is formed. About an older one: nothing to do. UnknownWorkerError
        when the caller is not registered.
        """
        self.membership.require(worker_id, incarnation)
        current = self.membership.generation
        if generation == current and self.membership.is_member(worker_id, incarnation):
            if self._loss_reported != current:
                log.warning("worker %r reports the data plane of world generation %d broken: %s",
                            worker_id, generation, reason or "(no reason given)")
            self.membership.break_world()
            self._loss_reported = current
            self._reporters.add(worker_id)
            self.changed.set()
            self._persist()
        return current

    def leave(self, worker_id: str, incarnation: int) -> None:
        """A worker leaves on purpose (idempotent); UnknownWorkerError if it is not registered."""
        if self.membership.leave(worker_id, incarnation):
            log.info("worker %r leaves world generation %d", worker_id, self.membership.generation)
        self._wake_if_due()

    def watcher_gone(self, worker_id: str, incarnation: int) -> None:
        """A member's pending WaitForWorld ended without an answer (its client went away): probe it."""
        if self._closed or not self.membership.is_member(worker_id, incarnation):
            return
        world = self._world
        assert world is not None
        self._suspects[worker_id] = world.members[world.rank_of(worker_id, incarnation)]
        self.changed.set()

    def take_suspects(self) -> list[WorkerInfo]:
        """The registered members to probe before the next generation (each handed out once)."""
        suspects = dict(self._suspects)
        self._suspects.clear()
        current = self.membership.generation
        if self._loss_reported == current and self._loss_probed != current:
            self._loss_probed = current
            suspects.update((w.worker_id, w) for w in self.membership.members if w.worker_id not in self._reporters)
        return [w for w in suspects.values() if self.membership.is_member(w.worker_id, w.incarnation)
                and not self.membership.is_leaving(w.worker_id)]  # a leaver is gone anyway: not "evicted"

    def evict(self, worker: WorkerInfo, why: str) -> None:
        """Remove a dead or silent worker's registration; the next generation forms without it."""
        if self.membership.evict(worker.worker_id, worker.incarnation, why):
            self.evictions += 1
            log.warning("worker %r (%s) evicted: %s", worker.worker_id, worker.address, why)
        self._wake_if_due()

    def _wake_if_due(self) -> None:
        if self.membership.due:
            self.changed.set()
        self._persist()

    # -- load statistics -------------------------------------------------------------------

    def report_load(
        self, worker_id: str, incarnation: int, world_generation: int, window_tokens: int, counts: torch.Tensor,
        links: torch.Tensor | None = None,
    ) -> bool:
        """Add one window of counts; False (ignored) when it was made in another world."""
        self.membership.require(worker_id, incarnation)
        check_counts(counts, self.load.shape)
        if world_generation == 0 or world_generation != self.membership.generation:
            return False
        rank = self._world.rank_of(worker_id, incarnation) if self._world is not None else -1
        self.load.add(worker_id, window_tokens, counts, rank=rank, links=links)
        proposal = self.rebalancer.observe(window_tokens, counts, self.current().placement)
        if proposal is not None:
            epoch = self._next_epoch()
            self._publish(replace(proposal, epoch=epoch), self.membership.generation)
            self.rebalances += 1
            log.info("placement epoch %d published (%s)", epoch, proposal.origin)
        return True

    def load_snapshot(self) -> LoadSnapshot:
        return self.load.snapshot(self._world.size if self._world is not None else 0)

    # -- placements ------------------------------------------------------------------------

    def current(self) -> Published:
        """The placement in force; NoPlacementError before the first world."""
        if not self._history:
            raise NoPlacementError("no placement yet: the first world has not formed")
        return self._history[-1]

    @property
    def newest_epoch(self) -> int:
        """The newest published placement epoch; 0 before the first."""
        history = self._history
        return history[-1].placement.epoch if history else 0

    def published(self, epoch: int) -> Published:
        """Epoch `epoch` as published (0: the one in force); NotFoundError if it never was."""
        if epoch == 0:
            return self.current()
        for published in reversed(self._history):
            if published.placement.epoch == epoch:
                return published
        raise NotFoundError(f"placement epoch {epoch} was never published (newest: "
                            f"{self._history[-1].placement.epoch if self._history else 0})")

    def set_placement(self, p: Placement, world_generation: int, expected_epoch: int = 0) -> Published:
        """Validate an operator's placement and publish it as the next epoch (origin "manual")."""
        world = self._world
        if world is None:
            raise WorldNotFormedError("no world has formed yet; a placement needs a world to refer to")
        if world_generation != world.generation:
            raise GenerationMismatchError(
                f"placement is for world generation {world_generation}, the current one is {world.generation}"
            )
        if p.epoch != 0:
            raise InvalidRequestError(f"placement epoch must be 0 (the coordinator assigns it), got {p.epoch}")
        if p.world_size != world.size:
            raise InvalidRequestError(f"placement is for {p.world_size} ranks, the world has {world.size}")
        self._validate(p)
        current = self.current().placement.epoch
        if expected_epoch and expected_epoch != current:
            raise EpochMismatchError(f"expected placement epoch {expected_epoch}, the current epoch is {current}")
        epoch = self._next_epoch()
        published = self._publish(replace(p, epoch=epoch, origin=MANUAL), world.generation)
        log.info("placement epoch %d published (%s) for world generation %d", epoch, MANUAL, world.generation)
        return published

    async def watch(self, after_epoch: int = 0) -> AsyncIterator[Published]:
        """Every placement with epoch > after_epoch, in order, as it is published.

        Ends when the coordinator closes. A watcher further behind than the kept history gets the
        oldest kept epoch next (the newest always arrives).
        """
        last = after_epoch

        def newer() -> bool:
            return self._closed or (bool(self._history) and self._history[-1].placement.epoch > last)

        while True:
            await self._signal.wait_for(newer)
            if self._closed:
                return
            for item in [h for h in self._history if h.placement.epoch > last]:
                yield item
                last = item.placement.epoch

    def _next_epoch(self) -> int:
        return self._history[-1].placement.epoch + 1 if self._history else 1

    def _publish(self, p: Placement, generation: int) -> Published:
        published = Published(p, generation)
        if self._history and self._history[-1].world_generation == generation and self._world is not None:
            self.bytes_moved += bytes_moved(self._history[-1].placement, p, self._expert_bytes(self._world.members))
        self._history.append(published)
        self._signal.notify()
        self._persist()
        return published

    # -- durability ------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """What a restarted coordinator needs (coordinator/durable.py)."""
        world = self._world
        return Snapshot(
            store_port=self.data_plane.store_port, membership=self.membership.record(),
            world_epoch=world.placement_epoch if world is not None else 0,
            unservable_reason=world.unservable_reason if world is not None else "",
            placement=self._history[-1].placement if self._history and world is not None else None,
            forced=self._forced)

    def restore(self, s: Snapshot) -> None:
        """Resume from `s` (a fresh state, before serving): its world, members and placement in
        force; every registered worker's heartbeat clock starts now. A reported loss is probed
        and a due generation formed by the re-formation task, as before the restart."""
        assert self._world is None and not self._history, "restore into a fresh state only"
        m = s.membership
        self.membership.restore(m)
        if s.placement is not None:
            try:
                self._validate(s.placement)
            except InvalidRequestError as exc:
                raise ConfigError(f"the state file's placement does not fit the model: {exc}") from exc
            self._world = World(m.generation, m.members, self.data_plane, s.world_epoch, s.unservable_reason)
            self._history.append(Published(s.placement, m.generation))
            self._forced = s.forced
            self.rebalancer.reset(Memory([w.memory_bytes for w in m.members], self._expert_bytes(m.members)))
        if m.broken:
            self._loss_reported = m.generation
        self._wake_if_due()

    def _persist(self) -> None:
        if self.on_change is not None:
            self.on_change(self.snapshot())

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Stop: open watches end, WaitForWorld callers get ShuttingDownError."""
        self._closed = True
        self._signal.notify()
