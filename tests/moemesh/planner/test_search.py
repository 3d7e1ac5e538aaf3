"""moemesh.planner.search: constraints, the paper's swap rule, ours against round-robin."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moemesh.errors import ConfigError
from moemesh.mesh.placement import validate_placement
from moemesh.planner.cost import CostOptions, ExpertShape
from moemesh.planner.problem import Problem, round_robin_slots
from moemesh.planner.search import (
    SwapBudget,
    plan,
    round_robin,
    swap_search,
    topology_aware,
)
from moemesh.planner.slots import to_placement
from moemesh.planner.topology import Topology, h100_cluster
from moemesh.planner.traffic import Skew, synthetic

SMALL = ExpertShape(hidden_size=64, intermediate_size=128, dtype_bytes=2, matrices=3)
QUICK = SwapBudget(evaluations=48, tries=8)


@st.composite
def problems(draw):
    G = draw(st.integers(2, 20))
    topo = h100_cluster(G, draw(st.sampled_from([1, 2, 4, 8])))
    E = draw(st.integers(2, 24))
    K = draw(st.integers(1, min(4, E)))
    skew = Skew(draw(st.floats(0.0, 2.0)), groups=draw(st.sampled_from([0, 2, 4])), affinity=4.0)
    traffic = synthetic(E, draw(st.integers(1, 3)), G, top_k=K, skew=skew, seed=draw(st.integers(0, 999)),
                        sample_tokens=256)
    least = max(1, -(-E // G))
    slots = draw(st.sampled_from([None, least + 1])) if E > G else None
    return Problem(topo, traffic, SMALL, CostOptions(dedupe_per_node=draw(st.booleans())), slots=slots)


def check_constraints(problem: Problem, result) -> None:
    p, E, G = result.placement, problem.num_experts, problem.topology.devices
    validate_placement(p, E, problem.layer_ids)  # every expert held, ranks valid, none twice
    P = problem.slots_per_device
    for layer in problem.layer_ids:
        per_rank = p.experts_per_rank(layer)
        assert max(per_rank) <= P
        if G >= E:
            assert max(per_rank) == 1  # the paper's rule: one expert per device per layer
    problem.check_memory()
    assert len(p.layers) == len(problem.layer_ids) and p.world_size == G


@settings(max_examples=60, deadline=None)
@given(problems())
def test_every_method_keeps_the_constraints_and_never_beats_round_robin_badly(problem):
    rr = round_robin(problem)
    for result in (rr, swap_search(problem, QUICK), topology_aware(problem)):
        check_constraints(problem, result)
        # never a busier link than round-robin, layer by layer
        assert (result.report.cost.max_link_s <= rr.report.cost.max_link_s * (1 + 1e-9)).all()


@settings(max_examples=50, deadline=None)
@given(problems())
def test_every_accepted_swap_lowers_the_max_link_load(problem):
    result = swap_search(problem, QUICK)
    slots = round_robin_slots(problem)
    model, t = problem.model, problem.routed
    index = {layer: l for l, layer in enumerate(problem.layer_ids)}
    for step in result.report.swaps:  # replay from round-robin, pricing each swap afresh
        l = index[step.layer]
        before = model.layer_max_link_s(t.tokens[l], slots[l], t.coactivation[l], t.top_k)
        slots[l][step.a], slots[l][step.b] = slots[l][step.b], slots[l][step.a]
        after = model.layer_max_link_s(t.tokens[l], slots[l], t.coactivation[l], t.top_k)
        assert before == pytest.approx(step.before_s) and after == pytest.approx(step.after_s)
        assert after < before
    assert to_placement(slots, problem.layer_ids, problem.num_experts).layers == result.placement.layers


def paper_problem(skew: Skew, seed: int, devices: int = 16) -> Problem:
    traffic = synthetic(16, 4, devices, top_k=2, skew=skew, seed=seed)
    return Problem(Topology.preset("paper-16xh100", devices), traffic, ExpertShape.paper())


@pytest.mark.parametrize("skew, factor", [(Skew(1.2), 1.08), (Skew(1.2, groups=2, affinity=8.0), 1.17)])
def test_zipf_routing_on_the_paper_testbed(skew, factor):
    """16 experts, one per H100, 2 nodes: ours lowers the busiest link by >= 1.08x against
    round-robin for Zipf 1.2 (measured 1.09-1.14 over seeds 0-7) and >= 1.17x when experts
    co-fire in clusters (measured 1.17-1.42: a token crosses InfiniBand once per node), and
    always at least as much as the paper's swap search."""
    gains = []
    for seed in range(4):
        problem = paper_problem(skew, seed)
        ours, swap = plan(problem, "ours").report, plan(problem, "swap").report
        assert ours.link_gain >= factor
        assert ours.cost.total_max_link_s <= swap.cost.total_max_link_s
        assert swap.swaps and swap.link_gain > 1.0  # the paper's loop helps too, less
        gains.append(ours.link_gain)
    print(f"{skew}: max link load lowered x{min(gains):.3f}-x{max(gains):.3f}")


def test_replicas_on_spare_devices_balance_devices():
    """64 experts on 20 H100s with 4 slots each (80 slots: 25% spare) bring max/mean device load
    under 1.1 (round-robin: 3-6). With one expert per device (16 experts on 20 devices) no
    placement can: 4 spare devices for 16 experts leave max/mean >= 1.25 even for uniform
    routing, and Zipf 1.2 needs more replicas; ours reaches that bound (EPLB's greedy replica
    count is optimal), about 2.1 against round-robin's 6."""
    for seed in range(3):
        traffic = synthetic(64, 4, 20, top_k=8, skew=1.2, seed=seed)
        problem = Problem(Topology.preset("paper-16xh100", 20), traffic, SMALL, slots=4)
        report = plan(problem).report
        assert report.cost.balance.max() < 1.1 < 2.5 < report.round_robin.balance.max()
        one_each = plan(paper_problem(Skew(1.2), seed, devices=20)).report
        load = one_each.cost.device_tokens
        bound = (problem_bound := _one_per_device_bound(paper_problem(Skew(1.2), seed, devices=20)))
        np.testing.assert_allclose(one_each.cost.balance, bound, rtol=0.02)
        assert problem_bound.max() < one_each.round_robin.balance.max() / 2 and load.shape == (4, 20)


def _one_per_device_bound(problem: Problem) -> np.ndarray:
    """[L] the least max/mean device load any one-expert-per-device placement reaches."""
    return _least_max_over_mean(problem.routed.expert_tokens, problem.topology.devices)


def _least_max_over_mean(load: np.ndarray, devices: int) -> np.ndarray:
    """load [L, E] -> [L], by brute force: every device holds one replica, so the G - E spare
    devices take extra replicas; try every multiset of experts for them and keep the least
    max(load / replicas). Independent of the planner's replica counting (moemesh.planner.replicas)."""
    E = load.shape[1]
    best = np.full(load.shape[0], np.inf)
    for extra in itertools.combinations_with_replacement(range(E), devices - E):
        counts = 1 + np.bincount(np.array(extra, dtype=int), minlength=E)  # (E,)
        best = np.minimum(best, (load / counts).max(axis=1))
    return best / (load.sum(axis=1) / devices)


def test_brute_force_bound_by_hand():
    """Experts loaded 6, 3, 3. On 4 devices the spare one replicates expert 0 (3, 3, 3): max 3,
    mean 12 / 4 = 3, bound 1.0. On 5 devices the best of the two spares' 6 choices leaves max 3
    (e.g. 0 twice: 2, 3, 3), mean 12 / 5 = 2.4: bound 1.25. On 3 devices nothing is spare: 6 / 4 = 1.5."""
    load = np.array([[6.0, 3.0, 3.0]])
    assert _least_max_over_mean(load, 4)[0] == pytest.approx(1.0)
    assert _least_max_over_mean(load, 5)[0] == pytest.approx(1.25)
    assert _least_max_over_mean(load, 3)[0] == pytest.approx(1.5)


def test_uniform_routing_cannot_balance_16_experts_on_20_devices():
    traffic = synthetic(16, 1, 20, skew=0.0, seed=0, sample_tokens=200000)
    assert _one_per_device_bound(Problem(Topology.preset("paper-16xh100", 20), traffic, SMALL))[0] > 1.2


def test_memory_and_slot_limits():
    traffic = synthetic(16, 4, 16, seed=0)
    with pytest.raises(ConfigError, match="GB per device"):
        Problem(Topology.preset("paper-16xh100"), traffic, ExpertShape(8192, 32768 * 16, 2, 3)).check_memory()
    with pytest.raises(ConfigError, match="one expert per device per layer"):
        Problem(Topology.preset("paper-16xh100"), traffic, SMALL, slots=2)
    with pytest.raises(ConfigError, match="need 2"):
        Problem(Topology.preset("paper-16xh100", 8), traffic, SMALL, slots=1)
    with pytest.raises(ConfigError):
        round_robin(Problem(Topology.preset("paper-16xh100"), traffic, ExpertShape(8192, 32768 * 16, 2, 3)))
    with pytest.raises(ValueError, match="unknown method"):
        plan(Problem(Topology.preset("paper-16xh100"), traffic, SMALL), "annealing")


def test_replanning_the_same_routing_moves_nothing():
    problem = paper_problem(Skew(1.2), 0, devices=20)
    first = plan(problem)
    again = plan(problem, current=first.placement)
    assert again.placement.layers == first.placement.layers
