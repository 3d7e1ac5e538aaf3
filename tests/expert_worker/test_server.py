"""Expert workers in a real mesh: placement epochs switch mid-generation without changing a token;
each worker holds only its own experts."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import pytest

from moemesh.chaos import Outcome, make_requests, reference, run_load
from moemesh.client import Client, TokenChunk
from moemesh.engine.engine import Engine, generate
from moemesh.engine.sampling import SamplingParams
from moemesh.launch import MeshSpec, running
from moemesh.model.decoder import RuntimeShape, build_model
from moemesh.model.tiny import TinySpec, write_tiny_model
from moemesh.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from tests.moemesh.epoch_watch import first_worker, watch_stream

pytestmark = pytest.mark.slow  # starts meshes of real processes

SPEC = TinySpec(arch="mixtral", layers=2, experts=16, top_k=2, hidden=128, intermediate=1024, heads=4, kv_heads=2,
                vocab=512, seed=3)
PROMPTS = [[0, 11, 12, 13], [0, 200], [0, 7, 7, 7, 7, 7], [0, 450, 451]]
NEW_TOKENS = 240


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("w") / "model", SPEC)


@pytest.fixture(scope="module")
def mesh4(model, mesh_factory):
    """One 4-worker mesh for the module: what its tests check of it holds in every epoch (each
    worker holds 4 experts per layer, a quarter of the bytes)."""
    return mesh_factory(model, 4)


async def _worker_addresses(coordinator: str) -> list[str]:
    async with grpc.aio.insecure_channel(coordinator) as ch:
        world = await coordinator_pb2_grpc.CoordinatorStub(ch).WaitForWorld(
            coordinator_pb2.WaitForWorldRequest(), timeout=10)
    return [m.address for m in world.members]


async def _worker_status(coordinator: str) -> list[worker_pb2.WorkerStatus]:
    out = []
    for address in await _worker_addresses(coordinator):
        async with grpc.aio.insecure_channel(address) as ch:
            out.append(await worker_pb2_grpc.WorkerStub(ch).Status(worker_pb2.StatusRequest(), timeout=10))
    return out


async def _move_every_expert(coordinator: str) -> None:
    """Expert e moves from rank e mod 4 to rank (e + 1) mod 4, in every layer (SetPlacement RPC;
    the `moemesh placement set` command is tested with the coordinator)."""
    async with grpc.aio.insecure_channel(coordinator) as ch:
        stub = coordinator_pb2_grpc.CoordinatorStub(ch)
        current = (await stub.GetPlacement(coordinator_pb2.GetPlacementRequest(), timeout=10)).placement
        new = coordinator_pb2.Placement(world_generation=current.world_generation, world_size=4)
        for layer in current.layers:
            lp = new.layers.add(layer=layer.layer)
            for e in range(len(layer.experts)):
                lp.experts.add(ranks=[(e + 1) % 4])
        await stub.SetPlacement(coordinator_pb2.SetPlacementRequest(placement=new, expected_epoch=current.epoch),
                                timeout=10)


async def _generate_while_moving_experts(mesh):
    """Stream every prompt; once each has tokens, publish a new placement. Prompt 0's stream reads
    rank 0's placement epoch after every chunk (tests/moemesh/epoch_watch.py)."""
    tokens: list[list[int]] = [[] for _ in PROMPTS]
    started, watching = asyncio.Event(), asyncio.Event()
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    worker = await first_worker(mesh.coordinator)

    async with Client(mesh.gateway, timeout=120) as client:
        async def one(i: int) -> None:
            async for ev in client.generate(token_ids=PROMPTS[i], params=params):
                if isinstance(ev, TokenChunk):
                    tokens[i].extend(ev.token_ids)
                    if all(tokens[1:]):
                        started.set()

        async def watched():
            return await watch_stream(client, worker, PROMPTS[0], params, watching)

        async def move() -> None:
            await started.wait()
            await watching.wait()
            await _move_every_expert(mesh.coordinator)

        watch, *_ = await asyncio.gather(watched(), move(), *(one(i) for i in range(1, len(PROMPTS))))
    tokens[0] = watch.token_ids
    return tokens, watch


def test_each_worker_holds_a_quarter_of_the_experts(model, mesh_factory, mesh4):
    whole = mesh_factory(model, 1)
    alone = asyncio.run(_worker_status(whole.coordinator))[0]
    assert whole.stop() == []
    statuses = asyncio.run(_worker_status(mesh4.coordinator))
    total = alone.expert_bytes
    assert total == SPEC.layers * SPEC.experts * 3 * SPEC.hidden * SPEC.intermediate * 4
    for s in statuses:
        assert s.expert_bytes == total // 4
        assert [len(layer.expert_ids) for layer in s.experts] == [4, 4]
        # RSS: the expert weights a worker does not hold are not in its memory either.
        assert alone.rss_bytes - s.rss_bytes > 0.6 * (total - s.expert_bytes), (alone.rss_bytes, s.rss_bytes)


def test_epoch_switch_mid_generation_changes_no_token_and_moves_experts(model, mesh4, tmp_path):
    engine = Engine(build_model(model, RuntimeShape(max_seqs=4, max_model_len=256)))
    expected = generate(engine, PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    mesh = mesh4
    before = asyncio.run(_worker_status(mesh.coordinator))
    tokens, watch = asyncio.run(_generate_while_moving_experts(mesh))

    assert tokens == expected
    switches = watch.switched_mid_stream()
    assert [(old, new) for _, old, new in switches] == [(1, 2)], f"no switch seen mid-stream: {watch.seen}"
    after = asyncio.run(_worker_status(mesh.coordinator))
    for old, new in zip(before, after):
        moved_here = [e for e in range(16) if (e + 1) % 4 == new.rank]
        assert [list(layer.expert_ids) for layer in new.experts] == [moved_here, moved_here]
        assert old.rank == new.rank and new.loaded_epoch == 2
        # Every step ran dispatch and combine exchanges; hidden is a part of their flight time.
        assert new.exchange_seconds > old.exchange_seconds and new.steps > old.steps
        assert 0 <= new.hidden_seconds <= new.exchange_seconds
    _dump_trace_and_plan(mesh, model, tmp_path)


def _dump_trace_and_plan(mesh, model, tmp_path) -> None:
    """The running mesh's measured routing, dumped as a trace, is what `moemesh plan` reads."""
    import json
    import subprocess
    import sys

    trace = tmp_path / "trace.json"
    cli = [sys.executable, "-m", "moemesh.cli"]
    out = subprocess.run([*cli, "placement", "trace", str(trace), "--coordinator", mesh.coordinator],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert len(json.loads(trace.read_text())["layers"][0]["tokens"]) == 4  # measured per source rank
    shown = subprocess.run([*cli, "placement", "show", "--coordinator", mesh.coordinator],
                           capture_output=True, text=True, timeout=60)
    assert "link load" in shown.stdout and shown.returncode == 0
    planned = subprocess.run([*cli, "plan", "--topology", "local", "--devices", "4", "--trace", str(trace),
                              "--model", str(model), "--out", str(tmp_path / "plan.png")],
                             capture_output=True, text=True, timeout=120)
    assert planned.returncode == 0, planned.stderr
    assert (tmp_path / "plan.png").stat().st_size > 0


def _coldest_experts(model_dir, prompts, params, experts: int) -> dict[int, int]:
    """Per MoE layer, the expert these prompts route to least (counted in the local engine)."""
    model = build_model(model_dir, RuntimeShape(max_seqs=len(prompts), max_model_len=256))
    counts: dict[int, list[int]] = {}
    inner = model.moe.router

    def counting(x, weight, layer):
        routing = inner(x, weight, layer)
        row = counts.setdefault(layer, [0] * experts)
        for e in routing.expert_ids.reshape(-1).tolist():
            row[e] += 1
        return routing

    model.moe.router = counting
    generate(Engine(model), prompts, params)
    return {layer: row.index(min(row)) for layer, row in counts.items()}


# The watched request (prompt 0) outlives the others by far, so the policy acts while it still
# generates, whatever the batching and the machine's load (at 100 tokens like the others, a switch
# once landed exactly on its last chunk). Prompt + 240 tokens fits the mesh's 256.
WATCHED = SamplingParams(max_new_tokens=240, ignore_eos=True)


def _expected(model, params: SamplingParams) -> list[list[int]]:
    """The local engine's tokens: prompt 0 with WATCHED, the others with `params`."""
    engine = Engine(build_model(model, RuntimeShape(max_seqs=4, max_model_len=256)))
    return generate(engine, PROMPTS[:1], WATCHED) + generate(engine, PROMPTS[1:], params)


async def _generate_watched(mesh, params: SamplingParams):
    """Every prompt at once, prompt 0's stream (WATCHED) watching rank 0's epoch: (tokens, ModelInfo, watch)."""
    worker = await first_worker(mesh.coordinator)
    async with Client(mesh.gateway, timeout=300) as client:
        watch, *done = await asyncio.gather(watch_stream(client, worker, PROMPTS[0], WATCHED),
                                            *(client.generate_text(token_ids=p, params=params) for p in PROMPTS[1:]))
        return [watch.token_ids, *(list(d.token_ids) for d in done)], await client.model_info(), watch


def test_replicate_policy_rebalances_during_live_generation_without_changing_a_token(mesh_factory, tmp_path):
    """4 experts on 5 workers: the spare worker starts with a replica of the coldest expert; policy
    "replicate" moves it to a hot one while requests run. Nothing is lost, no token changes."""
    import dataclasses

    import yaml

    model = write_tiny_model(tmp_path / "model", dataclasses.replace(SPEC, experts=4, hidden=64, intermediate=128))
    params = SamplingParams(max_new_tokens=100, ignore_eos=True)  # 400 tokens: several rebalance cycles
    expected = _expected(model, params)
    cold = _coldest_experts(model, PROMPTS, params, experts=4)
    layers = {layer: [[e] + ([4] if e == cold[layer] else []) for e in range(4)] for layer in cold}
    placement = tmp_path / "cold-replica.yaml"
    placement.write_text(yaml.safe_dump({"world_size": 5, "layers": layers}))
    mesh = mesh_factory(model, 5, "--policy", "replicate", "--placement", str(placement))

    tokens, info, watch = asyncio.run(_generate_watched(mesh, params))
    assert info.balancing_policy == "replicate"
    assert tokens == expected
    assert info.placement_epoch > 1, "the coordinator never rebalanced"
    assert watch.switched_mid_stream(), f"no epoch switch seen while generating: {watch.seen}"


def test_the_first_placements_gating_factors_route_from_the_first_token(mesh_factory, tmp_path):
    """A mesh started from a placement file with gating factors (policy none: nothing changes them)
    routes with those factors from its first step, as a single process whose router has them."""
    import dataclasses

    import torch
    import yaml

    model = write_tiny_model(tmp_path / "model", dataclasses.replace(SPEC, experts=4, hidden=64, intermediate=128))
    factors = [1.0, 0.1, 0.1, 1.0]  # damp experts 1 and 2 in every MoE layer
    placement = tmp_path / "gated.yaml"
    placement.write_text(yaml.safe_dump({"experts": [[0], [1], [0], [1]], "gating": factors}))
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    alone = build_model(model, RuntimeShape(max_seqs=4, max_model_len=256))
    exact = generate(Engine(alone), PROMPTS, params)
    alone.moe.router.factors = {layer: torch.tensor(factors) for layer in range(SPEC.layers)}
    gated = generate(Engine(alone), PROMPTS, params)
    assert gated != exact  # the factors change this model's routing
    mesh = mesh_factory(model, 2, "--policy", "none", "--placement", str(placement))

    async def served():
        async with Client(mesh.gateway, timeout=120) as client:
            return [list((await client.generate_text(token_ids=p, params=params)).token_ids) for p in PROMPTS]

    assert asyncio.run(served()) == gated


def test_split_policy_splits_hot_experts_live_without_changing_a_token(mesh_factory, tmp_path):
    """4 experts on 4 workers, policy "split": a straggling worker's hot expert is split with the
    least busy worker (tensor parallelism inside an expert) while requests run."""
    import dataclasses

    model = write_tiny_model(tmp_path / "model", dataclasses.replace(SPEC, experts=4, hidden=64, intermediate=128))
    params = SamplingParams(max_new_tokens=100, ignore_eos=True)
    expected = _expected(model, params)
    mesh = mesh_factory(model, 4, "--policy", "split")

    tokens, info, watch = asyncio.run(_generate_watched(mesh, params))
    assert info.balancing_policy == "split" and info.placement_epoch > 1, "the coordinator never split"
    assert tokens == expected
    assert watch.switched_mid_stream(), f"no epoch switch seen while generating: {watch.seen}"
    statuses = asyncio.run(_worker_status(mesh.coordinator))
    assert sum(s.expert_bytes for s in statuses) == SPEC.layers * 4 * 3 * 64 * 128 * 4  # shards: no extra copy
    assert any(len(layer.expert_ids) > 1 for s in statuses for layer in s.experts)  # a partner holds a shard


# ---- faults: a worker stopped, terminated or joining while the mesh serves (issue 11) ----------

FAULT_SPEC = TinySpec(layers=2, experts=8, hidden=64, intermediate=96, heads=4, kv_heads=2, vocab=300)
FAULT_WORKER_FLAGS = ("--threads", "1", "--max-seqs", "8")
QUICK_EVICTION = ("--heartbeat-timeout", "3", "--heartbeat-interval", "0.5")
HANG_S = 120.0  # bounds a hang only: a request's deadline, a process's exit, a condition polled for
# Longer than every hang bound: healing from a stalled peer must not wait for a collective to time
# out (eviction after --heartbeat-timeout and the abandoned wait are enough).
NEVER_TIMES_OUT = ("--collective-timeout", "600")


@pytest.fixture(scope="module")
def fault_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("faults") / "model", FAULT_SPEC)


def _fault_mesh(model, tmp_path, workers: int, worker_flags: tuple[str, ...] = ()) -> MeshSpec:
    return MeshSpec(model=model, workers=workers, state_dir=tmp_path, log_dir=tmp_path / "logs",
                    coordinator_flags=QUICK_EVICTION, worker_flags=(*FAULT_WORKER_FLAGS, *worker_flags),
                    env={"OMP_NUM_THREADS": "1"}, start_timeout_s=HANG_S)


async def _world(coordinator: str) -> coordinator_pb2.World:
    async with grpc.aio.insecure_channel(coordinator) as ch:
        return await coordinator_pb2_grpc.CoordinatorStub(ch).WaitForWorld(
            coordinator_pb2.WaitForWorldRequest(), timeout=10)


async def _status_of(coordinator: str, worker_id: str) -> worker_pb2.WorkerStatus:
    member = next(m for m in (await _world(coordinator)).members if m.worker_id == worker_id)
    async with grpc.aio.insecure_channel(member.address) as ch:
        return await worker_pb2_grpc.WorkerStub(ch).Status(worker_pb2.StatusRequest(), timeout=10)


async def _until(condition, what: str) -> None:
    """Poll the async `condition()` until it holds; AssertionError after HANG_S (a hang bound)."""
    deadline = time.monotonic() + HANG_S
    while not await condition():
        assert time.monotonic() < deadline, f"{what}: not within {HANG_S:.0f} s"
        await asyncio.sleep(0.1)


async def _info(gateway: str):
    async with Client(gateway) as client:
        return await client.model_info()


async def _load_with_fault(mesh, requests, worker_id: str, fault) -> list[Outcome]:
    """Run `requests` through the gateway; once `worker_id` runs some of them, call `fault()` (in a
    thread: it may block)."""
    load = asyncio.create_task(run_load(mesh.gateway, requests, concurrency=len(requests), timeout_s=HANG_S))

    async def busy() -> bool:
        assert not load.done(), f"the load ended before {worker_id} ran any request"
        return (await _status_of(mesh.coordinator, worker_id)).running_requests > 0

    await _until(busy, f"{worker_id} running requests")
    await asyncio.to_thread(fault)
    outcomes, _ = await load
    return outcomes


def _round(mesh, requests) -> list[Outcome]:
    outcomes, _ = asyncio.run(run_load(mesh.gateway, requests, concurrency=len(requests), timeout_s=HANG_S))
    return outcomes


def _check(outcomes: list[Outcome], expected: list[list[int]]) -> None:
    assert [o.error for o in outcomes] == [""] * len(expected)
    assert [o.tokens for o in outcomes] == expected


def test_a_worker_stopped_past_the_timeout_is_evicted_its_requests_migrate_and_it_exits_on_sigcont(
        fault_model, tmp_path):
    """SIGSTOP a worker while it runs requests: the coordinator evicts it (no heartbeat) and forms
    a world without it, its peers give up their waits on it and enter that world at once (not at
    --collective-timeout), the gateway closes its stream and migrates its requests: every request
    ends with the reference tokens. SIGCONT: the worker finds itself evicted and exits 1; the mesh
    still serves correctly."""
    requests = make_requests(6, FAULT_SPEC.vocab, max_new_tokens=24, seed=5)
    expected = reference(fault_model, requests, max_model_len=256)
    with running(_fault_mesh(fault_model, tmp_path, 3, NEVER_TIMES_OUT)) as mesh:
        before = asyncio.run(_info(mesh.gateway))
        stopped = mesh.procs["worker1"]
        try:
            during = asyncio.run(_load_with_fault(mesh, requests, "worker-1",
                                                  lambda: os.kill(stopped.pid, signal.SIGSTOP)))
            evicted = asyncio.run(_info(mesh.gateway))
        finally:
            os.kill(stopped.pid, signal.SIGCONT)
        code = stopped.wait(timeout=HANG_S)
        after = _round(mesh, requests)
        last = asyncio.run(_info(mesh.gateway))
    _check(during, expected)
    _check(after, expected)
    assert evicted.world_generation > before.world_generation
    assert evicted.num_workers == evicted.live_workers == 2
    assert code == 1, "an evicted worker exits 1"
    assert (last.num_workers, last.live_workers, last.not_serving_reason) == (2, 2, "")


def test_a_terminated_worker_leaves_under_load_losing_no_request_and_exits_0(fault_model, tmp_path):
    """SIGTERM is a leave: the worker stops taking requests, its requests migrate with their
    tokens, the world shrinks without it, and it exits 0."""
    requests = make_requests(6, FAULT_SPEC.vocab, max_new_tokens=24, seed=6)
    expected = reference(fault_model, requests, max_model_len=256)
    codes: list[int] = []
    with running(_fault_mesh(fault_model, tmp_path, 3)) as mesh:
        before = asyncio.run(_info(mesh.gateway))
        outcomes = asyncio.run(_load_with_fault(mesh, requests, "worker-1",
                                                lambda: codes.append(mesh.terminate("worker1", timeout_s=HANG_S))))
        after = asyncio.run(_info(mesh.gateway))
    _check(outcomes, expected)
    assert codes == [0]
    assert after.world_generation > before.world_generation
    assert (after.num_workers, after.live_workers) == (2, 2)


def test_a_late_joiner_gets_a_new_generation_experts_and_requests(fault_model, tmp_path):
    """A 2-worker mesh serves; a third worker starts with the launcher's worker flags: a new world
    generation lists it, the placement gives it experts, it runs requests, outputs stay exact."""
    requests = make_requests(6, FAULT_SPEC.vocab, max_new_tokens=16, seed=7)
    expected = reference(fault_model, requests, max_model_len=256)
    spec = _fault_mesh(fault_model, tmp_path, 2)
    with running(spec) as mesh:
        first = _round(mesh, requests)
        before = asyncio.run(_info(mesh.gateway))
        mesh.processes.start("worker2", ["worker", "--coordinator", mesh.coordinator, "--port", "0",
                                         "--worker-id", "worker-2", *spec.worker_flags])

        async def three_live() -> bool:
            info = await _info(mesh.gateway)
            return info.num_workers == info.live_workers == 3

        asyncio.run(_until(three_live, "the gateway serving a world of 3"))
        world = asyncio.run(_world(mesh.coordinator))
        placement = asyncio.run(_placement(mesh.coordinator))
        second = _round(mesh, requests)
        joiner = asyncio.run(_status_of(mesh.coordinator, "worker-2"))
    _check(first, expected)
    _check(second, expected)
    assert world.generation > before.world_generation
    rank = next(m.rank for m in world.members if m.worker_id == "worker-2")
    assert placement.world_generation == world.generation
    assert any(rank in slots.ranks for layer in placement.layers for slots in layer.experts)
    assert joiner.world_generation == world.generation and joiner.rank == rank
    assert sum(len(layer.expert_ids) for layer in joiner.experts) > 0
    assert joiner.steps > 0 and joiner.tokens > 0, "the joiner ran no request"


async def _placement(coordinator: str) -> coordinator_pb2.Placement:
    async with grpc.aio.insecure_channel(coordinator) as ch:
        reply = await coordinator_pb2_grpc.CoordinatorStub(ch).GetPlacement(
            coordinator_pb2.GetPlacementRequest(), timeout=10)
    return reply.placement
