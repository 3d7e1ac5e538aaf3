"""The workers' and the coordinator's metrics after a known load through a real mesh.

Coordinator, 2 gloo workers and a gateway run as processes; the load goes through the gRPC client
(greedy, ignore_eos, known prompts and max_new_tokens); every endpoint is scraped with a real HTTP
GET and parsed with prometheus_client's text parser. Each request of P prompt tokens making M
tokens runs P + M - 1 tokens through the forward pass of the rank it is on (its prompt once, then
one decode token per step but the last token's, which is sampled and never fed back), and its
router sends K copies of each to experts in every MoE layer: the exact numbers asserted below.
"""

from __future__ import annotations

import asyncio

import pytest

from moemesh.client import Client, Finished
from moemesh.engine.sampling import SamplingParams
from moemesh.metrics import by_label, scrape, value
from moemesh.model.config import load_config
from moemesh.rpc import channel
from moemesh.v1 import coordinator_pb2, coordinator_pb2_grpc
from tests.gateway.mesh import running_mesh, settled

pytestmark = pytest.mark.slow  # starts a mesh of real processes

PROMPTS = [[3, 4, 5], [7] * 9, [11, 12, 13, 14, 15, 16], [20, 21], [30] * 5]
NEW_TOKENS = 6
DEADLINE_S = 60.0


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory):
    with running_mesh(tmp_path_factory.mktemp("worker-metrics")) as m:
        yield m


async def world_of(coordinator: str) -> coordinator_pb2.World:
    async with channel(coordinator) as ch:
        return await coordinator_pb2_grpc.CoordinatorStub(ch).WaitForWorld(
            coordinator_pb2.WaitForWorldRequest(), timeout=5)


async def send_load(gateway: str) -> list[Finished]:
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)

    async def one(prompt: list[int]) -> Finished:
        async with Client(gateway, timeout=DEADLINE_S) as client:
            return (await client.generate_text(token_ids=prompt, params=params)).finished

    return list(await asyncio.gather(*(one(p) for p in PROMPTS)))


def scrape_workers(world: coordinator_pb2.World) -> dict[int, list]:
    return {m.rank: scrape(m.metrics_address) for m in world.members}


def test_routed_counts_equal_the_load_times_top_k(mesh):
    cfg = load_config(mesh.model_dir)
    world = asyncio.run(world_of(mesh.coordinator))
    assert len(world.members) == 2 and all(m.metrics_address for m in world.members)
    before = scrape_workers(world)
    finished = asyncio.run(send_load(mesh.gateway))
    asyncio.run(settled(mesh.coordinator))
    after = scrape_workers(world)

    assert [f.completion_tokens for f in finished] == [NEW_TOKENS] * len(PROMPTS)
    expected_tokens = sum(len(p) + NEW_TOKENS - 1 for p in PROMPTS)
    tokens = {r: value(after[r], "moemesh:step_tokens_total") - value(before[r], "moemesh:step_tokens_total")
              for r in after}
    assert sum(tokens.values()) == expected_tokens
    copies = 0.0
    for rank, samples in after.items():
        routed = by_label(samples, "moemesh:expert_tokens_routed_total", "layer")
        was = by_label(before[rank], "moemesh:expert_tokens_routed_total", "layer")
        assert sorted(int(layer) for (layer,) in routed) == sorted(cfg.moe_layer_ids)
        for layer, n in routed.items():
            assert n - was.get(layer, 0.0) == tokens[rank] * cfg.top_k, (rank, layer)  # every token, K copies
        copies += sum(routed.values()) - sum(was.values())
    assert copies == expected_tokens * cfg.top_k * len(cfg.moe_layer_ids)

    # Every copy crossed its link twice: dispatch (D + 1 fp32 values) and combine (D values).
    link_bytes = sum(value(after[r], "moemesh:link_bytes_total") - value(before[r], "moemesh:link_bytes_total")
                     for r in after)
    assert link_bytes == copies * (2 * cfg.hidden_size + 1) * 4

    # What the collectives sent: each rank counts only what it sent (src = its rank), never to
    # itself, and all of them at least the payload that crossed between ranks (plus padding rows
    # and step headers).
    def crossing(samples) -> float:
        return sum(n for (src, dst), n in by_label(samples, "moemesh:link_bytes_total", "src_rank", "dst_rank").items()
                   if src != dst)

    crossed = sum(crossing(after[r]) - crossing(before[r]) for r in after)
    sent = 0.0
    for rank, samples in after.items():
        rows = by_label(samples, "moemesh:collective_bytes_total", "src_rank", "dst_rank")
        was = by_label(before[rank], "moemesh:collective_bytes_total", "src_rank", "dst_rank")
        assert rows and {src for src, _ in rows} == {str(rank)} and all(dst != src for src, dst in rows)
        sent += sum(rows.values()) - sum(was.values())
    assert crossed > 0 and sent >= crossed


def test_idle_gauges_and_generation_match_the_coordinator(mesh):
    world = asyncio.run(world_of(mesh.coordinator))
    asyncio.run(settled(mesh.coordinator))
    coordinator = scrape(mesh.metrics()["coordinator"])
    assert value(coordinator, "moemesh:world_generation") == world.generation
    assert value(coordinator, "moemesh:world_members") == len(world.members) == 2
    epoch = value(coordinator, "moemesh:placement_epoch")
    assert epoch >= world.placement_epoch >= 1
    name = mesh.model_dir.resolve().name
    for rank, samples in scrape_workers(world).items():
        for gauge in ("moemesh:num_requests_running", "moemesh:num_requests_waiting", "moemesh:kv_slots_used",
                      "moemesh:kv_cache_usage_perc"):
            assert value(samples, gauge, model_name=name) == 0, (rank, gauge)
        assert value(samples, "moemesh:kv_slots_total") == 8  # --max-seqs of tests.gateway.mesh
        assert value(samples, "moemesh:world_generation") == world.generation
        assert value(samples, "moemesh:placement_epoch") == epoch
    gateway = scrape(mesh.metrics()["gateway"])
    assert value(gateway, "moemesh:world_generation") == world.generation
    assert value(gateway, "moemesh:live_workers") == 2
