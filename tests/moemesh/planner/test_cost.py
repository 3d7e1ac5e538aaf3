"""moemesh.planner.cost: the fast model agrees with a literal one; the formulas hold."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moemesh.mesh.placement import initial_placement
from moemesh.planner.cost import CostModel, CostOptions, ExpertShape, evaluate
from moemesh.planner.topology import Topology, h100_cluster
from moemesh.planner.traffic import synthetic

UNIT = ExpertShape(hidden_size=4, intermediate_size=4, dtype_bytes=1, matrices=1)  # 4 bytes per token


def reference_loads(topo: Topology, tokens, slots, coact, top_k: int, dedupe: bool):
    """One layer, literally: form every source -> device copy and walk the rules of
    moemesh.planner.cost's docstring. Returns (link tokens [2G + 2N], device tokens [G])."""
    G, E = tokens.shape
    N, node, local, sizes = topo.nodes, topo.node_of, topo.local_of, topo.node_sizes
    held = np.zeros((G, E), dtype=bool)
    for g in range(G):
        for e in slots[g]:
            if e >= 0:
                held[g, e] = True
    replicas = held.sum(axis=0)
    pair, device = np.zeros((G, G)), np.zeros(G)
    for s in range(G):
        for e in range(E):
            if held[s, e]:  # the source holds a replica: the copy stays
                device[s] += tokens[s, e]
                continue
            for d in np.nonzero(held[:, e])[0]:  # else every replica takes an equal share
                pair[s, d] += tokens[s, e] / replicas[e]
                device[d] += tokens[s, e] / replicas[e]
    share_on_node = np.zeros((E, N))
    for e in range(E):
        for d in np.nonzero(held[:, e])[0]:
            share_on_node[e, node[d]] += 1.0 / replicas[e]
    pairs_on_node = [0.5 * share_on_node[:, n] @ coact @ share_on_node[:, n] for n in range(N)]
    nvl_out, nvl_in, ib_out, ib_in = np.zeros(G), np.zeros(G), np.zeros(N), np.zeros(N)
    for s in range(G):
        for n in range(N):
            devices = [d for d in range(G) if node[d] == n]
            copies = sum(pair[s, d] for d in devices)
            if n == node[s]:
                for d in devices:
                    nvl_out[s] += pair[s, d]
                    nvl_in[d] += pair[s, d]
            elif not dedupe:
                ib_out[node[s]] += copies
                ib_in[n] += copies
            else:
                crossing = max(copies - tokens[s].sum() / tokens.sum() * pairs_on_node[n], copies / top_k)
                ib_out[node[s]] += crossing
                ib_in[n] += crossing
                landing = devices[local[s] % sizes[n]]
                for d in devices:
                    if d != landing:
                        nvl_out[landing] += pair[s, d]
                        nvl_in[d] += pair[s, d]
    return np.concatenate([nvl_out, nvl_in, ib_out, ib_in]), device


@st.composite
def layers(draw):
    """A random topology (partial last node allowed), valid slots with replicas, routing."""
    G = draw(st.integers(1, 12))
    per_node = draw(st.integers(1, 5))
    E = draw(st.integers(1, 10))
    P = max(1, -(-E // G))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    slots = np.full((G, P), -1)
    for e in rng.permutation(E):  # every expert somewhere
        free = [(g, k) for g in range(G) for k in range(P) if slots[g, k] < 0]
        g, k = free[rng.integers(len(free))]
        slots[g, k] = e
    for g, k in zip(*np.nonzero(slots < 0)):  # some spare slots take replicas
        e = int(rng.integers(E))
        if rng.random() < 0.6 and e not in slots[g]:
            slots[g, k] = e
    tokens = rng.random((G, E)) * (rng.random((G, E)) < 0.8) * 10
    coact = rng.random((E, E))
    coact = coact + coact.T
    np.fill_diagonal(coact, 0.0)
    return h100_cluster(G, per_node), tokens, slots, coact, draw(st.integers(1, 4))


@settings(max_examples=40, deadline=None)
@given(layers(), st.booleans())
def test_fast_model_matches_the_literal_one(layer, dedupe):
    topo, tokens, slots, coact, top_k = layer
    model = CostModel(topo, UNIT, CostOptions(dedupe_per_node=dedupe))
    loads = model.loads(tokens[None], slots[None], coact[None], top_k)
    want_links, want_devices = reference_loads(topo, tokens, slots, coact, top_k, dedupe)
    np.testing.assert_allclose(loads.link_tokens[0], want_links, atol=1e-9)
    np.testing.assert_allclose(loads.device_tokens[0], want_devices, atol=1e-9)
    # every copy is computed somewhere
    assert loads.device_tokens.sum() == pytest.approx(tokens.sum())


def test_send_once_per_node_by_hand():
    """2 nodes x 2 devices, one expert each. Device 0 sends 10 tokens, each to experts 2 and 3
    (both on node 1): directly that is 20 copies over InfiniBand; sent once per node it is 10
    tokens, landing on device 2 (device 0's local index) which forwards 10 copies to device 3."""
    topo = h100_cluster(4, 2)
    tokens = np.zeros((4, 4))
    tokens[0, 2] = tokens[0, 3] = 10
    coact = np.zeros((4, 4))
    coact[2, 3] = coact[3, 2] = 10
    slots = np.arange(4)[:, None]
    links = dict(zip(CostModel(topo, UNIT).links.names, CostModel(topo, UNIT).loads(
        tokens[None], slots[None], coact[None], 2).link_tokens[0]))
    assert (links["ib-out:0"], links["ib-in:1"], links["nvl-out:2"], links["nvl-in:3"]) == (10, 10, 10, 10)
    assert sum(links.values()) == 40
    direct = CostModel(topo, UNIT, CostOptions(dedupe_per_node=False))
    links = dict(zip(direct.links.names, direct.loads(tokens[None], slots[None], coact[None], 2).link_tokens[0]))
    assert (links["ib-out:0"], links["ib-in:1"]) == (20, 20) and sum(links.values()) == 40


def test_layer_time_formula():
    topo = Topology.preset("paper-16xh100")
    t = synthetic(16, 2, 16, top_k=2, skew=1.2, seed=0)
    shape = ExpertShape.paper()
    p = initial_placement(16, t.layer_ids, 16)
    cost = evaluate(p, topo, t, shape)
    links = cost.links
    # link_s = latency + bytes / bandwidth; bytes = tokens x token_bytes
    k = int(cost.link_s[0].argmax())
    assert cost.link_s[0, k] == pytest.approx(links.latency_s[k] + cost.link_bytes[0, k] / links.bandwidth_bytes_per_s[k])
    # dispatch_s[g] = the slowest of g's four ports; comm = dispatch + mirrored combine
    dispatch = cost.link_s[:, links.device_links].max(axis=2)
    np.testing.assert_allclose(cost.comm_s, 2 * dispatch)
    np.testing.assert_allclose(cost.compute_s, cost.device_tokens * shape.flops_per_token / topo.device_flops_per_s)
    np.testing.assert_allclose(cost.layer_s, (cost.compute_s + cost.comm_s).max(axis=1))
    assert cost.total_layer_s == pytest.approx(cost.layer_s.sum())
    # overlap hides communication behind compute, never more than the compute
    hidden = CostModel(topo, shape, CostOptions(overlap=0.8)).evaluate(p, t)
    np.testing.assert_allclose(hidden.device_s, cost.compute_s + cost.comm_s - np.minimum(0.8 * cost.comm_s, cost.compute_s))


def test_shapes_and_units():
    paper = ExpertShape.paper()
    assert paper.token_bytes == 16384 and paper.expert_bytes == 2 * 8192 * 32768 * 2
    assert paper.flops_per_token == 2 * 2 * 8192 * 32768


def test_one_node_never_uses_infiniband():
    topo = Topology.preset("local", 4)
    t = synthetic(8, 1, 4, skew=1.0, seed=0)
    cost = evaluate(initial_placement(8, t.layer_ids, 4), topo, t, UNIT)
    ib = [i for i, n in enumerate(cost.links.names) if n.startswith("ib")]
    assert cost.link_bytes[:, ib].sum() == 0 and cost.ib_bytes == 0
    assert cost.link_bytes.sum() > 0
