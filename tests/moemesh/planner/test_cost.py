"""moemesh.planner.cost: the fast model agrees with a literal one; the formulas hold."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moemesh.mesh.placement import initial_placement
from moemesh.planner.cost import CostModel, CostOptions, ExpertShape, evaluate
from moemesh.planner.topology import LinkSpec, Topology, h100_cluster
from moemesh.planner.traffic import Traffic, synthetic

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


def _two_device_case(overlap: float):
    """One node of 2 devices: NVLink ports 100 B/s with 0.5 s latency, 100 FLOP/s each; UNIT experts
    (4 bytes per token, 2 x 1 x 4 x 4 = 32 FLOPs per copy). Device g holds expert g. Copies:
    s0->e0 10 (stays), s0->e1 5, s1->e0 3, s1->e1 2 (stays)."""
    topo = Topology(name="hand", nodes=1, devices_per_node=2, devices=2, device_memory_bytes=10**9,
                    device_flops_per_s=100.0, intra=LinkSpec(100.0, 0.5), inter=LinkSpec(50.0, 0.25))
    tokens = np.array([[[10.0, 5.0], [3.0, 2.0]]])  # [L=1, S=2, E=2]
    traffic = Traffic(layer_ids=(0,), tokens=tokens, coactivation=np.zeros((1, 2, 2)), top_k=1)
    slots = np.array([[[0], [1]]])  # [L, G, P]
    model = CostModel(topo, UNIT, CostOptions(overlap=overlap))
    return model.evaluate_slots(slots, traffic)


def test_layer_time_formula_by_hand():
    cost = _two_device_case(overlap=0.0)
    links = dict(zip(cost.links.names, cost.link_bytes[0]))
    # bytes = copies x 4: nvl-out:0 and nvl-in:1 carry s0->e1 (5 -> 20 B), nvl-out:1 / nvl-in:0 s1->e0 (3 -> 12 B)
    assert links == {"nvl-out:0": 20, "nvl-out:1": 12, "nvl-in:0": 12, "nvl-in:1": 20, "ib-out:0": 0, "ib-in:0": 0}
    # link_s = latency + bytes / bandwidth: 0.5 + 20/100 = 0.7, 0.5 + 12/100 = 0.62; no bytes -> 0 (no latency)
    seconds = dict(zip(cost.links.names, cost.link_s[0]))
    assert seconds == pytest.approx({"nvl-out:0": 0.7, "nvl-out:1": 0.62, "nvl-in:0": 0.62, "nvl-in:1": 0.7,
                                     "ib-out:0": 0.0, "ib-in:0": 0.0})
    # dispatch = slowest of the device's ports: 0.7 for both; comm = dispatch + mirrored combine = 1.4
    np.testing.assert_allclose(cost.comm_s, [[1.4, 1.4]])
    # device tokens: d0 computes 10 + 3 = 13 copies, d1 5 + 2 = 7; compute = copies x 32 / 100
    np.testing.assert_allclose(cost.device_tokens, [[13, 7]])
    np.testing.assert_allclose(cost.compute_s, [[4.16, 2.24]])
    # no overlap: device = compute + comm = 5.56, 3.64; the layer is the slowest device
    np.testing.assert_allclose(cost.device_s, [[5.56, 3.64]])
    assert cost.layer_s[0] == pytest.approx(5.56) and cost.total_layer_s == pytest.approx(5.56)
    assert cost.max_link_s[0] == pytest.approx(0.7) and cost.max_link_bytes[0] == 20


def test_overlap_hides_communication_never_more_than_the_compute():
    # overlap 0.8 hides 0.8 x 1.4 = 1.12 of both devices' comm: 4.16 + 1.4 - 1.12 = 4.44, 2.24 + 0.28 = 2.52
    np.testing.assert_allclose(_two_device_case(overlap=0.8).device_s, [[4.44, 2.52]])
    # overlap 1 hides min(1.4, compute): both devices compute longer than 1.4 s, so all comm is hidden
    np.testing.assert_allclose(_two_device_case(overlap=1.0).device_s, [[4.16, 2.24]])


def test_overlap_is_capped_by_the_compute():
    """Device 1 computes 0.32 s (one copy) but sends 2 copies over a slow port (0.5 + 8/100 per
    direction: comm 1.16 s): overlap 1 hides only its 0.32 s of compute, leaving 1.16 s."""
    topo = Topology(name="hand", nodes=1, devices_per_node=2, devices=2, device_memory_bytes=10**9,
                    device_flops_per_s=100.0, intra=LinkSpec(100.0, 0.5), inter=LinkSpec(50.0, 0.25))
    tokens = np.array([[[0.0, 0.0], [2.0, 1.0]]])  # s1 sends 2 copies to e0, keeps 1 for e1
    traffic = Traffic(layer_ids=(0,), tokens=tokens, coactivation=np.zeros((1, 2, 2)), top_k=1)
    cost = CostModel(topo, UNIT, CostOptions(overlap=1.0)).evaluate_slots(np.array([[[0], [1]]]), traffic)
    # d0: 2 copies = 0.64 s compute, comm 2 x 0.58 = 1.16, all hidden up to 0.64 -> 1.16
    # d1: 1 copy = 0.32 s compute, comm 1.16 -> 0.32 + 1.16 - 0.32 = 1.16
    np.testing.assert_allclose(cost.compute_s, [[0.64, 0.32]])
    np.testing.assert_allclose(cost.comm_s, [[1.16, 1.16]])
    np.testing.assert_allclose(cost.device_s, [[1.16, 1.16]])


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
