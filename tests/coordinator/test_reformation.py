"""Worlds re-formed live by a real coordinator on loopback port 0 (the re-formation task, its
health probes and the RPCs that feed it). Live members are played by real gRPC health servers on
port 0; a dead member is an address where nothing listens (a port bound once and closed)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import grpc

from moemesh.rpc import Server, channel
from moemesh.v1 import coordinator_pb2 as pb
from moemesh.v1 import coordinator_pb2_grpc as pb_grpc
from tests.coordinator.test_server import DEADLINE, expect_code, running


def dead_address() -> str:
    """host:port where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@contextlib.asynccontextmanager
async def live_members(n: int):
    """`n` addresses where a real gRPC health service answers (NOT_SERVING for the odd ones:
    alive all the same)."""
    servers = [Server([]) for _ in range(n)]
    try:
        addresses = []
        for i, server in enumerate(servers):
            port = await server.start("127.0.0.1", 0)
            if i % 2 == 0:
                await server.set_ready()
            addresses.append(f"127.0.0.1:{port}")
        yield addresses
    finally:
        for server in servers:
            await server.stop(0)


def member(name: str, address: str, incarnation: int = 1) -> pb.RegisterWorkerRequest:
    return pb.RegisterWorkerRequest(worker_id=name, incarnation=incarnation, address=address, device="cpu", node="n")


def wait(stub, after: int, name: str = "", incarnation: int = 1, timeout: float = DEADLINE):
    return stub.WaitForWorld(pb.WaitForWorldRequest(after_generation=after, worker_id=name, incarnation=incarnation),
                             timeout=timeout)


async def register_all(stub, requests: list[pb.RegisterWorkerRequest]) -> None:
    for request in requests:  # in order: ranks follow registration order
        await stub.RegisterWorker(request, timeout=DEADLINE)


def names(world: pb.World) -> list[str]:
    return [m.worker_id for m in world.members]


def test_a_reported_loss_forms_the_next_world_without_the_dead_member(tiny_model):
    async def scenario():
        async with live_members(2) as (a, b), running(tiny_model, workers=3) as (server, stub, _):
            await register_all(stub, [member("a", a), member("dead", dead_address()), member("b", b)])
            observer = asyncio.ensure_future(wait(stub, 1))
            lost = await stub.ReportWorldLost(pb.ReportWorldLostRequest(
                worker_id="a", incarnation=1, world_generation=1, reason="allreduce timed out"), timeout=DEADLINE)
            world = await wait(stub, 1, "b")
            seen = await observer
            evicted = await wait(stub, 2, "dead")  # no longer a member: the newest world at once
            placement = (await stub.GetPlacement(pb.GetPlacementRequest(), timeout=DEADLINE)).placement
            again = await stub.ReportWorldLost(pb.ReportWorldLostRequest(
                worker_id="b", incarnation=1, world_generation=1), timeout=DEADLINE)
            stranger = await expect_code(grpc.StatusCode.NOT_FOUND, stub.ReportWorldLost(
                pb.ReportWorldLostRequest(worker_id="dead", incarnation=1, world_generation=2), timeout=DEADLINE))
            return lost, world, seen, evicted, placement, again, stranger, server.state

    lost, world, seen, evicted, placement, again, stranger, state = asyncio.run(scenario())
    assert lost.world_generation == 1  # still probing when it answered
    assert (world.generation, names(world), world.rank, world.unservable_reason) == (2, ["a", "b"], 1, "")
    assert world.rendezvous.store_prefix == "gen2/"
    assert (seen.generation, seen.rank, seen.members) == (2, -1, world.members)
    assert world.placement_epoch == 2
    assert (evicted.generation, evicted.rank) == (2, -1)
    assert placement.world_generation == 2 and placement.world_size == 2 and placement.epoch >= 2
    assert again.world_generation == 2  # a report about an older generation: answered at once
    assert "register again" in stranger
    assert (state.generations_formed, state.recoveries, state.evictions) == (2, 1, 1)


def test_the_new_world_placement_epoch_is_published_before_the_world(tiny_model):
    async def scenario():
        async with live_members(2) as (a, b), running(tiny_model, workers=2) as (_, stub, _):
            await register_all(stub, [member("a", a), member("b", b)])
            stream = stub.WatchPlacement(pb.WatchPlacementRequest(after_epoch=1), timeout=DEADLINE)
            try:
                await stub.ReportWorldLost(pb.ReportWorldLostRequest(
                    worker_id="a", incarnation=1, world_generation=1, reason="slow peer"), timeout=DEADLINE)
                world = await wait(stub, 1, "a")
                published = await stream.read()
            finally:
                stream.cancel()
            return world, published

    world, published = asyncio.run(scenario())
    # Everyone answered the probe, yet the broken communicator means a new generation.
    assert (world.generation, names(world)) == (2, ["a", "b"])
    assert (published.epoch, published.world_generation, published.origin) == (world.placement_epoch, 2, "recovery")
    assert all(not layer.gating_factors for layer in published.layers)


def test_leave_world_forms_the_next_world_without_the_leaver(tiny_model):
    async def scenario():
        async with running(tiny_model, workers=2) as (_, stub, _):
            await register_all(stub, [member("a", "127.0.0.1:1"), member("b", "127.0.0.1:2")])
            leaver = asyncio.ensure_future(wait(stub, 1, "b"))
            await stub.LeaveWorld(pb.LeaveWorldRequest(worker_id="b", incarnation=1), timeout=DEADLINE)
            await stub.LeaveWorld(pb.LeaveWorldRequest(worker_id="b", incarnation=1), timeout=DEADLINE)  # idempotent
            world = await wait(stub, 1, "a")
            left = await leaver
            gone = await expect_code(grpc.StatusCode.NOT_FOUND, stub.LeaveWorld(
                pb.LeaveWorldRequest(worker_id="b", incarnation=1), timeout=DEADLINE))
            return world, left, gone

    world, left, gone = asyncio.run(scenario())
    assert (world.generation, names(world), world.rank) == (2, ["a"], 0)
    assert (left.generation, left.rank) == (2, -1)  # the leaver learns the world formed without it
    assert "not registered" in gone


def test_late_registrations_join_as_one_generation(tiny_model):
    async def scenario():
        async with running(tiny_model, workers=2) as (_, stub, _):
            await register_all(stub, [member("a", "127.0.0.1:1"), member("b", "127.0.0.1:2")])
            joiners = [member(f"j{i}", f"127.0.0.1:{10 + i}") for i in range(3)]
            regs = await asyncio.gather(*(stub.RegisterWorker(j, timeout=DEADLINE) for j in joiners))
            worlds = await asyncio.gather(*(wait(stub, 0, j.worker_id) for j in joiners))
            placement = (await stub.GetPlacement(pb.GetPlacementRequest(), timeout=DEADLINE)).placement
            return regs, worlds, placement

    regs, worlds, placement = asyncio.run(scenario())
    assert all((r.world_size, r.world_generation) == (0, 0) for r in regs)
    assert {w.generation for w in worlds} == {2}  # three joiners, one generation
    assert names(worlds[0])[:2] == ["a", "b"] and sorted(w.rank for w in worlds) == [2, 3, 4]
    # The joiners hold experts in the placement in force (the level epoch after the world's first).
    held = {r for layer in placement.layers for slots in layer.experts for r in slots.ranks}
    assert placement.world_generation == 2 and held == {0, 1, 2, 3, 4}


def test_heartbeat_silence_evicts(tiny_model):
    async def scenario():
        # "a" beats 20x per silence window, so only a starved machine could make it look silent too.
        async with running(tiny_model, workers=2, heartbeat_interval_s=0.1,
                           heartbeat_timeout_s=2.0) as (_, stub, _):
            await register_all(stub, [member("a", "127.0.0.1:1"), member("quiet", "127.0.0.1:2")])
            done = asyncio.Event()

            async def beat() -> None:
                while not done.is_set():
                    await stub.Heartbeat(pb.HeartbeatRequest(worker_id="a", incarnation=1), timeout=DEADLINE)
                    await asyncio.sleep(0.1)

            beating = asyncio.ensure_future(beat())
            try:
                world = await wait(stub, 1, "a", timeout=30.0)  # hang bound
            finally:
                done.set()
                await beating
            gone = await expect_code(grpc.StatusCode.NOT_FOUND, stub.Heartbeat(
                pb.HeartbeatRequest(worker_id="quiet", incarnation=1), timeout=DEADLINE))
            return world, gone

    world, gone = asyncio.run(scenario())
    assert (world.generation, names(world)) == (2, ["a"])
    assert "register again" in gone


class Waiting(logging.Handler):
    """Sets `event` when the coordinator logs that `worker` waits for a world (its call arrived)."""

    def __init__(self, worker: str):
        super().__init__(logging.DEBUG)
        self.worker = worker
        self.event = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(f"worker {self.worker!r} waits for a world"):
            self.event.set()  # the coordinator runs on this thread's loop


@contextlib.contextmanager
def watching(worker: str):
    logger = logging.getLogger("coordinator.state")
    handler, level = Waiting(worker), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler.event
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_a_cancelled_wait_of_a_dead_member_is_probed_and_of_a_live_one_changes_nothing(tiny_model):
    async def scenario():
        async with live_members(1) as (a,), running(tiny_model, workers=2) as (server, stub, _):
            target = f"127.0.0.1:{server.port}"
            await register_all(stub, [member("a", a), member("dead", dead_address())])
            for name in ("a", "dead"):  # each call from its own channel, as from its own process
                with watching(name) as arrived:
                    async with channel(target) as ch:
                        call = pb_grpc.CoordinatorStub(ch).WaitForWorld(pb.WaitForWorldRequest(
                            after_generation=1, worker_id=name, incarnation=1), timeout=60.0)
                        await asyncio.wait_for(arrived.wait(), 30.0)  # hang bound
                        call.cancel()  # its client goes away: the channel closes too
            world = await wait(stub, 1, "a")
            return world, server.state

    world, state = asyncio.run(scenario())
    assert (world.generation, names(world)) == (2, ["a"])  # the live one's probe evicted nobody
    assert (state.generations_formed, state.evictions) == (2, 1)
