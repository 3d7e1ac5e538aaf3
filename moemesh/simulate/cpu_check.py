"""Prediction against measurement on this machine: the cost model, fed rates measured here, predicts
the decode step of a real CPU mesh (`moemesh up`) measured in the same run. Not pure.

This machine is shared and noisy (two vCPUs; other processes come and go within seconds), so the
run interleaves: every round calibrates (moemesh.simulate.measure.Calibrator: the same number of
one-thread processes as the mesh has workers), measures a window of decode steps on the mesh
(worker Status counters), and calibrates again; the round's prediction uses the mean of the two
calibrations. The result compares the medians over rounds.
"""

from __future__ import annotations

import asyncio
import re
import signal
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from moemesh.errors import MoemeshError
from moemesh.model.config import load_config
from moemesh.simulate.hardware import cpu_profile, cpu_topology
from moemesh.simulate.measure import Calibrator, CpuRates, MeshDecode, Overheads, measure_mesh_decode
from moemesh.simulate.model import Prediction, parse_deployment, predict
from moemesh.simulate.shapes import ModelShape, Workload


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
    predicted: Prediction  # from the mean of the calibrations around the window


@dataclass(frozen=True)
class CheckResult:
    rounds: tuple[Round, ...]

    @property
    def measured_step_s(self) -> float:
        return statistics.median(r.measured.step_s for r in self.rounds)

    @property
    def predicted_step_s(self) -> float:
        return statistics.median(r.predicted.step_s for r in self.rounds)

    @property
    def measured_collective_s(self) -> float:
        return statistics.median(r.measured.collective_s for r in self.rounds)

    @property
    def predicted_comm_s(self) -> float:
        """Predicted exchange time per step (collectives incl. the header)."""
        return statistics.median(r.predicted.comm_s + r.predicted.parts["header_s"] for r in self.rounds)

    @property
    def error(self) -> float:
        """(predicted - measured) / measured, medians over rounds."""
        return self.predicted_step_s / self.measured_step_s - 1.0

    def table(self) -> str:
        lines = [f"{'round':>5} {'measured ms':>12} {'in coll. ms':>12} {'predicted ms':>13} {'pred. comm ms':>14}"]
        for i, r in enumerate(self.rounds):
            p = r.predicted
            lines.append(f"{i:>5} {r.measured.step_s * 1e3:12.1f} {r.measured.collective_s * 1e3:12.1f} "
                         f"{p.step_s * 1e3:13.1f} {(p.comm_s + p.parts['header_s']) * 1e3:14.1f}")
        lines.append(f"{'median':>6} {self.measured_step_s * 1e3:11.1f} {self.measured_collective_s * 1e3:12.1f} "
                     f"{self.predicted_step_s * 1e3:13.1f} {self.predicted_comm_s * 1e3:14.1f}   error {self.error:+.0%}")
        return "\n".join(lines)


def _mean_rates(a: CpuRates, b: CpuRates) -> CpuRates:
    """Rates with the mean *time* of the two (harmonic mean of rates, mean of latencies)."""
    h = lambda x, y: 2.0 / (1.0 / x + 1.0 / y)
    return CpuRates(processes=a.processes, matmul_flops_per_s=h(a.matmul_flops_per_s, b.matmul_flops_per_s),
                    stream_bytes_per_s=h(a.stream_bytes_per_s, b.stream_bytes_per_s),
                    a2a_latency_s=(a.a2a_latency_s + b.a2a_latency_s) / 2,
                    a2a_bytes_per_s=h(a.a2a_bytes_per_s, b.a2a_bytes_per_s),
                    gather_latency_s=(a.gather_latency_s + b.gather_latency_s) / 2,
                    lockstep_skew=(a.lockstep_skew + b.lockstep_skew) / 2)


def _mean_overheads(a: Overheads, b: Overheads) -> Overheads:
    return Overheads(*((x + y) / 2 for x, y in zip(a.__dict__.values(), b.__dict__.values())))


def predict_mesh_step(model_dir: Path, s: CheckSettings, rates: CpuRates, overheads: Overheads) -> Prediction:
    """The cost model's decode step for `s.workers` CPU workers (one expert group, no overlap)."""
    cfg = load_config(model_dir)
    shape = ModelShape.from_config(cfg, dtype_bytes=4)  # the CPU engine computes in fp32
    dep = parse_deployment(f"ep{s.workers}", cfg.num_experts, s.workers)
    work = Workload(batch=s.batch, seq=s.context, phase="decode", micro_batches=1)
    profile = cpu_profile(rates, overheads, rates.lockstep_skew)
    return predict(shape, dep, work, cpu_topology(rates, s.workers), profile, method="round-robin")


def start_mesh(model_dir: Path, workers: int, extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str, str]:
    """`moemesh up` as a subprocess; returns (process, gateway, coordinator) once it is ready."""
    proc = subprocess.Popen([sys.executable, "-m", "moemesh.cli", "up", "--model", str(model_dir), "--workers",
                             str(workers), "--port", "0", "--max-model-len", "256", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    match = re.search(r"gateway at (\S+); coordinator at (\S+);", line)
    if not match:
        proc.kill()
        proc.wait()
        raise MoemeshError(f"moemesh up with {workers} workers did not start: {line!r}")
    return proc, match.group(1), match.group(2)


def stop_mesh(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def check_cpu_mesh(model_dir: Path, s: CheckSettings = CheckSettings()) -> CheckResult:
    """Start the mesh, then run `s.rounds` interleaved rounds (module docstring)."""
    cfg = load_config(model_dir)
    proc, gateway, coordinator = start_mesh(model_dir, s.workers)
    rounds = []
    try:
        with Calibrator(s.workers) as cal:
            decode = lambda n, window: asyncio.run(measure_mesh_decode(
                gateway, coordinator, s.batch, s.prompt_len, n, window, cfg.vocab_size))
            decode(12, (2, 8))  # warm-up: first steps pay for lazy initialisation
            calibrate = lambda: (cal.rates(), cal.overheads(model_dir, s.batch // s.workers, s.context,
                                                            s.overhead_steps))
            before = calibrate()
            for _ in range(s.rounds):
                measured = decode(s.new_tokens, s.window)
                after = calibrate()
                rates, overheads = _mean_rates(before[0], after[0]), _mean_overheads(before[1], after[1])
                rounds.append(Round(measured, predict_mesh_step(model_dir, s, rates, overheads)))
                before = after
    finally:
        stop_mesh(proc)
    return CheckResult(tuple(rounds))
