"""Prediction against measurement on this machine: the cost model, fed rates measured here, predicts
the decode step of a real CPU mesh (`moemesh up`) measured in the same run. Not pure.

The model's inputs, all measured in the run:
- machine rates with as many one-thread processes as the mesh has workers, all busy at once
  (moemesh.simulate.measure.Calibrator): fp32 matmul, weight streaming, gloo all_to_all
  bandwidth, and the all_to_all latency with the processes busy between exchanges for the
  durations the model predicts for the attention and expert stages (the step's duty cycle);
- the engine's host overheads per step / layer / expert (a micro copy of the model);
- a mesh worker's serving overhead per step: a one-worker mesh (no collectives) serving the same
  per-worker batch, minus the single-process engine on the same batch with the same torch threads
  as that lone worker (the worker's RPC threads take the GIL from its engine thread while it
  streams tokens).

This machine is shared and noisy (two vCPUs; other processes come and go within seconds), so the
run interleaves: every round calibrates, times the engine, measures a window of decode steps on
the one-worker mesh and then on the measured mesh (worker Status counters), and calibrates again;
the check pools every round's inputs (mean times) into one prediction and compares it with the
mean decode step over every measured window.
"""

from __future__ import annotations

import asyncio
import os
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

from moemesh.launcher import UpProcess
from moemesh.model.config import load_config
from moemesh.simulate.hardware import cpu_profile, cpu_topology
from moemesh.simulate.measure import (
    Calibrator,
    CpuRates,
    MeshDecode,
    Overheads,
    engine_step_s,
    measure_mesh_decode,
)
from moemesh.simulate.shapes import ModelShape, Workload
from moemesh.simulate.step_cost import Prediction, parse_deployment, predict


@dataclass(frozen=True)
class CheckSettings:
    """The decode load and how many interleaved rounds to run."""

    workers: int = 2
    batch: int = 16  # sequences decoding together, all workers
    prompt_len: int = 16
    new_tokens: int = 40
    window: tuple[int, int] = (6, 30)  # measure while every request has streamed 6..30 tokens
    rounds: int = 6
    overhead_steps: int = 15

    @property
    def context(self) -> int:
        """Mean context of the measured decode steps."""
        return self.prompt_len + sum(self.window) // 2


@dataclass(frozen=True)
class Round:
    measured: MeshDecode
    rates: CpuRates  # the calibrations around the window, averaged; latency = the busy latency
    overheads: Overheads
    serving_overhead_s: float  # one-worker mesh step - engine step, same per-worker batch
    idle_latency_s: float  # back-to-back all_to_all
    predicted: Prediction  # this round's inputs alone (a diagnostic: the check pools the rounds)


@dataclass(frozen=True)
class CheckResult:
    rounds: tuple[Round, ...]
    predicted: Prediction  # from every round's inputs pooled (mean times)

    @property
    def measured_step_s(self) -> float:
        """Mean decode step over every measured window (step seconds / steps, pooled)."""
        steps = sum(r.measured.steps for r in self.rounds)
        return sum(r.measured.step_s * r.measured.steps for r in self.rounds) / steps

    @property
    def measured_collective_s(self) -> float:
        steps = sum(r.measured.steps for r in self.rounds)
        return sum(r.measured.collective_s * r.measured.steps for r in self.rounds) / steps

    @property
    def predicted_step_s(self) -> float:
        return self.predicted.step_s

    @property
    def predicted_comm_s(self) -> float:
        """Predicted exchange time per step (collectives incl. the header)."""
        return self.predicted.comm_s + self.predicted.parts["header_s"]

    @property
    def error(self) -> float:
        """(predicted - measured) / measured, both pooled over the run."""
        return self.predicted_step_s / self.measured_step_s - 1.0

    def table(self) -> str:
        lines = [f"{'round':>6} {'measured ms':>12} {'in coll. ms':>12} {'predicted ms':>13} {'pred. comm ms':>14} "
                 f"{'serving ms':>11} {'a2a idle/busy ms':>17}"]
        for i, r in enumerate(self.rounds):
            p = r.predicted
            lines.append(f"{i:>6} {r.measured.step_s * 1e3:12.1f} {r.measured.collective_s * 1e3:12.1f} "
                         f"{p.step_s * 1e3:13.1f} {(p.comm_s + p.parts['header_s']) * 1e3:14.1f} "
                         f"{r.serving_overhead_s * 1e3:11.1f} "
                         f"{r.idle_latency_s * 1e3:8.2f}/{r.rates.a2a_latency_s * 1e3:.2f}")
        lines.append(f"{'pooled':>6} {self.measured_step_s * 1e3:12.1f} {self.measured_collective_s * 1e3:12.1f} "
                     f"{self.predicted_step_s * 1e3:13.1f} {self.predicted_comm_s * 1e3:14.1f}"
                     f"   error {self.error:+.0%}")
        return "\n".join(lines)


def pooled_rates(all_rates: list[CpuRates]) -> CpuRates:
    """Rates with the mean *time* of several calibrations: harmonic mean of rates, mean latencies."""
    h = lambda xs: len(xs) / sum(1.0 / x for x in xs)
    return CpuRates(processes=all_rates[0].processes,
                    matmul_flops_per_s=h([r.matmul_flops_per_s for r in all_rates]),
                    stream_bytes_per_s=h([r.stream_bytes_per_s for r in all_rates]),
                    a2a_latency_s=statistics.fmean(r.a2a_latency_s for r in all_rates),
                    a2a_bytes_per_s=h([r.a2a_bytes_per_s for r in all_rates]),
                    gather_latency_s=statistics.fmean(r.gather_latency_s for r in all_rates))


def pooled_overheads(all_overheads: list[Overheads]) -> Overheads:
    return Overheads(*(statistics.fmean(v) for v in zip(*(o.__dict__.values() for o in all_overheads))))


def duty_cycle(p: Prediction) -> tuple[float, ...]:
    """Compute seconds before each exchange of one layer: attention, then experts."""
    rows = [r for r in p.rows if r.dispatch_s > 0] or list(p.rows)
    return (statistics.fmean(r.attention_s for r in rows), statistics.fmean(r.experts_s for r in rows))


def predict_mesh_step(model_dir: Path, s: CheckSettings, rates: CpuRates, overheads: Overheads,
                      serving_overhead_s: float = 0.0) -> Prediction:
    """The cost model's decode step for `s.workers` CPU workers (one expert group, no overlap)."""
    cfg = load_config(model_dir)
    shape = ModelShape.from_config(cfg, dtype_bytes=4)  # the CPU engine computes in fp32
    dep = parse_deployment(f"ep{s.workers}", cfg.num_experts, s.workers)
    work = Workload(batch=s.batch, seq=s.context, phase="decode", micro_batches=1)
    profile = cpu_profile(rates, overheads, serving_overhead_s)
    return predict(shape, dep, work, cpu_topology(rates, s.workers), profile, method="round-robin")


def check_cpu_mesh(model_dir: Path, s: CheckSettings = CheckSettings()) -> CheckResult:
    """Start the measured mesh and a one-worker mesh, then run `s.rounds` interleaved rounds
    (module docstring)."""
    cfg = load_config(model_dir)
    per_worker = s.batch // s.workers
    single_threads = max(1, os.cpu_count() or 1)  # what `moemesh up` gives a lone worker
    meshes = [UpProcess(model_dir, s.workers, quiet=True)]
    rounds = []
    try:
        meshes.append(UpProcess(model_dir, 1, quiet=True))
        (gateway, coordinator), (gateway1, coordinator1) = ((m.gateway, m.coordinator) for m in meshes)
        with Calibrator(s.workers) as cal:
            def decode(target: tuple[str, str], batch: int, n: int, window: tuple[int, int]) -> MeshDecode:
                return asyncio.run(measure_mesh_decode(*target, batch, s.prompt_len, n, window, cfg.vocab_size))

            def calibrate() -> tuple[CpuRates, Overheads]:
                return cal.rates(), cal.overheads(model_dir, per_worker, s.context, s.overhead_steps)

            for target, batch in (((gateway, coordinator), s.batch), ((gateway1, coordinator1), per_worker)):
                decode(target, batch, 12, (2, 8))  # warm-up: first steps pay for lazy initialisation
            before = calibrate()
            for _ in range(s.rounds):
                engine = engine_step_s(model_dir, per_worker, s.context, s.overhead_steps, single_threads)
                single = decode((gateway1, coordinator1), per_worker, s.new_tokens, s.window)
                measured = decode((gateway, coordinator), s.batch, s.new_tokens, s.window)
                after = calibrate()
                rates, overheads = pooled_rates([before[0], after[0]]), pooled_overheads([before[1], after[1]])
                serving = max(0.0, single.step_s - engine)
                idle = predict_mesh_step(model_dir, s, rates, overheads, serving)
                busy = cal.busy_latency(duty_cycle(idle))
                loaded = replace(rates, a2a_latency_s=busy, gather_latency_s=busy)
                rounds.append(Round(measured, loaded, overheads, serving, rates.a2a_latency_s,
                                    predict_mesh_step(model_dir, s, loaded, overheads, serving)))
                before = after
    finally:
        for mesh in meshes:
            mesh.stop()
    pooled = predict_mesh_step(model_dir, s, pooled_rates([r.rates for r in rounds]),
                               pooled_overheads([r.overheads for r in rounds]),
                               statistics.fmean(r.serving_overhead_s for r in rounds))
    return CheckResult(tuple(rounds), pooled)
