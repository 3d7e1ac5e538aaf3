"""moemesh.planner.replicas: EPLB-style replica counts and packing."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from moemesh.planner.replicas import improve_pack, pack, replicate, units


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 100.0), min_size=1, max_size=5), st.integers(0, 4))
def test_replicate_minimises_the_largest_load_per_replica(load, spare):
    w = np.array([load])
    E = len(load)
    counts = replicate(w, E + spare, max_replicas=E + spare)
    assert counts.sum() == E + spare and counts.min() >= 1
    best = min(max(x / c for x, c in zip(load, combo))
               for combo in itertools.product(range(1, spare + 2), repeat=E) if sum(combo) == E + spare)
    assert (w / counts).max() <= best + 1e-9


def test_replicate_respects_the_replica_cap():
    w = np.array([[100.0, 2.0, 1.0]])
    assert replicate(w, 9, max_replicas=4).tolist() == [[4, 3, 2]]  # the cap stops the hot one at 4
    assert replicate(w, 20, max_replicas=4).tolist() == [[4, 4, 4]]  # 3 x 4 is all there is


def test_units_are_heaviest_first():
    expert, load = units(np.array([[6.0, 1.0, 4.0]]), np.array([[3, 1, 1]]))
    assert expert.tolist() == [[2, 0, 0, 0, 1]] and load.tolist() == [[4.0, 2.0, 2.0, 2.0, 1.0]]


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 12), st.integers(1, 4), st.integers(0, 2**31))
def test_pack_keeps_slots_and_distinct_experts_and_balances(bins, capacity, seed):
    rng = np.random.default_rng(seed)
    E = max(1, bins * capacity - int(rng.integers(0, bins)))
    load = rng.pareto(1.5, size=E) + 0.01
    counts = replicate(load[None], bins * capacity, max_replicas=bins)
    expert, unit_load = units(load[None], counts)
    bin_of = improve_pack(expert[0], unit_load[0], pack(expert, unit_load, bins, capacity)[0], bins, 64)
    assert np.bincount(bin_of, minlength=bins).max() <= capacity
    for b in range(bins):
        held = expert[0][bin_of == b]
        assert len(set(held.tolist())) == len(held)
    loads = np.bincount(bin_of, weights=unit_load[0], minlength=bins)
    # no worse than the greedy bound: mean + the heaviest unit
    assert loads.max() <= loads.mean() + unit_load.max() + 1e-9
