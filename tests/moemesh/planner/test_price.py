"""moemesh.planner.price: bytes to move and whether a rebalance pays."""

from __future__ import annotations

import numpy as np
import pytest

from moemesh.mesh.placement import initial_placement
from moemesh.planner.cost import ExpertShape
from moemesh.planner.price import keep_paying, price_change
from moemesh.planner.problem import Problem
from moemesh.planner.search import plan
from moemesh.planner.topology import Topology
from moemesh.planner.traffic import shifted, synthetic

SHAPE = ExpertShape(hidden_size=2048, intermediate_size=1024, dtype_bytes=2, matrices=3)


def problem(traffic, devices=20):
    return Problem(Topology.preset("paper-16xh100", devices), traffic, SHAPE)


def test_no_change_moves_nothing_and_does_not_pay():
    p = problem(synthetic(16, 2, 20, seed=0))
    rr = initial_placement(16, p.layer_ids, 20)
    price = price_change(rr, rr, p, window_tokens=1e6)
    assert price.total_bytes == 0 and not price.pays.any()
    np.testing.assert_allclose(price.gain_s, 0.0)


def test_bytes_are_new_copies_times_expert_bytes():
    p = problem(synthetic(16, 2, 20, skew=1.2, seed=0))
    rr = initial_placement(16, p.layer_ids, 20)
    ours = plan(p).placement
    price = price_change(rr, ours, p, window_tokens=1e6)
    for l, layer in enumerate(p.layer_ids):
        new = sum(len(set(ours.layers[layer][e]) - set(rr.layers[layer][e])) for e in range(16))
        assert price.moved_experts[l] == new
    np.testing.assert_allclose(price.bytes_to_move, price.moved_experts * SHAPE.expert_bytes)
    assert (price.transfer_s > 0).all() and (price.gain_s > 0).all()
    # a longer window makes the same move pay; a tiny one does not
    assert price.pays.all()
    assert not price_change(rr, ours, p, window_tokens=1.0).pays.any()
    # pricing by a loading rate: the busiest receiving device's bytes / rate
    slow = price_change(rr, ours, p, window_tokens=1e6, transfer_bandwidth_bytes_per_s=1e9)
    assert (slow.transfer_s >= SHAPE.expert_bytes / 1e9).all()


def test_keep_paying_takes_only_the_paying_layers():
    p = problem(synthetic(16, 3, 20, skew=1.2, seed=1))
    rr = initial_placement(16, p.layer_ids, 20, epoch=4)
    ours = plan(p).placement
    price = price_change(rr, ours, p, window_tokens=1e6)
    price = type(price)(**{**price.__dict__, "pays": np.array([True, False, True])})
    mixed = keep_paying(rr, ours, price)
    assert mixed.epoch == 5
    assert [mixed.layers[i] for i in p.layer_ids] == [ours.layers[0], rr.layers[1], ours.layers[2]]
    assert price.paying_bytes == pytest.approx(price.bytes_to_move[[0, 2]].sum())


def test_replanning_after_a_shift_keeps_most_experts_in_place():
    before = problem(synthetic(16, 4, 20, skew=1.2, seed=0))
    current = plan(before).placement
    after = problem(shifted(before.traffic, 0.25, seed=1))
    fresh = price_change(current, plan(after).placement, after, window_tokens=1e6)
    aligned = price_change(current, plan(after, current=current).placement, after, window_tokens=1e6)
    assert aligned.total_bytes <= fresh.total_bytes
    assert aligned.moved_experts.sum() < 20 * 4 / 2  # fewer than half the device slots change
