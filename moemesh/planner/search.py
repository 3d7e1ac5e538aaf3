"""Placement search, the entry point: round-robin, the paper's swap search, and ours. Pure numpy.

Each method takes a `Problem` (topology, expected routing, expert shape, cost options) and returns
a `Plan`: a moemesh.mesh.placement.Placement plus a `PlanReport` (its cost, round-robin's cost for
comparison, run time, accepted swaps). All keep the constraints listed in moemesh.planner.problem.

- `round_robin`: expert e on device e mod G; with spare devices, device r >= E holds a replica of
  expert r mod E (moemesh.mesh.placement.initial_placement). The paper's starting point.
- `swap_search`: the paper's loop (moemesh.planner.swap).
- `topology_aware`: ours (moemesh.planner.topology_aware).
- `aligned`: contiguous blocks of experts, node by node (moemesh.planner.groups.aligned_slots):
  DeepSeek-V3's expert groups sit whole on nodes, so a token's copies reach at most topk_group
  nodes' worth; no balancing.
- `price_change`: what moving from one placement to another costs and whether it pays
  (moemesh.planner.price).
"""

from __future__ import annotations

import time

from moemesh.mesh.placement import Placement
from moemesh.planner.groups import aligned_slots
from moemesh.planner.price import ChangePrice, keep_paying, price_change
from moemesh.planner.problem import (
    Plan,
    PlanReport,
    Problem,
    SwapStep,
    make_plan,
    round_robin_slots,
)
from moemesh.planner.swap import SwapBudget, swap_layer, swap_search
from moemesh.planner.topology_aware import topology_aware

METHODS = ("round-robin", "swap", "ours", "aligned")

__all__ = ["METHODS", "ChangePrice", "Plan", "PlanReport", "Problem", "SwapBudget", "SwapStep", "aligned",
           "keep_paying", "plan", "price_change", "round_robin", "swap_layer", "swap_search", "topology_aware"]


def round_robin(problem: Problem, epoch: int = 1) -> Plan:
    """The paper's starting point, priced."""
    start = time.perf_counter()
    problem.check_memory()
    slots = round_robin_slots(problem)
    cost = problem.model.evaluate_slots(slots, problem.traffic)
    return make_plan("round-robin", problem, slots, cost, cost, start, epoch)


def aligned(problem: Problem, epoch: int = 1) -> Plan:
    """Contiguous blocks of experts (groups aligned with nodes), priced."""
    start = time.perf_counter()
    problem.check_memory()
    slots = aligned_slots(problem.num_experts, problem.topology.devices, problem.slots_per_device,
                          len(problem.layer_ids))
    cost = problem.model.evaluate_slots(slots, problem.traffic)
    rr = problem.model.evaluate_slots(round_robin_slots(problem), problem.traffic)
    return make_plan("aligned", problem, slots, cost, rr, start, epoch)


def plan(problem: Problem, method: str = "ours", current: Placement | None = None, epoch: int = 1,
         budget: SwapBudget = SwapBudget()) -> Plan:
    """Run one method: "round-robin", "swap" (with `budget`), "ours" (keeps `current` in place
    where it costs nothing) or "aligned"."""
    if method == "round-robin":
        return round_robin(problem, epoch)
    if method == "swap":
        return swap_search(problem, budget, epoch=epoch)
    if method == "ours":
        return topology_aware(problem, current, epoch=epoch)
    if method == "aligned":
        return aligned(problem, epoch)
    raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
