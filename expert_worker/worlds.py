"""Following the coordinator's world generations: what a worker does when its world changes.

The coordinator forms a new world generation whenever a worker is lost, leaves or joins
(coordinator/membership.py). A worker keeps its process, weights, experts and requests across
generations; for each new one it:

1. hears of it (`WaitForWorld(after_generation=g)`, a long poll with a deadline) and tells the
   engine thread at once (`MeshRunner.newer_world`): the thread leaves the old world at its next
   step header, or gives up a collective that waits for peers that already left;
2. loads the new world's first placement (`GetPlacement`; only experts it did not hold are read
   from the checkpoint, `prepare_epoch`);
3. joins the new world's communicator (its own rendezvous prefix), off the event loop;
4. offers the result to the engine thread (`MeshRunner.offer_world`), which enters it with its
   requests and KV caches and runs again every step that broke off.

A world that does not list this worker means it was evicted (it stalled past the coordinator's
timeout, or it left): `follow` returns and the worker stops; its remaining requests go back to the
gateway as UNAVAILABLE, which moves them to a live worker with the tokens they already have.
A world with an `unservable_reason` is not joined: the next one is awaited.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from expert_worker.epochs import prepare_epoch
from expert_worker.runner import MeshRunner, World
from expert_worker.settings import WorkerSettings
from moemesh.mesh.backend import choose_backend, join_world
from moemesh.mesh.gloo import StoreWaker
from moemesh.mesh.placement import Placement
from moemesh.mesh.placement_wire import placement_from_proto
from moemesh.model.checkpoint import CheckpointReader
from moemesh.retry import Backoff, retry
from moemesh.status import is_not_yet
from moemesh.v1 import coordinator_pb2 as cpb

log = logging.getLogger("moemesh.worker")


@dataclass(frozen=True)
class Identity:
    """This worker as the coordinator knows it."""

    worker_id: str
    incarnation: int


def join(world: cpb.World, abandoned: Callable[[int], bool], settings: WorkerSettings) -> tuple[Any, StoreWaker]:
    """Blocking: join `world`'s communicator (CollectiveError if its ranks do not all come) and make
    the waker of its idle rounds; (collective, waker). `abandoned(generation)` is the engine
    thread's: a collective of this world stops waiting once it is true."""
    rv = world.rendezvous
    choice = choose_backend(world.transport or "gloo", settings.device)
    log.info("rank %d of world generation %d: data plane %s (%s)", world.rank, world.generation, choice.name,
             choice.reason)
    generation = world.generation
    collective = join_world(choice, rv.store_host, rv.store_port, rv.store_prefix, world.rank, world.world_size,
                            settings.device, settings.collective_timeout_s, micro_batches=settings.micro_batches,
                            abandoned=lambda: abandoned(generation), bind_host=settings.advertise_host)
    return collective, StoreWaker(rv.store_host, rv.store_port, f"{rv.store_prefix}wake/",
                                  timeout_s=settings.idle_wait_s)


async def first_placement(coord, settings: WorkerSettings, world: cpb.World, stop: asyncio.Event) -> Placement | None:
    """The placement every rank of `world` starts on (epoch World.placement_epoch, asked for by
    number: a later epoch may be published meanwhile); None if stopped first."""
    request = cpb.GetPlacementRequest(epoch=world.placement_epoch)
    reply = await retry(lambda: coord.GetPlacement(request, timeout=settings.rpc_timeout_s), is_not_yet, stop=stop,
                        backoff=Backoff(first_s=0.05, cap_s=1.0))
    if reply is None:
        return None
    assert reply.placement.world_generation == world.generation, "a world's first epoch names that world"
    return placement_from_proto(reply.placement)


class WorldFollower:
    """Follows generations for one worker; `follow()` returns when this worker is no longer a member."""

    def __init__(self, coord, settings: WorkerSettings, identity: Identity, runner: MeshRunner,
                 reader: CheckpointReader):
        self.coord, self.settings, self.identity = coord, settings, identity
        self.runner, self.reader = runner, reader
        self.generations_joined = 0

    async def follow(self, stop: asyncio.Event) -> None:
        generation = self.runner.generation
        while True:
            world = await self._next_world(generation, stop)
            if world is None:
                return
            generation = world.generation
            self.runner.newer_world(generation)
            if world.rank < 0:
                log.warning("%s is not a member of world generation %d (evicted or left): stopping",
                            self.identity.worker_id, generation)
                return
            if world.unservable_reason:
                log.error("world generation %d cannot serve: %s", generation, world.unservable_reason)
                continue
            entered = await self._prepare(world, stop)
            if entered is not None:
                self.runner.offer_world(entered)
                self.generations_joined += 1

    async def _next_world(self, after: int, stop: asyncio.Event) -> cpb.World | None:
        """The first world newer than `after`; None if `stop` is set first."""
        request = cpb.WaitForWorldRequest(after_generation=after, worker_id=self.identity.worker_id,
                                          incarnation=self.identity.incarnation)

        async def poll() -> cpb.World:
            return await self.coord.WaitForWorld(request, timeout=self.settings.world_poll_s)

        # A long poll that ran out of time, or a coordinator not reachable now (restarting): poll again.
        return await retry(poll, is_not_yet, stop=stop, backoff=Backoff(first_s=0.05, cap_s=1.0))

    async def _prepare(self, world: cpb.World, stop: asyncio.Event) -> World | None:
        """Load the world's first placement and join its communicator. None if that failed: the
        coordinator is told (so it forms the next generation instead of leaving every rank
        waiting) and the caller waits for the next world."""
        try:
            placement = await first_placement(self.coord, self.settings, world, stop)
            if placement is None:
                return None
            loop = asyncio.get_running_loop()
            model = self.runner.engine.model
            log.info("world generation %d: rank %d of %d, loading placement epoch %d", world.generation, world.rank,
                     world.world_size, placement.epoch)
            prepared = await loop.run_in_executor(
                None, prepare_epoch, placement, world.rank, dict(model.moe.experts.layers), self.reader, model.cfg,
                model.runtime.dtype, model.runtime.device)
            collective, waker = await loop.run_in_executor(None, join, world, self.runner.abandoned, self.settings)
        except Exception as exc:  # whatever stopped this world, the next one must come
            log.warning("could not enter world generation %d: %s", world.generation, exc)
            await report_lost(self.coord, self.settings, self.identity, world.generation,
                              f"rank {world.rank} could not enter: {exc}")
            return None
        return World(generation=world.generation, collective=collective, waker=waker, first=prepared)


async def report_lost(coord, settings: WorkerSettings, identity: Identity, generation: int, reason: str) -> bool:
    """Tell the coordinator that world `generation` broke. False if it says this worker is no
    longer a member (evicted)."""
    request = cpb.ReportWorldLostRequest(worker_id=identity.worker_id, incarnation=identity.incarnation,
                                         world_generation=generation, reason=reason[:1000])
    try:
        await retry(lambda: coord.ReportWorldLost(request, timeout=settings.rpc_timeout_s), is_not_yet,
                    backoff=Backoff(first_s=0.05, cap_s=1.0, deadline_s=settings.rpc_timeout_s))
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return False
        log.warning("could not report the loss of world generation %d: %s", generation, exc.code().name)
    return True


async def leave(coord, settings: WorkerSettings, identity: Identity) -> None:
    """Tell the coordinator this worker leaves (best effort, bounded: it stops either way)."""
    try:
        await coord.LeaveWorld(cpb.LeaveWorldRequest(worker_id=identity.worker_id,
                                                     incarnation=identity.incarnation),
                               timeout=settings.leave_timeout_s)
    except grpc.aio.AioRpcError as exc:
        log.info("leaving without the coordinator's acknowledgement: %s", exc.code().name)
