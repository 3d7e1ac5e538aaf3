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

import grpc

from expert_worker.epochs import prepare_epoch
from expert_worker.runner import MeshRunner, World
from expert_worker.settings import WorkerSettings
from moemesh.errors import CollectiveError
from moemesh.mesh.backend import choose_backend, join_world
from moemesh.mesh.gloo import StoreWaker
from moemesh.mesh.placement_wire import placement_from_proto
from moemesh.model.checkpoint import CheckpointReader
from moemesh.retry import Backoff, retry
from moemesh.status import is_not_yet
from moemesh.v1 import coordinator_pb2 as cpb

log = logging.getLogger("moemesh.worker")

WORLD_POLL_S = 30.0  # deadline of each WaitForWorld long poll (it simply polls again)


@dataclass(frozen=True)
class Identity:
    """This worker as the coordinator knows it."""

    worker_id: str
    incarnation: int


def join(world: cpb.World, runner_abandoned: Callable[[int], bool], settings: WorkerSettings) -> tuple:
    """Blocking: join `world`'s communicator and make its idle waker; returns (collective, waker)."""
    rv = world.rendezvous
    choice = choose_backend(world.transport or "gloo", settings.device)
    generation = world.generation
    collective = join_world(choice, rv.store_host, rv.store_port, rv.store_prefix, world.rank, world.world_size,
                            settings.device, settings.collective_timeout_s, micro_batches=settings.micro_batches,
                            abandoned=lambda: runner_abandoned(generation))
    waker = StoreWaker(rv.store_host, rv.store_port, f"{rv.store_prefix}wake/", timeout_s=3600.0)
    return collective, waker


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
            entered = await self._prepare(world)
            if entered is not None:
                self.runner.offer_world(entered)
                self.generations_joined += 1

    async def _next_world(self, after: int, stop: asyncio.Event) -> cpb.World | None:
        """The first world newer than `after`; None if `stop` is set first."""
        request = cpb.WaitForWorldRequest(after_generation=after, worker_id=self.identity.worker_id,
                                          incarnation=self.identity.incarnation)

        async def poll() -> cpb.World:
            return await self.coord.WaitForWorld(request, timeout=WORLD_POLL_S)

        # A long poll that ran out of time, or a coordinator not reachable now (restarting): poll again.
        return await retry(poll, is_not_yet, stop=stop, backoff=Backoff(first_s=0.05, cap_s=1.0))

    async def _prepare(self, world: cpb.World) -> World | None:
        """Load the world's first placement and join its communicator; None if a newer world
        overtook it (the caller then waits for that one)."""
        reply = await self.coord.GetPlacement(cpb.GetPlacementRequest(), timeout=self.settings.rpc_timeout_s)
        if reply.placement.world_generation != world.generation:
            log.info("world generation %d overtaken (placement is for generation %d)", world.generation,
                     reply.placement.world_generation)
            return None
        placement = placement_from_proto(reply.placement)
        loop = asyncio.get_running_loop()
        model = self.runner.engine.model
        runtime = model.runtime
        log.info("world generation %d: rank %d of %d, loading placement epoch %d", world.generation, world.rank,
                 world.world_size, placement.epoch)
        prepared = await loop.run_in_executor(
            None, prepare_epoch, placement, world.rank, dict(model.moe.experts.layers), self.reader, model.cfg,
            runtime.dtype, runtime.device)
        try:
            collective, waker = await loop.run_in_executor(
                None, join, world, self.runner.abandoned, self.settings)
        except CollectiveError as exc:
            log.warning("could not join world generation %d: %s", world.generation, exc)
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
                               timeout=min(settings.rpc_timeout_s, 2.0))
    except grpc.aio.AioRpcError as exc:
        log.info("leaving without the coordinator's acknowledgement: %s", exc.code().name)
