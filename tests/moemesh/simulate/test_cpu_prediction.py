"""The cost model's arithmetic for the CPU mesh, on recorded inputs (moemesh.simulate.cpu_check's
predict_mesh_step: 2 workers, 16 sequences decoding, the model `make bench` serves).

Comparing the prediction with a live mesh is a benchmark, not a test: `make bench`
(scripts/bench_all.py) runs it and fails outside 25%. Here the rates are a small recorded dict and
the prediction is compared with numbers worked by hand."""

from __future__ import annotations

import pytest

from moemesh.model.tiny import TinySpec, write_tiny_model
from moemesh.simulate.cpu_check import CheckSettings, predict_mesh_step
from moemesh.simulate.measure import CpuRates, Overheads

# the model `make bench` serves (scripts/bench_all.py): 4 MoE layers, 8 experts, top-2
SPEC = TinySpec(arch="mixtral", layers=4, experts=8, top_k=2, hidden=256, intermediate=512, heads=8, kv_heads=4,
                vocab=512, seed=0)
SETTINGS = CheckSettings(workers=2, batch=16)

# Recorded inputs, per process with 2 processes busy: the busy all_to_all latency (1.10 ms) and the
# serving overhead (6.2 ms) of round 0 in docs/benchmarks.md; the other rates and host overheads in
# the field notes' range (moemesh.simulate.hardware.FIELD_NOTES_CPU).
RECORDED = {"processes": 2, "matmul_flops_per_s": 40e9, "stream_bytes_per_s": 6e9, "a2a_latency_s": 1.1e-3,
            "a2a_bytes_per_s": 1.5e9, "gather_latency_s": 0.4e-3}
OVERHEADS = {"per_step_s": 0.5e-3, "per_layer_s": 1.5e-3, "per_expert_s": 40e-6}
SERVING_S = 6.2e-3

# With every rate this high, moving bytes and FLOPs costs nothing (1e30 makes them < 1e-20 s)
FREE = 1e30


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("model"), SPEC)


def _predict(model_dir, rates: dict, overheads: dict, serving_s: float):
    return predict_mesh_step(model_dir, SETTINGS, CpuRates(**rates), Overheads(**overheads), serving_s)


def test_overheads_and_latencies_alone_by_hand(model_dir):
    """Rates free, no per-expert cost: a step is 4 layers x (layer overhead + dispatch latency +
    combine latency) + step overhead + serving overhead + header (the lockstep all_gather):
    4 x (1.5 + 1.1 + 1.1) + 0.5 + 6.2 + 0.4 = 14.8 + 7.1 = 21.9 ms."""
    rates = {**RECORDED, "matmul_flops_per_s": FREE, "stream_bytes_per_s": FREE, "a2a_bytes_per_s": FREE}
    p = _predict(model_dir, rates, {**OVERHEADS, "per_expert_s": 0.0}, SERVING_S)
    assert p.step_s == pytest.approx(21.9e-3, rel=1e-9)
    assert p.parts["header_s"] == pytest.approx(0.4e-3) and p.parts["overhead_s"] == pytest.approx(6.7e-3)
    assert p.comm_s == pytest.approx(8 * 1.1e-3, rel=1e-9)  # 4 layers x (dispatch + combine)
    assert p.tpot_s == p.step_s and p.tps == pytest.approx(16 / 21.9e-3)  # decode: 16 tokens per step


def test_expert_overhead_counts_the_experts_expected_to_get_tokens(model_dir):
    """Each worker holds 4 of the 8 experts; 16 sequences x top-2 over 2 workers spread 16 copies
    per worker per layer over its 4 experts, ~4 each: an expert receives a token with probability
    1 - e^-4 = 0.982, so a layer pays ~3.93 x 40 us more (the routing is sampled, so within 1%)."""
    rates = {**RECORDED, "matmul_flops_per_s": FREE, "stream_bytes_per_s": FREE, "a2a_bytes_per_s": FREE}
    without = _predict(model_dir, rates, {**OVERHEADS, "per_expert_s": 0.0}, SERVING_S)
    with_experts = _predict(model_dir, rates, OVERHEADS, SERVING_S)
    per_layer = (with_experts.step_s - without.step_s) / 4
    assert per_layer == pytest.approx(4 * 0.982 * 40e-6, rel=0.01)


def test_every_exchange_pays_the_all_to_all_latency(model_dir):
    """On the recorded rates, 1 ms more all_to_all latency costs 4 layers x 2 exchanges = 8 ms."""
    base = _predict(model_dir, RECORDED, OVERHEADS, SERVING_S)
    slower = _predict(model_dir, {**RECORDED, "a2a_latency_s": RECORDED["a2a_latency_s"] + 1e-3}, OVERHEADS,
                      SERVING_S)
    assert slower.step_s - base.step_s == pytest.approx(8e-3, rel=1e-6)


def test_half_the_rates_and_twice_the_times_double_the_step(model_dir):
    """Seconds in, seconds out: every term is a time or work / rate, so a machine twice as slow in
    every respect takes exactly twice as long (no hidden constant in seconds)."""
    base = _predict(model_dir, RECORDED, OVERHEADS, SERVING_S)
    slow = {k: (v / 2 if k.endswith("per_s") else v * 2 if k.endswith("_s") else v) for k, v in RECORDED.items()}
    doubled = _predict(model_dir, slow, {k: 2 * v for k, v in OVERHEADS.items()}, 2 * SERVING_S)
    assert doubled.step_s == pytest.approx(2 * base.step_s, rel=1e-9)
