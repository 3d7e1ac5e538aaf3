"""Benchmark the placement planners (`make bench-balance`): round-robin, the paper's swap search, ours.

From one run on synthetic Zipf-skewed routing (0.8, 1.2, 1.6) over H100 clusters of 16, 64 and
256 devices (8 per node, NVLink 400 GB/s, InfiniBand 200 GB/s per node), 64 MoE layers:

- table A, the paper's regime: E = G experts, one per device, no spare device;
- table B, 25% spare devices: E = G experts on 1.25 G devices (one expert per device per layer);
- table C, 25% spare slots: E = 4 G experts, 5 slots per device (16 layers: E = 1024 is large).

Per row: max/mean device load (worst layer), the busiest link's time summed over layers (and the
gain over round-robin), predicted MoE time of one batch, planner run time, and the bytes one
rebalance moves after a drift (25% of each layer's experts trade popularity): ours replans from
its current placement; "paying" keeps only the layers whose gain over the next 1000 batches pays
for their transfer; then max/mean device load and run time of that replan. Experts: hidden 7168,
intermediate 2048, BF16, SwiGLU (88 MB); top-k 8 (top-2 for 16 experts); 256 tokens per device per batch.

    python scripts/bench_balance.py [--quick] [--layers 64]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # small matrices: BLAS threads only contend

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moemesh.planner.cost import ExpertShape
from moemesh.planner.price import price_change
from moemesh.planner.problem import Plan, Problem
from moemesh.planner.search import SwapBudget, plan
from moemesh.planner.topology import h100_cluster
from moemesh.planner.traffic import shifted, synthetic
from moemesh.settings import option, parse_bool, parse_settings

SHAPE = ExpertShape(hidden_size=7168, intermediate_size=2048, dtype_bytes=2, matrices=3)
SKEWS = (0.8, 1.2, 1.6)
WINDOW_BATCHES = 1000


@dataclass(frozen=True)
class BenchBalanceSettings:
    """The cluster sizes and layers to plan; flags only (a command line says what ran)."""

    ENV_PREFIX: ClassVar[str | None] = None

    quick: bool = option("--quick", "16 and 64 devices, 8 layers", parse_bool, default=False)
    layers: int = option("--layers", "MoE layers (without --quick)", int, default=64)

    @property
    def sizes(self) -> tuple[int, ...]:
        return (16, 64) if self.quick else (16, 64, 256)

    @property
    def planned_layers(self) -> int:
        return 8 if self.quick else self.layers


@dataclass(frozen=True)
class Case:
    table: str
    devices: int
    experts: int
    layers: int
    slots: int | None = None

    @property
    def top_k(self) -> int:
        return 2 if self.experts <= 16 else 8


def cases(sizes: tuple[int, ...], layers: int) -> list[Case]:
    out = [Case("A", g, g, layers) for g in sizes]
    out += [Case("B", g * 5 // 4, g, layers) for g in sizes]
    out += [Case("C", g, 4 * g, min(layers, 16), slots=5) for g in sizes]
    return out


def run_case(case: Case, skew: float, seed: int = 0) -> list[str]:
    topo = h100_cluster(case.devices)
    traffic = synthetic(case.experts, case.layers, case.devices, top_k=case.top_k, skew=skew, seed=seed)
    drifted = shifted(traffic, 0.25, seed=seed + 100)
    before = Problem(topo, traffic, SHAPE, slots=case.slots)
    after = Problem(topo, drifted, SHAPE, slots=case.slots)
    budget = SwapBudget(evaluations=64 if case.experts > 256 else 256)
    window = WINDOW_BATCHES * float(traffic.tokens_per_layer.mean())
    rows = []
    for method in ("round-robin", "swap", "ours"):
        first = plan(before, method, budget=budget)
        again = plan(after, method, current=first.placement, budget=budget)
        price = price_change(first.placement, again.placement, after, window)
        rows.append(_row(case, skew, method, first, again, price.total_bytes, price.paying_bytes))
    return rows


def _row(case: Case, skew: float, method: str, result: Plan, replanned: Plan, moved: float, paying: float) -> str:
    r = result.report
    return (f"{case.table:<2} {skew:>4} {case.devices:>5} {case.experts:>5} {case.layers:>3} {method:<12} "
            f"{r.cost.balance.max():>8.3f} {r.cost.total_max_link_s * 1e3:>10.2f} {r.link_gain:>6.2f} "
            f"{r.cost.total_layer_s * 1e3:>9.2f} {r.runtime_s:>8.3f} {moved / 1e9:>9.2f} {paying / 1e9:>9.2f} "
            f"{replanned.report.cost.balance.max():>8.3f} {replanned.report.runtime_s:>8.3f}")


def main(argv: list[str] | None = None) -> int:
    s = parse_settings(BenchBalanceSettings, argv, __doc__.splitlines()[0])
    print(__doc__.split("\n\n")[1].strip() + "\n")
    print(f"{'':2} {'zipf':>4} {'G':>5} {'E':>5} {'L':>3} {'method':<12} {'max/mean':>8} {'maxlink ms':>10} "
          f"{'gain':>6} {'MoE ms':>9} {'plan s':>8} {'moved GB':>9} {'paying GB':>9} {'max/mean':>8} {'replan s':>8}")
    start = time.perf_counter()
    for case in cases(s.sizes, s.planned_layers):
        for skew in SKEWS:
            for row in run_case(case, skew):
                print(row, flush=True)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
