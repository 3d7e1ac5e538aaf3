"""The MoE layer, Router -> Dispatch -> Experts -> Combine, over the loopback all-to-all (ranks
as threads) equals the local layer; load counts; host read-backs per layer."""

from __future__ import annotations

import pytest
import torch

from moemesh.mesh.loopback import HostSyncCounter, LoopbackWorld, run_world
from moemesh.mesh.placement import (
    Placement,
    initial_placement,
    split_placement,
    whole_replicas,
)
from moemesh.mesh.routing_counts import LoadRecorder
from moemesh.mesh.transport import AllToAllTransport, destinations, layer_routes
from moemesh.model.moe import (
    ExpertBatch,
    GroupedExperts,
    LocalTransport,
    MoELayer,
    Routing,
    run_interleaved,
    stack_experts,
    stacked_view,
)
from moemesh.model.routers import SoftmaxTopKRouter
from moemesh.model.weights import LayerExperts, shard_weights

E, D, F, K = 6, 16, 24, 2
TOKENS = ((5, 2), (0, 0), (3, 4))  # (R, M) tokens per rank per micro-batch; rank 1 has none


def _weights():
    g = torch.Generator().manual_seed(0)
    w13 = torch.randn(E, D, 2 * F, generator=g)  # (E, D, 2F)
    w2 = torch.randn(E, D, F, generator=g)  # (E, D, F)
    router = torch.randn(E, D, generator=g)  # (E, D)
    xs = [[torch.randn(t, D, generator=g) for t in row] for row in TOKENS]  # (T, D) per rank, micro-batch
    return w13, w2, router, xs


def _held(placement: Placement, rank: int, w13, w2) -> LayerExperts:
    ids, shards = placement.experts_on(rank, 0), placement.pieces_on(rank, 0)
    pieces = [shard_weights(w13[e], w2[e], shard) for e, shard in zip(ids, shards)]  # (D, 2F/S), (D, F/S)
    return LayerExperts(ids, tuple(a for a, _ in pieces), tuple(b for _, b in pieces), shards)


def _run_micro_batches(layer: MoELayer, router: torch.Tensor, xs: list[torch.Tensor], t_max: list[int]):
    """Round robin over the micro-batches' stages, as MoEModel.forward_overlapped does."""
    return run_interleaved([layer.stages(0, x, router, n) for x, n in zip(xs, t_max)])


PLACEMENTS = {
    "round-robin": initial_placement(E, [0], world_size=3),
    "replicas": whole_replicas(epoch=2, world_size=3, holders={0: ((0, 2), (1,), (1, 2), (0,), (0, 1, 2), (2,))}),
    "split": split_placement(E, [0], world_size=3, shards=2),
    "mixed-split-and-replica": Placement(epoch=3, world_size=3, replicas={0: (
        ((0,),), ((0,), (1, 2)), ((2, 0, 1),), ((2,),), ((0, 1),), ((1,), (2,)))}),
}


@pytest.mark.parametrize("overflow", ["dropless", "drop", "reroute"])
@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_loopback_mesh_layer_equals_local_with_micro_batches(name, overflow):
    placement = PLACEMENTS[name]
    w13, w2, router, xs = _weights()

    def make_router() -> SoftmaxTopKRouter:
        return SoftmaxTopKRouter(K, True, overflow, capacity_factor=0.6)

    every_expert = LayerExperts.stacked(tuple(range(E)), w13, w2)
    local = MoELayer(make_router(), LocalTransport(E), GroupedExperts({0: every_expert}))
    expected = [[local(0, x, router) for x in row] for row in xs]
    t_max = [max(col) for col in zip(*TOKENS)]  # (M,) the step header's

    def rank_main(collective):
        recorder = LoadRecorder.for_placement(placement)
        transport = AllToAllTransport(collective, placement, observer=recorder)
        layer = MoELayer(make_router(), transport, GroupedExperts({0: _held(placement, collective.rank, w13, w2)}),
                         recorder)
        with HostSyncCounter() as syncs:
            out = _run_micro_batches(layer, router, xs[collective.rank], t_max)
        return out, recorder.take(), syncs.calls

    results = run_world(LoopbackWorld(3), rank_main)
    routed = torch.zeros(E, dtype=torch.int64)
    for rank, (out, sample, syncs) in enumerate(results):
        for y, want in zip(out, expected[rank]):
            torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
        assert sample.tokens == sum(TOKENS[rank])
        routed += sample.expert_counts[0]
        pieces, copies = int(sample.link_counts.sum()), int(sample.expert_counts.sum())
        assert pieces == copies if not placement.has_shard_groups else pieces >= copies
        assert syncs == ["tolist"] * len(t_max)  # one read-back per MoE layer per micro-batch, any policy
    kept = sum(int((local.router(x, router, 0).expert_ids >= 0).sum()) for row in xs for x in row)
    assert int(routed.sum()) == kept


def test_local_layer_reads_back_once():
    w13, w2, router, xs = _weights()
    local = MoELayer(SoftmaxTopKRouter(K, True), LocalTransport(E),
                     GroupedExperts({0: LayerExperts.stacked(tuple(range(E)), w13, w2)}))
    with HostSyncCounter() as syncs:
        local(0, xs[0][0], router)
    assert syncs.calls == ["tolist"]


def test_load_recorder_counts_equal_hand_computed():
    # Rank 0 of 2; expert 2 has a full replica on rank 0, expert 1 is split over ranks (0, 1).
    placement = Placement(epoch=1, world_size=2, replicas={0: (((0,),), ((0, 1),), ((0,), (1,))),
                                                           3: (((0,),), ((1,),), ((0,), (1,)))})
    recorder = LoadRecorder.for_placement(placement)
    ids = torch.tensor([[0, 1], [2, -1], [1, 2]])  # (T, K) -1 = dropped
    for layer in (0, 3):
        routing = Routing(expert_ids=ids, weights=torch.ones(3, 2))
        recorder.routed(layer, routing)
        recorder.sent(layer, destinations(layer_routes(placement, layer, rank=0), ids)[1])
    sample = recorder.take()
    assert sample.tokens == 3
    assert sample.expert_counts.tolist() == [[1, 2, 2], [1, 2, 2]]
    # layer 0: e0 -> 0; e1 (split) -> 0 and 1, twice; e2 -> 0 (its own replica), twice
    # layer 3: e0 -> 0; e1 -> 1, twice; e2 -> 0 (its own replica), twice
    assert sample.link_counts.tolist() == [[5, 2], [3, 2]]
    assert recorder.take().expert_counts.sum() == 0  # the window starts again


# DeepSeek-V3's router against the reference's own module (transformers' DeepseekV3TopkRouter), on
# logits chosen directly: the router weight is the identity, so x is the logits.
GE, GROUPS = 8, 4  # 8 routed experts in 4 groups of 2


def _grouped(top_k: int, topk_group: int, bias: list[float], normalize: bool = True, scale: float = 2.5):
    import transformers
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    from moemesh.model.config import GroupedRouting
    from moemesh.model.routers import GroupedSigmoidRouter

    cfg = transformers.DeepseekV3Config(n_routed_experts=GE, num_experts_per_tok=top_k, n_group=GROUPS,
                                        topk_group=topk_group, hidden_size=GE, norm_topk_prob=normalize,
                                        routed_scaling_factor=scale)
    ref = DeepseekV3TopkRouter(cfg)
    with torch.no_grad():
        ref.weight.copy_(torch.eye(GE))
        ref.e_score_correction_bias.copy_(torch.tensor(bias))
    ours = GroupedSigmoidRouter(top_k, GroupedRouting(GROUPS, topk_group, scale), normalize,
                                {0: torch.tensor(bias)})
    return ours, ref


def _route_both(ours, ref, logits: torch.Tensor) -> tuple[Routing, tuple[torch.Tensor, torch.Tensor]]:
    routing = ours(logits, torch.eye(GE), 0)
    with torch.no_grad():
        _, weights, ids = ref(logits)
    assert torch.equal(routing.expert_ids, ids), "same experts, in the same order"
    assert torch.allclose(routing.weights, weights, rtol=0, atol=1e-7)
    return routing, (weights, ids)


def test_grouped_router_equals_the_reference_on_random_scores_and_bias():
    g = torch.Generator().manual_seed(3)
    bias = (0.2 * torch.randn(GE, generator=g)).tolist()
    for top_k, kept in ((2, 2), (3, 2), (4, 3), (1, 1)):
        ours, ref = _grouped(top_k, kept, bias)
        routing, _ = _route_both(ours, ref, 2 * torch.randn(64, GE, generator=g))
        groups = routing.expert_ids // (GE // GROUPS)  # (T, K)
        assert all(len(set(row)) <= kept for row in groups.tolist()), "experts span at most topk_group groups"


def test_ties_in_group_scores_break_as_the_reference():
    # Groups 0, 1 and 2 score the same (two experts at logit 1 each); 2 groups are kept.
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, -3.0, -3.0],
                           [0.5, 0.5, 2.0, -9.0, 0.5, 0.5, 1.0, 1.0]])  # row 1: ties inside groups too
    ours, ref = _grouped(2, 2, [0.0] * GE)
    routing, _ = _route_both(ours, ref, logits)
    kept_groups = set((routing.expert_ids[0] // 2).tolist())
    assert kept_groups < {0, 1, 2} and routing.weights[0].allclose(torch.tensor([1.25, 1.25]))


def test_topk_group_equal_to_n_group_is_plain_topk_of_the_biased_scores():
    g = torch.Generator().manual_seed(4)
    bias = (0.3 * torch.randn(GE, generator=g)).tolist()
    ours, ref = _grouped(3, GROUPS, bias)
    logits = torch.randn(32, GE, generator=g)
    routing, _ = _route_both(ours, ref, logits)
    plain = torch.topk(logits.sigmoid() + torch.tensor(bias), 3, dim=-1).indices  # (T, K)
    assert torch.equal(routing.expert_ids.sort(-1).values, plain.sort(-1).values)


def test_bias_changes_the_selection_but_not_the_weights():
    logits = torch.tensor([[2.0, -4.0, 1.0, -4.0, 0.9, -4.0, -4.0, -4.0]])  # expert 2 just beats expert 4
    scores = logits.sigmoid()[0]
    unbiased, ref = _grouped(2, GROUPS, [0.0] * GE)
    routing, _ = _route_both(unbiased, ref, logits)
    assert sorted(routing.expert_ids[0].tolist()) == [0, 2]
    biased, ref = _grouped(2, GROUPS, [0.0, 0.0, 0.0, 0.0, 0.05, 0.0, 0.0, 0.0])
    routing, _ = _route_both(biased, ref, logits)
    ids = routing.expert_ids[0].tolist()
    assert sorted(ids) == [0, 4], "the bias made expert 4 win the selection"
    # ...but its weight is its own unbiased score: normalised over the two, times the scaling factor.
    want = scores[ids] / scores[ids].sum() * 2.5
    assert torch.allclose(routing.weights[0], want, rtol=0, atol=1e-7)
    chosen_by = scores[ids] + torch.tensor([0.0, 0.0, 0.0, 0.0, 0.05, 0.0, 0.0, 0.0])[ids]  # the biased scores
    assert not torch.allclose(routing.weights[0], chosen_by / chosen_by.sum() * 2.5, rtol=0, atol=1e-4)


def test_gpt_oss_router_equals_the_reference_and_gating_keeps_its_weights():
    """GPT-OSS: top-k of the biased logits, softmax over those k: the reference's ids and weights
    exactly. Gating factors change the selection; the weights stay the softmax over the chosen
    experts' logits."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

    from moemesh.model.routers import TopKSoftmaxRouter

    g = torch.Generator().manual_seed(5)
    ref = GptOssTopKRouter(transformers.GptOssConfig(num_local_experts=E, num_experts_per_tok=K, hidden_size=D))
    with torch.no_grad():
        ref.weight.copy_(torch.randn(E, D, generator=g))
        ref.bias.copy_(torch.randn(E, generator=g))
    x = torch.randn(32, D, generator=g)  # (T, D)
    ours = TopKSoftmaxRouter(K, {0: ref.bias.detach()})
    routing = ours(x, ref.weight.detach(), 0)
    with torch.no_grad():
        logits, weights, ids = ref(x)
    assert torch.equal(routing.expert_ids, ids) and torch.equal(routing.weights, weights)
    ruled_out = int(ids[0, 0])
    factors = torch.ones(E)
    factors[ruled_out] = 0.0  # token 0's first choice is never chosen
    ours.factors = {0: factors}
    gated = ours(x, ref.weight.detach(), 0)
    assert not (gated.expert_ids == ruled_out).any() and (ids == ruled_out).sum() > 1
    want = torch.softmax(torch.gather(logits, 1, gated.expert_ids), dim=-1)  # (T, K)
    assert torch.equal(gated.weights, want)


def test_gpt_oss_router_under_the_drop_policy_renormalises_over_the_copies_kept():
    from moemesh.model.overflow import expert_capacity
    from moemesh.model.routers import TopKSoftmaxRouter

    g = torch.Generator().manual_seed(6)
    x, weight, bias = torch.randn(40, D, generator=g), torch.randn(E, D, generator=g), torch.randn(E, generator=g)
    routing = TopKSoftmaxRouter(K, {0: bias}, "drop", capacity_factor=1.0)(x, weight, 0)
    dropped = routing.expert_ids < 0  # (T, K)
    assert dropped.any() and (routing.weights[dropped] == 0).all()
    kept = routing.expert_ids[~dropped]
    assert torch.bincount(kept, minlength=E).max() <= expert_capacity(40, K, E, 1.0)
    sums = routing.weights.sum(dim=-1)  # (T,)
    assert torch.allclose(sums[~dropped.all(-1)], torch.ones(1), atol=1e-6)


def test_stacked_experts_run_as_grouped_matmuls_equal_to_one_by_one():
    w13, w2, _, _ = _weights()
    held = LayerExperts(tuple(range(E)), tuple(t.clone() for t in w13), tuple(t.clone() for t in w2))
    stacked = stack_experts(held)
    assert stacked_view(held.w13) is None  # separate tensors: not a stack
    assert stacked_view(stacked.w13) is not None and torch.equal(stacked_view(stacked.w13), w13)
    counts = [3, 0, 1, 5, 0, 2]  # an expert without tokens in the middle and at the end
    batch = ExpertBatch(x=torch.randn(sum(counts), D, generator=torch.Generator().manual_seed(1)), counts=counts)
    loop, grouped = GroupedExperts({0: held}), GroupedExperts({0: stacked})
    assert torch.allclose(grouped(0, batch), loop(0, batch), rtol=1e-5, atol=1e-5)
    assert grouped._stacks[0][1] is not None and loop._stacks[0][1] is None  # which path each took
    empty = ExpertBatch(x=torch.empty(0, D), counts=[0] * E)
    assert grouped(0, empty).shape == (0, D)
