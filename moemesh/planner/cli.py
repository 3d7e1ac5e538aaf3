"""`moemesh plan`: place experts for a topology and a routing, print the tables, draw the PNG.

    moemesh plan --topology paper-16xh100 --experts 16 --layers 4 --skew zipf:1.2 --out plan.png
    moemesh plan --topology cluster.yaml --model ./ckpt --trace routing.json --write-placement p.yaml

`add_plan_command(sub)` follows moemesh.cli's protocol (adds the subcommand, returns its runner);
`main(argv)` is a stand-alone entry point: `python -m moemesh.planner.cli plan ...`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

# This package's matrices are small: BLAS threads only contend (10x slower on a busy 2-core
# machine). Effective only when numpy is not loaded yet (python -m moemesh.planner.cli).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from moemesh.errors import ConfigError, InvalidRequestError, MoemeshError
from moemesh.settings import add_options, option, parse_bool, settings_from

Runner = Callable[[argparse.Namespace], int]
PAPER_EXPERT = (8192, 32768, 2, 2)  # hidden, intermediate, dtype bytes, matrices (two linears)


@dataclass(frozen=True)
class PlanSettings:
    """`moemesh plan`: the topology, the experts (--model, or --experts with --layers), the routing
    (--trace or --skew) and the outputs. Flags only (no MOEMESH_* variables): a command line says
    what was planned."""

    ENV_PREFIX: ClassVar[str | None] = None

    topology: str = option("--topology", "a YAML file or a preset: paper-16xh100, h100x64, h100x256, h100x1024, "
                           "local")
    devices: int | None = option("--devices", "resize a preset to G devices (8 per node; local: one node)", int,
                                 default=None)
    model: Path | None = option("--model", "checkpoint folder: experts, MoE layers, top-k and expert size", Path,
                                default=None)
    experts: int | None = option("--experts", "experts per MoE layer (with --layers)", int, default=None)
    layers: int | None = option("--layers", "MoE layers (with --experts)", int, default=None)
    top_k: int | None = option("--top-k", "experts per token (unset: 2; --model: the model's)", int, default=None)
    trace: Path | None = option("--trace", "measured routing (a moemesh trace file) instead of --skew", Path,
                                default=None)
    skew: str = option("--skew", "synthetic routing: zipf:S[,groups:N][,affinity:A] or uniform", default="zipf:1.2")
    seed: int = option("--seed", "seed of the synthetic routing", int, default=0)
    method: str = option("--method", "placement method", default="ours",
                         choices=("ours", "swap", "round-robin", "aligned"))
    slots: int | None = option("--slots", "experts per device per layer (> ceil(E/G) adds replica slots)", int,
                               default=None)
    tokens_per_device: float = option("--tokens-per-device", "batch each device routes per layer", float,
                                      default=256.0)
    dedupe: bool = option("--no-dedupe", "price every cross-node copy (no send-once-per-node)", parse_bool,
                          default=True)
    hidden: int = option("--hidden", "expert hidden size (no --model)", int, default=PAPER_EXPERT[0])
    intermediate: int = option("--intermediate", "expert MLP size (no --model)", int, default=PAPER_EXPERT[1])
    dtype_bytes: int = option("--dtype-bytes", "bytes per weight / activation", int, default=PAPER_EXPERT[2])
    matrices: int = option("--matrices", "weight matrices per expert (SwiGLU: 3)", int, default=PAPER_EXPERT[3])
    out: Path | None = option("--out", "write the heat map PNG here", Path, default=None)
    write_placement: Path | None = option("--write-placement", "write the placement (YAML, coordinator --placement)",
                                          Path, default=None)

    def __post_init__(self) -> None:
        if (self.model is None) == (self.experts is None):
            raise ConfigError("give one of --model DIR or --experts N (with --layers)")
        if self.experts is not None and self.layers is None:
            raise ConfigError("--experts needs --layers")
        if self.model is not None and self.layers is not None:
            raise ConfigError("--layers comes from --model; give one of them")


def add_plan_command(sub: argparse._SubParsersAction) -> Runner:
    """Register `plan`; returns its runner."""
    p = sub.add_parser("plan", help="place experts on a topology for a routing; print loads, draw a PNG")
    add_options(p, PlanSettings)

    def run(args: argparse.Namespace) -> int:
        return run_plan(settings_from(PlanSettings, args, {}))

    return run


def run_plan(s: PlanSettings) -> int:
    from moemesh.planner.render import (
        device_table,
        link_table,
        placement_table,
        summary_table,
        write_png,
    )
    from moemesh.planner.search import plan

    problem = build_problem(s)
    result = plan(problem, s.method)
    t = problem.traffic
    print(problem.topology.describe())
    print(f"{problem.num_experts} experts x {len(problem.layer_ids)} MoE layers, top-{t.top_k}, "
          f"{problem.slots_per_device} slot(s) per device per layer; routing: {t.origin}; "
          f"{problem.shape.token_bytes} B per token, {problem.shape.expert_bytes / 1e6:.1f} MB per expert")
    for title, body in (("placement (experts per device; * = replicated)", placement_table(result, problem)),
                        ("links (dispatch; combine mirrors)", link_table(result)),
                        ("devices", device_table(result)),
                        ("summary", summary_table(result))):
        print(f"\n== {title}\n{body}")
    if s.out is not None:
        print(f"\nwrote {write_png(result, problem, s.out)}")
    if s.write_placement is not None:
        from moemesh.mesh.placement_file import dump_placement

        s.write_placement.write_text(dump_placement(result.placement))
        print(f"wrote {s.write_placement}")
    return 0


def build_problem(s: PlanSettings):
    """The Problem the settings describe: topology, experts and layers, traffic, expert shape."""
    from moemesh.planner.cost import CostOptions, ExpertShape
    from moemesh.planner.problem import Problem
    from moemesh.planner.topology import resolve_topology
    from moemesh.planner.traffic import load_trace, parse_skew, synthetic

    topo = resolve_topology(s.topology, s.devices)
    limit = None  # (n_group, topk_group) of a model with group-limited routing
    # Step 1: experts, layers, top-k and expert size: from the model or the flags
    if s.model is not None:
        from moemesh.model.config import load_config

        cfg = load_config(s.model)
        experts, layer_ids, top_k = cfg.num_experts, cfg.moe_layer_ids, s.top_k or cfg.top_k
        shape = ExpertShape.from_config(cfg)
        grouped = cfg.grouped_routing
        limit = (grouped.n_group, grouped.topk_group) if grouped else None
    else:
        if s.experts is None or s.experts < 1 or s.layers is None or s.layers < 1:
            raise InvalidRequestError("--experts and --layers must be positive")
        experts, layer_ids, top_k = s.experts, tuple(range(s.layers)), s.top_k or 2
        shape = ExpertShape(s.hidden, s.intermediate, s.dtype_bytes, s.matrices)
    # Step 2: the routing: a trace, or synthetic skew
    if s.trace is not None:
        traffic = load_trace(s.trace)
        if traffic.num_experts != experts:
            raise InvalidRequestError(f"trace {s.trace} has {traffic.num_experts} experts, the model {experts}")
        if s.model is not None and set(traffic.layer_ids) != set(layer_ids):
            raise InvalidRequestError(f"trace {s.trace} covers layers {list(traffic.layer_ids)}, "
                                      f"the model's MoE layers are {list(layer_ids)}")
    else:
        traffic = synthetic(experts, layer_ids, topo.devices, top_k=top_k, skew=parse_skew(s.skew),
                            tokens_per_source=s.tokens_per_device, seed=s.seed, group_limit=limit)
    return Problem(topo, traffic, shape, CostOptions(dedupe_per_node=s.dedupe), slots=s.slots)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moemesh", description="expert placement planner")
    sub = parser.add_subparsers(dest="command", required=True)
    runner = add_plan_command(sub)
    args = parser.parse_args(argv)
    try:
        return runner(args)
    except MoemeshError as exc:
        print(f"moemesh {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
