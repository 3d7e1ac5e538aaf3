"""moemesh.planner: where experts go. Pure: numpy, no gRPC, no torch.distributed.

    topology  Topology (nodes, devices, memory, NVLink / InfiniBand ports), presets, YAML
    traffic   Traffic (tokens [L, S, E], co-activation [L, E, E]): synthetic, measured, trace files
    cost      CostModel: per-port bytes and seconds, per-device tokens, predicted layer time
    replicas  EPLB-style replica counts and balanced packing
    swap      the paper's swap search
    topology_aware  topology-aware placement with replicas (the default)
    slots     a placement as a [L, G, P] slot table (whole experts only)
    price     what a placement change moves, and whether it pays
    search    Problem -> Plan (Placement + PlanReport) for each method
    cli       `moemesh plan`

Typical use:

    problem = Problem(Topology.preset("paper-16xh100"), synthetic(16, 4, 16, skew=1.2), ExpertShape.paper())
    result = plan(problem)             # result.placement: moemesh.mesh.placement.Placement
    result.report.link_gain            # round-robin's max link load / ours
"""

from moemesh.planner.cost import (
    CostModel,
    CostOptions,
    ExpertShape,
    PlacementCost,
    evaluate,
)
from moemesh.planner.price import ChangePrice, keep_paying, price_change
from moemesh.planner.problem import Plan, PlanReport, Problem
from moemesh.planner.search import (
    METHODS,
    plan,
    round_robin,
    swap_search,
    topology_aware,
)
from moemesh.planner.swap import SwapBudget
from moemesh.planner.topology import LinkSpec, Topology, load_topology, resolve_topology
from moemesh.planner.traffic import (
    Skew,
    Traffic,
    from_counts,
    load_trace,
    parse_skew,
    save_trace,
    synthetic,
)

__all__ = [
    "METHODS", "ChangePrice", "CostModel", "CostOptions", "ExpertShape", "LinkSpec", "PlacementCost", "Plan",
    "PlanReport", "Problem", "Skew", "SwapBudget", "Topology", "Traffic", "evaluate", "from_counts", "keep_paying",
    "load_topology", "load_trace", "parse_skew", "plan", "price_change", "resolve_topology", "round_robin",
    "save_trace", "swap_search", "synthetic", "topology_aware",
]
