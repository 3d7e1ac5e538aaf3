"""moemesh.planner.groups: the nodes a token reaches under group-limited routing, by hand-worked
cases, by brute force over every equally likely outcome on tiny instances, and the router's rule."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from moemesh.errors import ConfigError
from moemesh.planner.cost import ExpertShape
from moemesh.planner.groups import (
    aligned_nodes,
    aligned_slots,
    expected_remote_nodes,
    nodes_bound,
    remote_nodes,
    route,
    sampled_remote_nodes,
    spread_nodes,
)
from moemesh.planner.problem import Problem
from moemesh.planner.search import plan
from moemesh.planner.topology import H100_FLOPS, H100_MEMORY_BYTES, INFINIBAND, NVLINK, Topology
from moemesh.planner.traffic import synthetic

HALF = np.array([0.5, 0.5])


def test_hand_worked_four_experts_on_two_nodes():
    """Experts 0..3, groups {0, 1} and {2, 3}, K = 2, two nodes, tokens from either node alike.

    Aligned (nodes [0, 0, 1, 1]), one group kept: the token takes both experts of one group, so it
    reaches one node, the other node with probability 1/2: 0.5 remote nodes.
    No limit: 2 of 4 experts, 6 pairs equally likely; from node 0 the remote node 1 is reached by
    the 5 pairs holding expert 2 or 3: 5/6 (the same from node 1).
    Spread (nodes [0, 1, 0, 1]), one group kept: each group has an expert on each node: always 1."""
    assert expected_remote_nodes(np.array([0, 0, 1, 1]), 2, 2, 1, HALF) == pytest.approx(0.5)
    assert expected_remote_nodes(np.array([0, 0, 1, 1]), 2, 2, 2, HALF) == pytest.approx(5 / 6)
    assert expected_remote_nodes(np.array([0, 1, 0, 1]), 2, 2, 1, HALF) == pytest.approx(1.0)


def test_deepseek_v3_on_eight_aligned_nodes_by_hand():
    """256 experts, group g (32 experts) on node g, top-8 in 4 of 8 groups, 1/8 of tokens per node.
    Node m is reached when group m is kept (4/8) and one of the 8 experts drawn from the kept 128
    lies in it: 1 - C(96, 8) / C(128, 8). Without the limit: 1 - C(224, 8) / C(256, 8). Each of
    the 8 nodes is remote to 7/8 of the tokens."""
    share = np.full(8, 1 / 8)
    limited = 8 * (7 / 8) * 0.5 * (1 - math.comb(96, 8) / math.comb(128, 8))
    free = 8 * (7 / 8) * (1 - math.comb(224, 8) / math.comb(256, 8))
    assert expected_remote_nodes(aligned_nodes(256, 8), 8, 8, 4, share) == pytest.approx(limited)
    assert expected_remote_nodes(aligned_nodes(256, 8), 8, 8, 8, share) == pytest.approx(free)
    assert limited < nodes_bound(8, 4, 8, 8) == 4 < free


def _brute_force(nodes: np.ndarray, K: int, n: int, k: int, share: np.ndarray) -> float:
    """Every kept-group subset, then every K-subset of its experts, all equally likely."""
    E = len(nodes)
    size = E // n
    total, outcomes = 0.0, 0
    for groups in itertools.combinations(range(n), k):
        experts = [e for g in groups for e in range(g * size, (g + 1) * size)]
        for chosen in itertools.combinations(experts, K):
            reached = {int(nodes[e]) for e in chosen}
            total += sum(s for m, s in enumerate(share) for r in reached if r != m)
            outcomes += 1
    return total / outcomes


@pytest.mark.parametrize(("nodes", "K", "n", "k", "share"), [
    ([0, 0, 1, 1, 2, 2], 2, 3, 2, [1 / 3] * 3),
    ([0, 1, 2, 0, 1, 2], 3, 3, 2, [0.5, 0.25, 0.25]),
    ([0, 0, 0, 1, 1, 1, 1, 0], 3, 4, 2, [0.7, 0.3]),
    ([0, 1, 1, 2, 2, 3, 3, 0], 4, 2, 1, [0.25] * 4),
    ([1, 0, 2, 2, 0, 1, 3, 3], 2, 4, 4, [0.1, 0.2, 0.3, 0.4]),
])
def test_expected_remote_nodes_equals_brute_force(nodes, K, n, k, share):
    nodes, share = np.array(nodes), np.array(share)
    assert expected_remote_nodes(nodes, K, n, k, share) == pytest.approx(_brute_force(nodes, K, n, k, share))


def test_bad_group_limits_are_refused():
    with pytest.raises(ConfigError):
        expected_remote_nodes(aligned_nodes(6, 2), 2, 4, 2, HALF)  # 4 groups do not split 6 experts
    with pytest.raises(ConfigError):
        expected_remote_nodes(aligned_nodes(8, 2), 5, 4, 2, HALF)  # 5 experts from 2 groups of 2


def test_route_keeps_the_groups_with_the_best_two_scores():
    """By hand: groups {0, 1}, {2, 3}, {4, 5}; sums of the two best 0.9+0.1, 0.6+0.55, 0.7+0.0.
    One group kept: {2, 3} (1.15), though expert 0 scores highest; two kept: {0, 1} and {2, 3},
    best two of them 0 and 2; no limit: 0 and 4 (0.7)."""
    scores = np.array([[0.9, 0.1, 0.6, 0.55, 0.7, 0.0]])
    assert sorted(route(scores, 2, (3, 1))[0].tolist()) == [2, 3]
    assert sorted(route(scores, 2, (3, 2))[0].tolist()) == [0, 2]
    assert sorted(route(scores, 2)[0].tolist()) == [0, 4]


def test_route_brute_force_on_random_scores():
    """Per token, recomputed in plain Python: the kept groups are those with the largest sums of
    their two best scores; the experts are the best K inside them."""
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(200, 12))
    got = route(scores, 3, (4, 2))
    for row, chosen in zip(scores.tolist(), got.tolist()):
        sums = [sum(sorted(row[3 * g:3 * g + 3])[-2:]) for g in range(4)]
        kept = sorted(range(4), key=lambda g: -sums[g])[:2]
        allowed = [e for e in range(12) if e // 3 in kept]
        assert sorted(chosen) == sorted(sorted(allowed, key=lambda e: -row[e])[:3])


def test_remote_nodes_of_given_routes():
    """Token 0 -> experts 0, 1 (node 0 only), token 1 -> experts 0, 2 (nodes 0 and 1); every token
    from node 0: 0 and 1 remote nodes."""
    assert remote_nodes(np.array([[0, 1], [0, 2]]), np.array([0, 0, 1]), np.array([1.0, 0.0])) == pytest.approx(0.5)


def test_the_router_sampled_without_a_limit_agrees_with_the_exact_count():
    """Top-K of i.i.d. scores is a uniform K-subset: 8192 sampled tokens land within sampling
    error (std of the mean ~0.01) of the combinatorics."""
    share = np.full(8, 1 / 8)
    exact = expected_remote_nodes(aligned_nodes(64, 8), 4, 8, 8, share)
    assert sampled_remote_nodes(aligned_nodes(64, 8), 4, None, share) == pytest.approx(exact, abs=0.05)


def test_aligned_groups_reach_fewer_nodes_and_spread_groups_do_not():
    """DeepSeek-V3's router on 8 nodes: aligned, at most 4 nodes (the group limit); spread over
    the nodes, the limit saves nothing."""
    share = np.full(8, 1 / 8)
    free = sampled_remote_nodes(aligned_nodes(256, 8), 8, None, share)
    aligned = sampled_remote_nodes(aligned_nodes(256, 8), 8, (8, 4), share)
    spread = sampled_remote_nodes(spread_nodes(256, 8), 8, (8, 4), share)
    assert aligned <= 4 * 7 / 8 + 1e-9  # 4 nodes reached at most, one of them maybe the token's own
    assert aligned < free - 1.0
    assert spread == pytest.approx(free, abs=0.1)


def test_aligned_slots_put_groups_on_nodes():
    """64 devices (8 nodes of 8), 256 experts: node n holds experts 32 n .. 32 n + 31, group n.
    1024 devices: expert e's 4 replicas are devices 4 e .. 4 e + 3, one node."""
    s64 = aligned_slots(256, 64, 4, 2)
    assert s64.shape == (2, 64, 4)
    for n in range(8):
        assert sorted(s64[0, 8 * n:8 * n + 8].ravel().tolist()) == list(range(32 * n, 32 * n + 32))
    s1024 = aligned_slots(256, 1024, 1, 1)
    assert s1024[0, 4 * 37:4 * 37 + 4, 0].tolist() == [37] * 4
    assert (s1024[0, :, 0] // 2 == np.arange(1024) // 8).all()  # node of a device = node of its expert
    assert aligned_slots(5, 2, 3, 1)[0].tolist() == [[0, 1, 2], [3, 4, -1]]


def test_aligned_placement_crosses_infiniband_less_on_group_limited_traffic():
    """The planner's 'aligned' method against round-robin, 64 experts in 8 groups on 8 nodes of
    2, top-4 in 2 groups: the cost model's InfiniBand bytes fall."""
    topo = Topology(name="8x2", nodes=8, devices_per_node=2, devices=16, device_memory_bytes=H100_MEMORY_BYTES,
                    device_flops_per_s=H100_FLOPS, intra=NVLINK, inter=INFINIBAND)
    traffic = synthetic(64, 1, 16, top_k=4, skew=0.0, tokens_per_source=64, group_limit=(8, 2))
    problem = Problem(topo, traffic, ExpertShape(512, 1024))
    aligned, rr = plan(problem, "aligned"), plan(problem, "round-robin")
    assert sorted(aligned.slots[0].ravel().tolist()) == list(range(64))
    assert aligned.report.cost.ib_bytes < 0.8 * rr.report.cost.ib_bytes
