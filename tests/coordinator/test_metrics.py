"""The coordinator's metrics: a real CoordinatorState driven through worlds, epochs, a rebalance and
an eviction, its registry served over HTTP and scraped back (the mesh test in
tests/expert_worker/test_metrics.py checks them against a running coordinator)."""

from __future__ import annotations

from dataclasses import replace

import torch

from coordinator.metrics import CoordinatorMetrics
from coordinator.policies import ModelFacts, RebalanceSettings
from coordinator.state import CoordinatorState
from coordinator.wire import worker_info, world_to_proto
from coordinator.worlds import DataPlane, bytes_moved
from moemesh.mesh.placement import initial_placement, whole_replicas, with_split
from moemesh.metrics import new_registry, scrape, serve_metrics, value
from moemesh.v1 import coordinator_pb2 as pb

LAYERS = (0, 1)
EXPERTS = 8
FACTS = ModelFacts(top_k=2, hidden_size=16, expert_intermediate_size=32, dtype_bytes=4)
EXPERT_BYTES = 3 * 16 * 32 * 4  # one fp32 expert of FACTS
NAMES = ("world_generation", "placement_epoch", "world_members", "world_servable", "world_generations_total",
         "recoveries_total", "evictions_total", "rebalances_total", "expert_bytes_moved_total")


def registration(i: int) -> pb.RegisterWorkerRequest:
    return pb.RegisterWorkerRequest(worker_id=f"w{i}", incarnation=1, address=f"127.0.0.1:{6000 + i}",
                                    metrics_address=f"127.0.0.1:{7000 + i}", device="cpu", node="node0")


def read(state: CoordinatorState) -> dict[str, float]:
    registry = new_registry()
    registry.register(CoordinatorMetrics(state, "tiny"))
    server = serve_metrics(registry, "127.0.0.1", 0)
    assert server is not None
    try:
        samples = scrape(server.address)
    finally:
        server.stop()
    assert {s.labels["model_name"] for s in samples if s.name.startswith("moemesh:")} == {"tiny"}
    return {name: value(samples, f"moemesh:{name}") for name in NAMES}


def test_worlds_epochs_rebalances_and_evictions_are_counted():
    s = CoordinatorState(num_experts=EXPERTS, moe_layer_ids=LAYERS, expected_workers=4,
                         data_plane=DataPlane("gloo", "127.0.0.1", 1), facts=FACTS,
                         rebalance=RebalanceSettings(policy="gating", update_every_tokens=100))
    assert read(s)["world_generation"] == 0
    for i in range(4):
        s.register(worker_info(registration(i)))
    assert read(s) == {**dict.fromkeys(NAMES, 0.0), "world_generation": 1, "placement_epoch": 1,
                       "world_members": 4, "world_servable": 1, "world_generations_total": 1}

    # The world lists each member's metrics address as it registered.
    assert world_to_proto(s.world, -1).members[2].metrics_address == "127.0.0.1:7002"

    # An operator moves expert 0 of layer 0 to rank 1 (one whole expert loaded) ...
    holders = {layer: list(table) for layer, table in s.current().placement.layers.items()}
    holders[0][0] = (1,)
    s.set_placement(whole_replicas(0, 4, holders), world_generation=1)
    # ... and the gating policy, fed a skewed router, changes factors only (nothing loaded).
    skewed = torch.zeros(len(LAYERS), EXPERTS, dtype=torch.int64)
    skewed[:, 0] = 200
    assert s.report_load("w0", 1, 1, 100, skewed)
    after = read(s)
    assert (after["placement_epoch"], after["rebalances_total"]) == (3, 1)
    assert after["expert_bytes_moved_total"] == EXPERT_BYTES

    # A dead worker: evicted, the next world formed without it (a recovery), its levelling epoch
    # after the first one counted as moved bytes; the re-formed world's first epoch is not (new ranks).
    s.report_world_lost("w0", 1, 1, "peer gone")
    s.evict(s.world.members[3], "did not answer a health probe")
    world = s.form_next_world()
    assert world is not None
    levelled = bytes_moved(s.published(world.placement_epoch).placement, s.current().placement, EXPERT_BYTES)
    got = read(s)
    assert (got["world_generation"], got["world_members"], got["world_generations_total"]) == (2, 3, 2)
    assert (got["recoveries_total"], got["evictions_total"], got["placement_epoch"]) == (1, 1, s.newest_epoch)
    assert got["expert_bytes_moved_total"] == EXPERT_BYTES + levelled


def test_bytes_moved_counts_new_pieces_and_cuts_shards_for_free():
    p = initial_placement(EXPERTS, LAYERS, 4)
    assert bytes_moved(p, p, EXPERT_BYTES) == 0
    # Expert 1 of layer 0 is on rank 1; split over (1, 2): rank 1 cuts its shard, rank 2 loads half.
    split = with_split(p, 0, 1, (1, 2))
    assert bytes_moved(p, split, EXPERT_BYTES) == EXPERT_BYTES // 2
    # Back to whole on rank 2: a whole expert loaded there (it held half).
    holders = {layer: list(table) for layer, table in p.layers.items()}
    holders[0][1] = (2,)
    assert bytes_moved(split, whole_replicas(2, 4, holders), EXPERT_BYTES) == EXPERT_BYTES
    # A replica of every expert of layer 1 on rank 3 that it does not hold yet.
    more = {**holders, 1: [tuple(sorted({*g, 3})) for g in holders[1]]}
    extra = sum(1 for g in holders[1] if 3 not in g)
    assert bytes_moved(replace(p, epoch=1), whole_replicas(3, 4, more), EXPERT_BYTES) == (1 + extra) * EXPERT_BYTES
