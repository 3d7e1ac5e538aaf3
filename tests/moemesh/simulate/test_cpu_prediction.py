"""Prediction against measurement: the cost model, fed this machine's rates measured in this run
(fp32 matmul and weight streaming with 2 busy processes, gloo all_to_all bandwidth and its latency in
a decode step's duty cycle between 2 processes, the engine's host overheads, a worker's serving
overhead), predicts the decode step of a real 2-worker `moemesh up` mesh, measured in the same run
from the workers' Status counters (step_seconds / steps), within 25%. Calibration and measurement
interleave over 6 rounds (moemesh.simulate.cpu_check) because this machine's load changes within
seconds."""

from __future__ import annotations

from moemesh.model.tiny import TinySpec, write_tiny_model
from moemesh.simulate.cpu_check import CheckSettings, check_cpu_mesh

TOLERANCE = 0.25
# the model `make bench` serves (scripts/bench_all.py)
SPEC = TinySpec(arch="mixtral", layers=4, experts=8, top_k=2, hidden=256, intermediate=512, heads=8, kv_heads=4,
                vocab=512, seed=0)


def test_cost_model_predicts_the_cpu_mesh_decode_step(tmp_path):
    model = write_tiny_model(tmp_path / "model", SPEC)
    result = check_cpu_mesh(model, CheckSettings(workers=2, batch=16, rounds=6))
    print("\n" + result.table())
    assert all(r.measured.tokens_per_step == (8.0, 8.0) for r in result.rounds), "the load was not a steady decode"
    assert abs(result.error) < TOLERANCE, result.table()
