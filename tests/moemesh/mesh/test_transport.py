"""The all-to-all transport: over real gloo process groups it equals the local MoE layer; over the
loopback collective, copies of replicated experts travel where the routing rule says."""

from __future__ import annotations

import multiprocessing as mp
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from moemesh.mesh.gloo import init_gloo
from moemesh.mesh.loopback import LoopbackWorld, run_world
from moemesh.mesh.placement import Placement
from moemesh.mesh.routing_counts import LoadRecorder
from moemesh.mesh.transport import AllToAllTransport, send_rows
from moemesh.model.moe import (
    GroupedExperts,
    LocalTransport,
    MoELayer,
    Routing,
)
from moemesh.model.routers import SoftmaxTopKRouter
from moemesh.model.weights import LayerExperts, shard_weights

E, D, F, K = 6, 16, 24, 2
TOKENS = (5, 0, 3)  # rank 1 has nothing to run: it must still join both exchanges


def _weights():
    g = torch.Generator().manual_seed(0)
    w13 = torch.randn(E, D, 2 * F, generator=g)  # (E, D, 2F)
    w2 = torch.randn(E, D, F, generator=g)  # (E, D, F)
    router = torch.randn(E, D, generator=g)  # (E, D)
    xs = [torch.randn(t, D, generator=g) for t in TOKENS]
    return w13, w2, router, xs


def _layer(placement: Placement, rank: int, w13, w2) -> LayerExperts:
    """What `rank` holds of layer 0: whole experts and shards, cut from the full weights."""
    ids, shards = placement.experts_on(rank, 0), placement.pieces_on(rank, 0)
    pieces = [shard_weights(w13[e], w2[e], shard) for e, shard in zip(ids, shards)]  # (D, 2F/S), (D, F/S)
    return LayerExperts(ids, tuple(a for a, _ in pieces), tuple(b for _, b in pieces), shards)


def _rank_main(rank: int, port: int, placement: Placement, overflow: str, out: mp.Queue) -> None:
    torch.set_num_threads(1)
    w13, w2, router, xs = _weights()
    collective = init_gloo("127.0.0.1", port, "test/", rank, len(TOKENS), timeout_s=30)
    recorder = LoadRecorder.for_placement(placement)
    transport = AllToAllTransport(collective, placement, observer=recorder)
    experts = GroupedExperts({0: _layer(placement, rank, w13, w2)})
    layer = MoELayer(SoftmaxTopKRouter(K, True, overflow, capacity_factor=0.6), transport, experts, recorder)
    y = layer(0, xs[rank], router, t_max=max(TOKENS))
    sample = recorder.take()
    assert sample.link_counts.shape == (1, len(TOKENS))
    pieces, copies = int(sample.link_counts.sum()), int(sample.expert_counts.sum())
    assert pieces == copies if not placement.has_shard_groups else pieces >= copies  # a split expert's copy fans out
    out.put((rank, y.numpy(), sample.expert_counts.numpy(), sample.tokens))  # by value: the child may exit first
    collective.close()


def _run_mesh(placement: Placement, overflow: str) -> dict[int, tuple]:
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, store.port, placement, overflow, out)) for r in range(len(TOKENS))]
    try:
        for p in procs:
            p.start()
        results = {}
        for _ in procs:
            rank, y, counts, tokens = out.get(timeout=120)
            results[rank] = (torch.from_numpy(y), torch.from_numpy(counts), tokens)
        return results
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


# One real-gloo case: the mixed split + replica placement under drop exercises every transport path
# (shards fanning out, replicas, dropped copies, a rank with no tokens). The other placements
# (round robin, replicas, drop, split) run in-process over the loopback collective in
# tests/moemesh/model/test_moe.py: same transport code, no process world to start.
MIXED = Placement(epoch=3, world_size=3, replicas={0: (((0,),), ((0,), (1, 2)), ((2, 0, 1),), ((2,),), ((0, 1),),
                                                       ((1,), (2,)))})


@pytest.mark.slow  # spawns a gloo world of 3 processes
@pytest.mark.parametrize("placement, overflow", [(MIXED, "drop")], ids=["mixed-split-and-replica"])
def test_mesh_moe_layer_equals_local(placement, overflow):
    w13, w2, router, xs = _weights()
    local = MoELayer(SoftmaxTopKRouter(K, True, overflow, capacity_factor=0.6), LocalTransport(E),
                     GroupedExperts({0: LayerExperts.stacked(tuple(range(E)), w13, w2)}))
    expected = [local(0, x, router) for x in xs]  # capacity is per rank's own tokens
    results = _run_mesh(placement, overflow)
    routed = torch.zeros(E, dtype=torch.int64)
    for rank, (y, counts, tokens) in results.items():
        assert y.shape == (TOKENS[rank], D)
        torch.testing.assert_close(y, expected[rank], rtol=1e-5, atol=1e-5)
        assert tokens == TOKENS[rank]
        routed += counts[0]
    kept = sum(int((local.router(x, router, 0).expert_ids >= 0).sum()) for x in xs)
    assert int(routed.sum()) == kept <= sum(TOKENS) * K
    assert (kept < sum(TOKENS) * K) == (overflow == "drop")


def test_send_rows_pack_each_destination_block():
    dest = torch.tensor([2, 0, 2, 1, 0, 2])  # (T*K,)
    rows, overflow = send_rows(dest, world_size=3, capacity=4)
    assert rows.tolist() == [8, 0, 9, 4, 1, 10]
    assert not bool(overflow)


def test_send_rows_send_padding_nowhere_and_flag_an_overflow():
    dest = torch.tensor([1, -1, 1, 0, 1])  # (P,) -1 = not sent
    rows, overflow = send_rows(dest, world_size=2, capacity=2)
    assert rows.tolist() == [2, 4, 3, 0, 4]  # 4 = R*C: nowhere (padding, and the third piece for rank 1)
    assert bool(overflow)


# ---- replica routing: where the copies travel (loopback collective, ranks as threads) -------------
# Expert 0: a full replica on every rank; expert 1: replicas on ranks 1 and 2; expert 2: replicas on
# ranks 0 and 1; experts 3-5: one rank each (unused). A copy goes to this rank's own replica (no
# traffic off the rank), else to replica `token mod replicas`.
REPLICAS = Placement(epoch=2, world_size=3, replicas={0: (((0,), (1,), (2,)), ((1,), (2,)), ((0,), (1,)),
                                                          ((0,),), ((1,),), ((2,),))})
ROUTED = {0: [[0, 1]] * 4, 1: [[0, 1]] * 3, 2: [[1, 2]] * 5}  # (T, K) expert ids each rank's tokens pick


class FixedRouter:
    """The Router seam with the choice made in advance: every rank's tokens go to ROUTED[rank]."""

    def __init__(self, expert_ids: list[list[int]]):
        self.expert_ids = torch.tensor(expert_ids, dtype=torch.int64).reshape(-1, K)  # (T, K)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, layer: int) -> Routing:
        return Routing(expert_ids=self.expert_ids, weights=torch.full(self.expert_ids.shape, 0.5))  # (T, K)


def test_a_copy_goes_to_its_own_replica_else_to_token_mod_replicas():
    w13, w2, _, _ = _weights()
    g = torch.Generator().manual_seed(1)
    xs = {rank: torch.randn(len(ids), D, generator=g) for rank, ids in ROUTED.items()}  # (T, D)
    t_max = max(len(ids) for ids in ROUTED.values())

    def rank_main(collective):
        recorder = LoadRecorder.for_placement(REPLICAS)
        transport = AllToAllTransport(collective, REPLICAS, observer=recorder)
        layer = MoELayer(FixedRouter(ROUTED[collective.rank]), transport,
                         GroupedExperts({0: _layer(REPLICAS, collective.rank, w13, w2)}), recorder)
        return layer(0, xs[collective.rank], torch.zeros(E, D), t_max=t_max), recorder.take()

    results = run_world(LoopbackWorld(3), rank_main)
    links = {rank: sample.link_counts[0].tolist() for rank, (_, sample) in enumerate(results)}
    # rank 0: expert 0 stays (own replica, 4); expert 1 (ranks 1, 2): tokens 0, 2 -> 1 and 1, 3 -> 2
    # rank 1: both experts have a replica here: nothing leaves the rank
    # rank 2: expert 1 stays (5); expert 2 (ranks 0, 1): tokens 0, 2, 4 -> 0 and 1, 3 -> 1
    assert links == {0: [4, 2, 2], 1: [0, 6, 0], 2: [3, 2, 5]}
    local = MoELayer(FixedRouter([]), LocalTransport(E),
                     GroupedExperts({0: LayerExperts.stacked(tuple(range(E)), w13, w2)}))
    for rank, (y, sample) in enumerate(results):
        local.router = FixedRouter(ROUTED[rank])
        torch.testing.assert_close(y, local(0, xs[rank], torch.zeros(E, D)), rtol=1e-5, atol=1e-5)
        assert sample.expert_counts[0].tolist() == torch.bincount(torch.tensor(ROUTED[rank]).reshape(-1),
                                                                  minlength=E).tolist()
