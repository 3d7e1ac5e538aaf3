"""A real coordinator on loopback port 0, driven by grpc.aio client stubs (no mocks).

Each test runs one coroutine with asyncio.run; `running()` always stops the server it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
import torch
import torch.distributed as dist
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.server import SERVICE_NAME, CoordinatorServer
from coordinator.settings import CoordinatorSettings
from moemesh.errors import ConfigError
from moemesh.mesh.placement import whole_replicas
from moemesh.mesh.placement_wire import placement_from_proto, placement_to_proto
from moemesh.rpc import channel
from moemesh.tensor_wire import from_proto, to_proto
from moemesh.v1 import coordinator_pb2 as pb
from moemesh.v1 import coordinator_pb2_grpc as pb_grpc

EXPERTS = 8
LAYERS = (0, 1)
DEADLINE = 5.0


@contextlib.asynccontextmanager
async def running(model: Path, workers: int = 2, **kwargs):
    """A started coordinator and a client stub for it; stopped on exit, whatever happened."""
    kwargs.setdefault("registration_probe", False)  # most tests register addresses nobody serves
    settings = CoordinatorSettings(model_dir=model, workers=workers, port=0, shutdown_grace_s=0.2, **kwargs)
    server = CoordinatorServer(settings)
    try:
        await server.start()
        async with channel(f"127.0.0.1:{server.port}") as ch:
            yield server, pb_grpc.CoordinatorStub(ch), ch
    finally:
        await server.stop()


def register_request(i: int, incarnation: int = 1) -> pb.RegisterWorkerRequest:
    return pb.RegisterWorkerRequest(
        worker_id=f"node{i // 2}/cpu{i % 2}", incarnation=incarnation, address=f"127.0.0.1:{7000 + i}",
        device="cpu", node=f"node{i // 2}",
    )


async def form(stub, workers: int) -> list[pb.RegisterWorkerResponse]:
    return list(await asyncio.gather(*(
        stub.RegisterWorker(register_request(i), timeout=DEADLINE) for i in range(workers)
    )))


def swapped(world_size: int = 2, generation: int = 1) -> pb.Placement:
    table = tuple(((e + 1) % world_size,) for e in range(EXPERTS))
    return placement_to_proto(whole_replicas(0, world_size, {layer: table for layer in LAYERS}), generation)


async def expect_code(code: grpc.StatusCode, call) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    return info.value.details()


def test_workers_register_concurrently_and_wait_for_one_consistent_world(tiny_model):
    async def scenario():
        async with running(tiny_model, workers=4) as (server, stub, _):
            waits = [
                asyncio.ensure_future(stub.WaitForWorld(
                    pb.WaitForWorldRequest(worker_id=register_request(i).worker_id, incarnation=1), timeout=DEADLINE))
                for i in range(4)
            ]
            observer = asyncio.ensure_future(stub.WaitForWorld(pb.WaitForWorldRequest(), timeout=DEADLINE))
            regs = await form(stub, 4)
            worlds = await asyncio.gather(*waits)
            seen = await observer
            return server.store_port, regs, worlds, seen

    store_port, regs, worlds, observer = asyncio.run(scenario())
    assert sorted(r.rank for r in regs) == [0, 1, 2, 3]
    spec = regs[0].model
    assert (spec.architecture, spec.num_layers, list(spec.moe_layer_ids)) == ("MixtralForCausalLM", 2, [0, 1])
    assert (spec.num_experts, spec.top_k, spec.hidden_size, spec.vocab_size) == (8, 2, 64, 512)
    assert spec.max_context == 4096 and Path(regs[0].model_path).is_absolute()
    assert regs[0].heartbeat_interval_seconds == 1.0
    for i, (reg, world) in enumerate(zip(regs, worlds)):
        assert world.rank == reg.rank
        assert world.members[world.rank].worker_id == register_request(i).worker_id
        assert world.members == worlds[0].members and world.rendezvous == worlds[0].rendezvous
    world = worlds[0]
    assert (world.generation, world.world_size, world.transport, world.placement_epoch) == (1, 4, "gloo", 1)
    assert [m.rank for m in world.members] == [0, 1, 2, 3]
    addresses = {register_request(i).worker_id: register_request(i).address for i in range(4)}
    assert all(m.address == addresses[m.worker_id] and m.device == "cpu" for m in world.members)
    assert (world.rendezvous.store_host, world.rendezvous.store_port) == ("127.0.0.1", store_port)
    assert world.rendezvous.store_prefix == "gen1/"
    assert observer.rank == -1 and observer.members == world.members


def test_the_rendezvous_store_accepts_workers(tiny_model):
    async def scenario():
        async with running(tiny_model, workers=1) as (_, stub, _):
            await form(stub, 1)
            world = await stub.WaitForWorld(pb.WaitForWorldRequest(), timeout=DEADLINE)
            rv = world.rendezvous

            def client_roundtrip() -> bytes:
                def client() -> dist.Store:
                    store = dist.TCPStore(rv.store_host, rv.store_port, is_master=False, timeout=timedelta(seconds=5))
                    return dist.PrefixStore(rv.store_prefix, store)  # as workers use it

                client().set("hello", "world")
                return client().get("hello")  # a second connection sees the first one's key

            return await asyncio.to_thread(client_roundtrip)

    assert asyncio.run(scenario()) == b"world"


def test_watch_receives_epoch_1_then_the_set_placement_as_epoch_2(tiny_model):
    async def scenario():
        async with running(tiny_model) as (_, stub, _ch):
            stream = stub.WatchPlacement(pb.WatchPlacementRequest(after_epoch=0), timeout=DEADLINE)
            try:
                await form(stub, 2)
                first = await stream.read()
                resp = await stub.SetPlacement(pb.SetPlacementRequest(placement=swapped(), expected_epoch=1),
                                               timeout=DEADLINE)
                second = await stream.read()
            finally:
                stream.cancel()
            current = await stub.GetPlacement(pb.GetPlacementRequest(), timeout=DEADLINE)
            return first, resp.placement, second, current.placement

    first, published, second, current = asyncio.run(scenario())
    assert (first.epoch, first.origin, first.world_generation, first.world_size) == (1, "round_robin", 1, 2)
    assert [list(s.ranks) for s in first.layers[0].experts] == [[e % 2] for e in range(EXPERTS)]
    assert (published.epoch, published.origin) == (2, "manual")
    assert second == published == current
    assert placement_from_proto(second).layers == placement_from_proto(swapped()).layers


def test_bad_set_placement_is_rejected_and_the_server_keeps_serving(tiny_model):
    async def scenario():
        async with running(tiny_model) as (_, stub, _ch):
            early = await expect_code(grpc.StatusCode.FAILED_PRECONDITION, stub.SetPlacement(
                pb.SetPlacementRequest(placement=swapped()), timeout=DEADLINE))
            await expect_code(grpc.StatusCode.UNAVAILABLE,
                              stub.GetPlacement(pb.GetPlacementRequest(), timeout=DEADLINE))
            await form(stub, 2)
            missing = swapped()
            del missing.layers[1].experts[-1]
            invalid = await expect_code(grpc.StatusCode.INVALID_ARGUMENT, stub.SetPlacement(
                pb.SetPlacementRequest(placement=missing), timeout=DEADLINE))
            out_of_range = swapped()
            out_of_range.layers[0].experts[0].ranks[:] = [5]
            await expect_code(grpc.StatusCode.INVALID_ARGUMENT, stub.SetPlacement(
                pb.SetPlacementRequest(placement=out_of_range), timeout=DEADLINE))
            for factors in ([1.0] * (EXPERTS - 1), [0.0] + [1.0] * (EXPERTS - 1)):  # wrong count; not positive
                gated = swapped()
                gated.layers[0].gating_factors[:] = factors
                await expect_code(grpc.StatusCode.INVALID_ARGUMENT, stub.SetPlacement(
                    pb.SetPlacementRequest(placement=gated), timeout=DEADLINE))
            stale = await expect_code(grpc.StatusCode.FAILED_PRECONDITION, stub.SetPlacement(
                pb.SetPlacementRequest(placement=swapped(), expected_epoch=7), timeout=DEADLINE))
            await expect_code(grpc.StatusCode.FAILED_PRECONDITION, stub.SetPlacement(
                pb.SetPlacementRequest(placement=swapped(generation=3)), timeout=DEADLINE))
            current = await stub.GetPlacement(pb.GetPlacementRequest(), timeout=DEADLINE)
            ok = await stub.SetPlacement(pb.SetPlacementRequest(placement=swapped(), expected_epoch=1),
                                         timeout=DEADLINE)
            return early, invalid, stale, current.placement.epoch, ok.placement.epoch

    early, invalid, stale, epoch_after_rejections, epoch_after_ok = asyncio.run(scenario())
    assert "no world" in early
    assert "7 experts placed" in invalid
    assert "expected placement epoch 7, the current epoch is 1" in stale
    assert (epoch_after_rejections, epoch_after_ok) == (1, 2)


def test_report_load_checks_shape_and_accumulates(tiny_model):
    async def scenario():
        async with running(tiny_model) as (_, stub, _ch):
            await form(stub, 2)
            w0 = register_request(0)

            def report(counts: torch.Tensor, tokens: int = 3, worker=w0, generation: int = 1):
                return stub.ReportLoad(pb.ReportLoadRequest(
                    worker_id=worker.worker_id, incarnation=worker.incarnation, rank=0, world_generation=generation,
                    placement_epoch=1, window_tokens=tokens, expert_counts=to_proto(counts)), timeout=DEADLINE)

            counts = torch.arange(2 * EXPERTS, dtype=torch.int64).reshape(2, EXPERTS)
            bad = await expect_code(grpc.StatusCode.INVALID_ARGUMENT, report(counts.reshape(EXPERTS, 2)))
            await expect_code(grpc.StatusCode.NOT_FOUND, report(counts, worker=register_request(9)))
            await report(counts)
            await report(counts, tokens=4)
            await report(counts * 100, generation=5)  # another world's counts: ignored
            resp = await stub.GetPlacement(pb.GetPlacementRequest(), timeout=DEADLINE)
            return bad, resp.window_tokens, from_proto(resp.expert_counts), counts

    bad, tokens, total, counts = asyncio.run(scenario())
    assert "shape [8, 2], expected [2, 8]" in bad
    assert tokens == 7 and torch.equal(total, counts * 2)


def test_registration_beyond_the_expected_count_joins_the_next_world(tiny_model):
    async def scenario():
        async with running(tiny_model) as (_, stub, _ch):
            regs = await form(stub, 2)  # concurrent: either worker may get rank 0
            older = await expect_code(grpc.StatusCode.FAILED_PRECONDITION, stub.RegisterWorker(
                register_request(0, incarnation=0), timeout=DEADLINE))
            retry = await stub.RegisterWorker(register_request(1), timeout=DEADLINE)  # idempotent
            late = await stub.RegisterWorker(register_request(2), timeout=DEADLINE)  # no longer refused
            world = await stub.WaitForWorld(pb.WaitForWorldRequest(
                worker_id=register_request(2).worker_id, incarnation=1), timeout=DEADLINE)
            return older, retry, regs[1].rank, late, world

    older, retry, rank, late, world = asyncio.run(scenario())
    assert "older" in older
    assert (retry.rank, retry.world_size, retry.world_generation) == (rank, 2, 1)
    assert (late.rank, late.world_size, late.world_generation) == (2, 0, 0)  # in no world yet
    assert (world.generation, world.world_size, world.rank) == (2, 3, 2)
    assert world.rendezvous.store_prefix == "gen2/" and world.placement_epoch == 2


def test_heartbeat_answers_newest_world_and_epoch_and_rejects_strangers(tiny_model):
    async def scenario():
        async with running(tiny_model) as (_, stub, _ch):
            await stub.RegisterWorker(register_request(0), timeout=DEADLINE)
            before = await stub.Heartbeat(pb.HeartbeatRequest(worker_id=register_request(0).worker_id, incarnation=1),
                                          timeout=DEADLINE)
            await stub.RegisterWorker(register_request(1), timeout=DEADLINE)
            after = await stub.Heartbeat(pb.HeartbeatRequest(worker_id=register_request(0).worker_id, incarnation=1),
                                         timeout=DEADLINE)
            unknown = await expect_code(grpc.StatusCode.NOT_FOUND, stub.Heartbeat(
                pb.HeartbeatRequest(worker_id="ghost", incarnation=1), timeout=DEADLINE))
            return before, after, unknown

    before, after, unknown = asyncio.run(scenario())
    assert (before.world_generation, before.placement_epoch) == (0, 0)
    assert (after.world_generation, after.placement_epoch) == (1, 1)
    assert "register again" in unknown


def test_wait_for_world_honours_the_deadline(tiny_model):
    async def scenario():
        async with running(tiny_model) as (_, stub, _ch):
            t0 = time.monotonic()
            await expect_code(grpc.StatusCode.DEADLINE_EXCEEDED, stub.WaitForWorld(
                pb.WaitForWorldRequest(), timeout=0.3))
            elapsed = time.monotonic() - t0
            regs = await form(stub, 2)  # still serving, and the abandoned wait left nothing behind
            return elapsed, regs

    elapsed, regs = asyncio.run(scenario())
    # The deadline is the client's 0.3 s (DEADLINE_EXCEEDED above); this bound only catches a hang.
    assert elapsed < 30.0 and regs[1].world_generation == 1  # hang bound


def test_health_reports_serving(tiny_model):
    async def scenario():
        async with running(tiny_model) as (_, _stub, ch):
            health = health_pb2_grpc.HealthStub(ch)
            return [
                (await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=DEADLINE)).status
                for name in ("", SERVICE_NAME)
            ]

    assert asyncio.run(scenario()) == [health_pb2.HealthCheckResponse.SERVING] * 2


def test_stop_ends_open_watches_promptly(tiny_model):
    async def scenario():
        # A 120 s grace: were the open watch to hold it, stop() would outlast the 30 s hang bound below.
        settings = CoordinatorSettings(model_dir=tiny_model, workers=1, port=0, shutdown_grace_s=120.0,
                                       registration_probe=False)  # registers an address nobody serves
        server = CoordinatorServer(settings)
        try:
            await server.start()
            async with channel(f"127.0.0.1:{server.port}") as ch:
                stub = pb_grpc.CoordinatorStub(ch)
                stream = stub.WatchPlacement(pb.WatchPlacementRequest(), timeout=DEADLINE)
                await form(stub, 1)
                assert (await stream.read()).epoch == 1
                await asyncio.wait_for(server.stop(), timeout=30.0)  # hang bound
                ended = await stream.read()
                return ended, await stream.code()
        finally:
            await server.stop()

    ended, code = asyncio.run(scenario())  # stop() returned: the open watch did not hold the grace
    assert ended is grpc.aio.EOF and code == grpc.StatusCode.OK


def test_initial_placement_file_is_published_as_epoch_1(tiny_model, tmp_path):
    path = tmp_path / "placement.yaml"
    path.write_text("experts: [[1], [0], [1], [0], [1], [0], [1], [0]]\n")

    async def scenario():
        async with running(tiny_model, placement_file=path) as (_, stub, _ch):
            await form(stub, 2)
            return (await stub.GetPlacement(pb.GetPlacementRequest(), timeout=DEADLINE)).placement

    placement = asyncio.run(scenario())
    assert (placement.epoch, placement.origin) == (1, "file")
    assert [list(s.ranks) for s in placement.layers[1].experts] == [[(e + 1) % 2] for e in range(EXPERTS)]


def test_start_fails_cleanly_without_a_checkpoint(tmp_path):
    async def scenario():
        server = CoordinatorServer(CoordinatorSettings(model_dir=tmp_path, workers=1, port=0))
        try:
            with pytest.raises(ConfigError, match=r"no config\.json"):
                await server.start()
        finally:
            await server.stop()  # safe after a failed start
        return server.store

    assert asyncio.run(scenario()) is None


def test_expert_shards_that_do_not_divide_the_expert_hidden_size_are_refused(tiny_model):
    from moemesh.model.config import load_config

    hidden = load_config(tiny_model).expert_intermediate_size
    bad = next(n for n in range(2, hidden + 1) if hidden % n)

    async def main():
        server = CoordinatorServer(CoordinatorSettings(model_dir=tiny_model, workers=bad, port=0, expert_shards=bad))
        with pytest.raises(ConfigError, match=f"does not split into {bad} equal shards"):
            await server.start()
        await server.stop()

    asyncio.run(main())


def test_a_coordinator_restarted_from_its_state_file_resumes_the_world_on_the_same_store_port(tiny_model, tmp_path):
    """Stop a coordinator with a state file and start another on it: the same TCPStore port, world,
    members and placement, no new generation; the members' heartbeats are accepted and a joiner
    still forms the next generation, its epochs numbered after the restored ones."""
    state_file = tmp_path / "coordinator.state"

    async def first_life():
        async with running(tiny_model, state_file=state_file) as (server, stub, _):
            await form(stub, 2)
            await stub.SetPlacement(pb.SetPlacementRequest(placement=swapped(), expected_epoch=1), timeout=DEADLINE)
            world = await stub.WaitForWorld(pb.WaitForWorldRequest(), timeout=DEADLINE)
            placement = await stub.GetPlacement(pb.GetPlacementRequest(), timeout=DEADLINE)
            return server.store_port, world, placement.placement

    async def second_life():
        async with running(tiny_model, state_file=state_file) as (server, stub, _):
            world = await stub.WaitForWorld(pb.WaitForWorldRequest(), timeout=DEADLINE)
            placement = await stub.GetPlacement(pb.GetPlacementRequest(), timeout=DEADLINE)
            beats = [await stub.Heartbeat(pb.HeartbeatRequest(worker_id=register_request(i).worker_id, incarnation=1),
                                          timeout=DEADLINE) for i in range(2)]
            await stub.RegisterWorker(register_request(2), timeout=DEADLINE)
            joined = await stub.WaitForWorld(pb.WaitForWorldRequest(
                worker_id=register_request(2).worker_id, incarnation=1), timeout=DEADLINE)
            return server.store_port, world, placement.placement, beats, joined

    store_port, world, placement = asyncio.run(first_life())
    again_port, again, restored, beats, joined = asyncio.run(second_life())
    assert again_port == store_port
    assert again == world and restored == placement and restored.epoch == 2
    assert [(b.world_generation, b.placement_epoch) for b in beats] == [(1, 2), (1, 2)]
    assert (joined.generation, joined.world_size, joined.rank, joined.placement_epoch) == (2, 3, 2, 3)
    assert joined.rendezvous.store_port == store_port


def test_a_registration_is_admitted_only_when_its_address_answers_health(tiny_model):
    """By default the coordinator asks a registering worker's address for grpc.health first: an
    address nobody serves is INVALID_ARGUMENT (and no member), one that answers is admitted."""
    from moemesh.rpc import Server

    async def scenario():
        live = Server(["moemesh.v1.Worker"])  # a worker's server before it serves: health answers NOT_SERVING
        port = await live.start("127.0.0.1", 0)
        try:
            async with running(tiny_model, workers=1, registration_probe=True) as (server, stub, _):
                nobody = pb.RegisterWorkerRequest(worker_id="ghost", incarnation=1, address="127.0.0.1:1",
                                                  device="cpu", node="n")
                details = await expect_code(grpc.StatusCode.INVALID_ARGUMENT,
                                            stub.RegisterWorker(nobody, timeout=DEADLINE))
                assert "nothing answers grpc.health at 127.0.0.1:1" in details
                assert server.state.membership.members == ()  # not registered
                real = pb.RegisterWorkerRequest(worker_id="real", incarnation=1, address=f"127.0.0.1:{port}",
                                                device="cpu", node="n")
                reply = await stub.RegisterWorker(real, timeout=DEADLINE)
                assert (reply.world_size, reply.world_generation) == (1, 1)
        finally:
            await live.stop(0)

    asyncio.run(scenario())
