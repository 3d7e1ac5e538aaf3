"""Expert workers in a real mesh: placement epochs switch mid-generation without changing a token;
each worker holds only its own experts."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from moemesh.client import Client, TokenChunk
from moemesh.engine.engine import Engine, generate
from moemesh.engine.sampling import SamplingParams
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
