"""The coordinator's domain: membership + worlds + placement epochs + load, with async waiting.

Pure asyncio (no gRPC). Everything runs on one event loop, so methods mutate state without locks;
waiters (WaitForWorld, WatchPlacement) sleep on one `_Signal` that every change notifies, and
re-check their condition when woken.

Placement epochs: the first world publishes epoch 1 (round robin, or the operator's file);
SetPlacement publishes current + 1. The last `history` placements are kept so a watcher that
fell behind receives every epoch it missed, in order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, replace

import torch

from coordinator.errors import (
    EpochMismatchError,
    GenerationMismatchError,
    NoPlacementError,
    ShuttingDownError,
    WorldNotFormedError,
)
from coordinator.membership import Membership, Silence, WorkerInfo
from coordinator.policies import ModelFacts, Rebalancer, RebalanceSettings
from coordinator.routing_window import LoadSnapshot, LoadWindow, check_counts
from coordinator.splitting import Memory
from moemesh.errors import ConfigError, InvalidRequestError
from moemesh.mesh.placement import (
    Placement,
    initial_placement,
    shards_to_fit,
    validate_placement,
)

log = logging.getLogger(__name__)

ROUND_ROBIN = "round_robin"  # origin of the computed initial placement
MANUAL = "manual"  # origin of SetPlacement (the contract's name for an operator override)


@dataclass(frozen=True)
class DataPlane:
    """How the ranks of every world meet: transport name and the TCPStore address."""

    transport: str
    store_host: str
    store_port: int


@dataclass(frozen=True)
class World:
    """One formed world: members by rank, its rendezvous and its first placement epoch."""

    generation: int
    members: tuple[WorkerInfo, ...]
    data_plane: DataPlane
    placement_epoch: int

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def store_prefix(self) -> str:
        """TCPStore key prefix private to this generation."""
        return f"gen{self.generation}/"

    def rank_of(self, worker_id: str, incarnation: int) -> int:
        """The rank of (worker_id, incarnation) in this world; -1 for anyone else (observers)."""
        for rank, m in enumerate(self.members):
            if worker_id and m.worker_id == worker_id and m.incarnation == incarnation:
                return rank
        return -1


@dataclass(frozen=True)
class Published:
    """A published placement and the generation of the world its ranks refer to."""

    placement: Placement
    world_generation: int


@dataclass(frozen=True)
class Registration:
    """RegisterWorker's answer: world_size and generation are 0 until the world forms."""

    rank: int
    world_size: int
    generation: int


@dataclass(frozen=True)
class Beat:
    """Heartbeat's answer: the newest world generation and placement epoch."""

    world_generation: int
    placement_epoch: int


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
        history: int = 64,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.num_experts = num_experts
        self.moe_layer_ids = tuple(moe_layer_ids)
        self.facts = facts
        self.expert_shards = expert_shards  # 0 = the fewest that fit the workers' memory
        self.policy = rebalance.policy
        self.rebalancer = Rebalancer(rebalance, self.moe_layer_ids, num_experts, facts)
        self.data_plane = data_plane
        self.membership = Membership(expected_workers, clock)
        self.load = LoadWindow(len(self.moe_layer_ids), num_experts, load_window)
        self._initial = self._checked_initial(initial, expected_workers)
        self._history: deque[Published] = deque(maxlen=history)
        self._world: World | None = None
        self._closed = False
        self._signal = _Signal()

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
        """Admit a worker; the registration that completes the expected count forms the world."""
        admission = self.membership.admit(info)
        if admission.formed_now:
            self._form_world()
        world = self._world
        if world is None:
            return Registration(rank=admission.rank, world_size=0, generation=0)
        return Registration(rank=admission.rank, world_size=world.size, generation=world.generation)

    def _form_world(self) -> None:
        members = self.membership.members
        generation = self.membership.generation
        if self._initial is not None:
            placement = replace(self._initial, epoch=self._next_epoch())
        else:
            base = initial_placement(self.num_experts, self.moe_layer_ids, len(members), epoch=self._next_epoch(),
                                     shards=self._shards_for(members))
            placement = replace(base, origin=ROUND_ROBIN)
            self._validate(placement)  # an expert hidden size --expert-shards does not divide fails here
        self.load.clear()
        self.rebalancer.memory = Memory([m.memory_bytes for m in members], self._expert_bytes(members))
        self._world = World(generation, members, self.data_plane, placement.epoch)
        self._publish(placement, generation)
        log.info(
            "world generation %d formed: %s; placement epoch %d (%s)",
            generation, ", ".join(f"{r}={m.worker_id}@{m.address}" for r, m in enumerate(members)),
            placement.epoch, placement.origin,
        )

    def _shards_for(self, members: Sequence[WorkerInfo]) -> int:
        """How many ways the initial placement splits every expert (--expert-shards)."""
        if self.expert_shards or self.facts is None:
            return self.expert_shards or 1
        shards, fits = shards_to_fit(self._expert_bytes(members), [m.memory_bytes for m in members],
                                     self.facts.expert_intermediate_size, self.num_experts, len(self.moe_layer_ids))
        if not fits:
            log.error("experts do not fit the workers' reported memory even split %d ways; placing them so", shards)
        elif shards > 1:
            log.info("experts split %d ways to fit the workers' reported memory", shards)
        return shards

    def _expert_bytes(self, members: Sequence[WorkerInfo]) -> int:
        """One whole expert of one layer as the workers store it (0 without the model's shape)."""
        if self.facts is None:
            return 0
        f = self.facts
        element = max((m.weight_bytes_per_element for m in members), default=0) or f.dtype_bytes
        return 3 * f.hidden_size * f.expert_intermediate_size * element

    def _validate(self, p: Placement) -> None:
        hidden = self.facts.expert_intermediate_size if self.facts is not None else None
        validate_placement(p, self.num_experts, self.moe_layer_ids, expert_hidden=hidden)

    async def wait_for_world(self, after_generation: int = 0) -> World:
        """The first world newer than `after_generation`, waiting for it to form.

        Cancellation (the caller's deadline) propagates; ShuttingDownError if the coordinator stops.
        """
        def ready() -> bool:
            return self._closed or (self._world is not None and self._world.generation > after_generation)

        await self._signal.wait_for(ready)
        if self._closed:
            raise ShuttingDownError("coordinator is shutting down")
        assert self._world is not None
        return self._world

    def heartbeat(self, worker_id: str, incarnation: int) -> Beat:
        """Record a heartbeat (UnknownWorkerError if not registered); return what is newest."""
        if self.membership.touch(worker_id, incarnation):
            log.info("worker %r is heartbeating again", worker_id)
        epoch = self._history[-1].placement.epoch if self._history else 0
        return Beat(world_generation=self.membership.generation, placement_epoch=epoch)

    def check_heartbeats(self, timeout_s: float) -> list[Silence]:
        """Log (WARNING) each worker that went silent for longer than `timeout_s`; return them.

        HOOK(recovery): remove them and form generation + 1 from the survivors.
        """
        silent = self.membership.newly_silent(timeout_s)
        for s in silent:
            log.warning(
                "worker %r (%s) has not sent a heartbeat for %.1fs (timeout %.1fs)",
                s.worker.worker_id, s.worker.address, s.silent_s, timeout_s,
            )
        return silent

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
        published = self._publish(replace(p, epoch=current + 1, origin=MANUAL), world.generation)
        log.info("placement epoch %d published (%s) for world generation %d", current + 1, MANUAL, world.generation)
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
        self._history.append(published)
        self._signal.notify()
        return published

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Stop: open watches end, WaitForWorld callers get ShuttingDownError."""
        self._closed = True
        self._signal.notify()
