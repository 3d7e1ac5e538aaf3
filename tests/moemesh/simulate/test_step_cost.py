"""The cost model's units and limits: pure arithmetic, no processes."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from moemesh.errors import ConfigError
from moemesh.planner.topology import LinkSpec, Topology, local_topology
from moemesh.simulate.hardware import H100_SXM, DeviceProfile
from moemesh.simulate.paper import PAPER_TABLE, findings, paper_predictions
from moemesh.simulate.shapes import ModelShape, Workload
from moemesh.simulate.step_cost import parse_deployment, predict
from moemesh.simulate.sweep import ep_scaling, scaled_topology
from moemesh.simulate.timeline import StageTimes, schedule

PAPER = ModelShape.paper()
SMALL = ModelShape(name="small", layers=2, moe_layer_ids=(0, 1), experts=4, top_k=2, d_model=64, heads=4, kv_heads=2,
                   head_dim=16, expert_ff=128, expert_matrices=3, dense_ff=0, vocab=300, dtype_bytes=4)
CPU = DeviceProfile(name="unit", flops_per_s=1e10, mem_bytes_per_s=1e9, memory_bytes=1e12, step_overhead_s=1e-4,
                    layer_overhead_s=2e-4, expert_overhead_s=1e-5, header_s=5e-5)


def _topo(devices: int, bandwidth: float, latency: float) -> Topology:
    link = LinkSpec(bandwidth_bytes_per_s=bandwidth, latency_s=latency)
    return replace(local_topology(devices), intra=link, inter=link)


def _ep(devices: int, topo: Topology, work: Workload, profile: DeviceProfile = CPU, shape: ModelShape = SMALL):
    return predict(shape, parse_deployment(f"ep{devices}", shape.experts, devices), work, topo, profile, "round-robin")


# ---- the timeline ---------------------------------------------------------------------------
def test_one_micro_batch_is_the_plain_sum():
    stages = [StageTimes(1.0, 2.0, 3.0, 4.0), StageTimes(0.5, 0.25, 0.125, 1.0)]
    tl = schedule(stages, 1)
    assert tl.makespan_s == pytest.approx(11.875)
    assert tl.compute_s == pytest.approx(4.625) and tl.comm_s == pytest.approx(7.25)
    assert tl.hidden_share == pytest.approx(0.0)
    assert tl.layer_span_s(0) == pytest.approx(10.0) and tl.layer_span_s(1) == pytest.approx(1.875)


def test_two_micro_batches_hide_communication():
    """Unit stages, two micro-batches: mb1's attention runs under mb0's dispatch, and so on:
    makespan 5 instead of 8; 4 s of exchanges of which 1 s stays exposed."""
    tl = schedule([StageTimes(1.0, 1.0, 1.0, 1.0)], 2)
    assert tl.makespan_s == pytest.approx(5.0)
    assert tl.exposed_comm_s == pytest.approx(1.0)
    assert tl.hidden_share == pytest.approx(0.75)


def test_no_communication_has_no_hidden_share():
    assert schedule([StageTimes(1.0, 0.0, 2.0, 0.0)], 2).hidden_share is None


# ---- limits of the step model -------------------------------------------------------------------
def test_zero_communication_gives_the_compute_bound_time():
    """Free links (infinite bandwidth, zero latency) and no header: the step is attention +
    experts + lm head + overheads, computed here by hand from FLOPs and bytes."""
    free = _topo(2, math.inf, 0.0)
    profile = replace(CPU, header_s=0.0)
    work = Workload(batch=8, seq=32, phase="decode")
    p = _ep(2, free, work, profile)
    assert p.comm_s == 0.0 and p.exposed_comm_s == 0.0
    seqs = 4  # per device
    attn_flops = SMALL.attention_flops(seqs, 32) + 2 * seqs * SMALL.router_params
    attn_bytes = SMALL.attn_weight_bytes + SMALL.router_params * 4 + seqs * 32 * SMALL.kv_bytes_per_token
    attention = max(attn_flops / 1e10, attn_bytes / 1e9) + 2e-4
    layers_s = sum(r.attention_s + r.experts_s for r in p.rows)
    assert [r.attention_s for r in p.rows] == pytest.approx([attention] * 2)
    head = max(2 * seqs * SMALL.head_params / 1e10, SMALL.head_params * 4 / 1e9)
    assert p.step_s == pytest.approx(layers_s + head + 1e-4)
    for r in p.rows:  # experts: at most 2 experts' weights per device, read from memory
        assert 0 < r.experts_s <= 2 * (SMALL.expert.expert_bytes / 1e9 + 1e-5) + 1e-12


def test_infinite_bandwidth_leaves_only_latency():
    """bytes / inf = 0: the exchange costs exactly its latency, once per dispatch and combine."""
    work = Workload(batch=8, seq=16)
    with_latency = _ep(2, _topo(2, math.inf, 1e-3), work)
    assert with_latency.comm_s == pytest.approx(2 * SMALL.layers * 1e-3)
    assert _ep(2, _topo(2, math.inf, 0.0), work).comm_s == 0.0


def test_communication_grows_with_bytes_over_bandwidth():
    work = Workload(batch=64, seq=16)
    fast, slow = _ep(2, _topo(2, 1e9, 0.0), work), _ep(2, _topo(2, 1e8, 0.0), work)
    assert slow.comm_s == pytest.approx(10 * fast.comm_s)
    # about half of the 32 tokens x 2 copies each device sends leave it (4 experts, 2 per device)
    per_layer = 32 * 2 * 0.5 * SMALL.expert.token_bytes / 1e9
    assert fast.rows[0].dispatch_s == pytest.approx(per_layer, rel=0.15)


def test_ep1_has_no_dispatch_and_no_header():
    p = _ep(1, _topo(1, 1e9, 1e-3), Workload(batch=8, seq=16))
    assert all(r.dispatch_s == 0.0 and r.combine_s == 0.0 for r in p.rows)
    assert p.comm_s == 0.0 and p.parts["header_s"] == 0.0 and p.hidden_share is None


def test_units_of_the_paper_roofline():
    """EP16 decode at context 1: every GPU reads one expert (2 x 8192 x 32768 x 2 B = 1.07 GB) and
    the attention weights (4 x 8192^2 x 2 B = 537 MB) per layer, at 3.35 TB/s."""
    p = predict(PAPER, parse_deployment("ep16", 16, 16), Workload(1024, 1, "decode", 1),
                Topology.preset("paper-16xh100"), H100_SXM, "round-robin")
    assert PAPER.expert.expert_bytes == 2 * 8192 * 32768 * 2
    assert PAPER.attn_weight_bytes == 4 * 8192 * 8192 * 2
    assert p.rows[0].experts_s == pytest.approx(PAPER.expert.expert_bytes / 3.35e12, rel=1e-3)
    assert p.rows[0].attention_s == pytest.approx((PAPER.attn_weight_bytes + 8192 * 16 * 2 + 64 * 2 * 8192 * 2)
                                                  / 3.35e12, rel=1e-3)
    assert p.tps == pytest.approx(1024 / p.step_s) and p.tps_per_device == pytest.approx(p.tps / 16)
    assert p.tpot_s == p.step_s


def test_compute_bound_switch():
    """Prefill is FLOP-bound: doubling FLOP/s halves the expert stage; decode is byte-bound."""
    topo = Topology.preset("paper-16xh100")
    pre = Workload(16, 4096, "prefill", 1)
    a = predict(PAPER, parse_deployment("ep16", 16, 16), pre, topo, H100_SXM, "round-robin")
    b = predict(PAPER, parse_deployment("ep16", 16, 16), pre, topo, replace(H100_SXM, flops_per_s=2 * 989e12),
                "round-robin")
    assert b.rows[0].experts_s == pytest.approx(a.rows[0].experts_s / 2, rel=1e-6)
    dec = Workload(1024, 1, "decode", 1)
    c = predict(PAPER, parse_deployment("ep16", 16, 16), dec, topo, replace(H100_SXM, flops_per_s=2 * 989e12),
                "round-robin")
    d = predict(PAPER, parse_deployment("ep16", 16, 16), dec, topo, H100_SXM, "round-robin")
    assert c.rows[0].experts_s == pytest.approx(d.rows[0].experts_s)


def test_micro_batches_auto_picks_the_faster():
    topo = Topology.preset("paper-16xh100")
    dep = parse_deployment("ep16", 16, 16)
    auto = predict(PAPER, dep, Workload(1024, 4096, "prefill", 0), topo, H100_SXM)
    one = predict(PAPER, dep, Workload(1024, 4096, "prefill", 1), topo, H100_SXM)
    two = predict(PAPER, dep, Workload(1024, 4096, "prefill", 2), topo, H100_SXM)
    assert auto.step_s == min(one.step_s, two.step_s)
    assert two.hidden_share > 0.5 > (one.hidden_share or 0.0)  # prefill: exchanges hide behind compute


def test_deployments_parse():
    assert parse_deployment("ep16", 16, 16).group == 16
    assert parse_deployment("ep", 16, 64).devices == 64
    colo = parse_deployment("colocated8", 16, 16)
    assert (colo.kind, colo.devices, colo.group, colo.replicas) == ("ep", 16, 2, 8)
    tp = parse_deployment("tp8pp2", 16, 16)
    assert (tp.kind, tp.devices, tp.group, tp.pp) == ("tp", 16, 8, 2)
    with pytest.raises(ConfigError):
        parse_deployment("dp4", 16, 16)
    with pytest.raises(ConfigError):
        predict(PAPER, parse_deployment("ep64", 16, 16), Workload(64, 1), Topology.preset("paper-16xh100"), H100_SXM)


def test_tp_all_reduce_is_a_ring():
    """TP=8 inside a node: 2 all-reduces per layer of 2 x 7/8 x bytes / bw + 14 latencies."""
    topo = Topology.preset("paper-16xh100")
    p = predict(PAPER, parse_deployment("tp8pp2", 16, 16), Workload(1024, 1, "decode", 2), topo, H100_SXM)
    act = 512 * 8192 * 2  # one micro-batch of 512 tokens
    ring = 14 * 7.5e-6 + 2 * 7 / 8 * act / 400e9
    assert p.rows[0].dispatch_s == pytest.approx(ring) and p.rows[0].combine_s == pytest.approx(ring)
    assert p.tpot_s == pytest.approx(2 * (p.parts["stage_s"] + p.parts["hop_s"]))


def test_paper_findings_are_computed():
    topo = Topology.preset("paper-16xh100")
    preds = paper_predictions(PAPER, topo, H100_SXM, method="round-robin")
    assert {d for d, _, _ in preds} == {d for d, _, _, _ in PAPER_TABLE}
    notes = findings(PAPER, H100_SXM, preds)
    text = " ".join(f.derived for f in notes)
    assert "167.8 GB" in text and "26.2 ms" in text and "465k" in text and "1.34 TB" in text


def test_ep_scaling_grows_nodes():
    topo = Topology.preset("paper-16xh100")
    assert (scaled_topology(topo, 64).nodes, scaled_topology(topo, 64).devices_per_node) == (8, 8)
    points = ep_scaling(SMALL, _topo(4, 1e9, 1e-5), CPU, per_device_batch=4, seq=8, devices=(4, 8))
    assert [p.devices for p in points] == [4, 8]
    assert points[1].distinct.deployment.devices == 8 and points[1].replicated.workload.batch == 32


# ---- DeepSeek-V3: MLA, dense layers first, shared experts ------------------------------------
def test_deepseek_v3_layers_by_hand():
    """EP64 (8 nodes of 8 H100), 64 decoding sequences per device at context 1024, one micro-batch.
    Every stage below is bound by bytes at 3.35 TB/s (its FLOPs take less at 989 TFLOP/s):
    attention reads the MLA weights (187,105,280 x 2 B), the router (7168 x 256 x 2 B) and 64 x 1024
    tokens of latent cache (576 x 2 B); a dense layer reads its MLP (3 x 7168 x 18432 x 2 B); a MoE
    layer's shared expert reads 3 x 7168 x 2048 x 2 B and runs under the dispatch."""
    shape = ModelShape.deepseek_v3()
    topo = Topology.preset("h100x64")
    p = predict(shape, parse_deployment("ep64", 256, 64), Workload(64 * 64, 1024, "decode", 1), topo, H100_SXM,
                "aligned")
    attention = (187_105_280 * 2 + 7168 * 256 * 2 + 64 * 1024 * 1152) / 3.35e12
    assert [r.attention_s for r in p.rows] == pytest.approx([attention] * 61)
    dense, moe = p.rows[2], p.rows[3]
    assert dense.dispatch_s == 0.0 and dense.shared_s == 0.0
    assert dense.experts_s == pytest.approx(3 * 7168 * 18432 * 2 / 3.35e12)
    assert moe.shared_s == pytest.approx(3 * 7168 * 2048 * 2 / 3.35e12)
    assert moe.dispatch_s > moe.shared_s > 0
    assert moe.span_s == pytest.approx(moe.attention_s + moe.dispatch_s + moe.experts_s + moe.combine_s)
    assert p.memory_ok


def test_a_model_that_does_not_fit_is_still_predicted():
    """DeepSeek-V3 on 16 H100: 16 routed experts per device x 58 layers x 88 MB = 82 GB of experts
    alone; the prediction says so instead of the planner refusing to place them."""
    p = predict(ModelShape.deepseek_v3(), parse_deployment("ep16", 256, 16), Workload(1024, 128, "decode", 1),
                Topology.preset("paper-16xh100"), H100_SXM, "round-robin")
    assert not p.memory_ok and p.memory_bytes > 58 * 16 * 3 * 7168 * 2048 * 2
    assert p.step_s > 0
