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

# This package's matrices are small: BLAS threads only contend (10x slower on a busy 2-core
# machine). Effective only when numpy is not loaded yet (python -m moemesh.planner.cli).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from moemesh.errors import InvalidRequestError, MoemeshError

Runner = Callable[[argparse.Namespace], int]
PAPER_EXPERT = (8192, 32768, 2, 2)  # hidden, intermediate, dtype bytes, matrices (two linears)


@dataclass(frozen=True)
class PlanSettings:
    topology: str
    devices: int | None
    model: Path | None
    experts: int | None
    layers: int | None
    top_k: int
    trace: Path | None
    skew: str
    seed: int
    method: str
    slots: int | None
    tokens_per_device: float
    dedupe: bool
    hidden: int
    intermediate: int
    dtype_bytes: int
    matrices: int
    out: Path | None
    write_placement: Path | None


def add_plan_command(sub: argparse._SubParsersAction) -> Runner:
    """Register `plan`; returns its runner."""
    p = sub.add_parser("plan", help="place experts on a topology for a routing; print loads, draw a PNG")
    p.add_argument("--topology", required=True, help="a YAML file or a preset: paper-16xh100, h100x64, "
                   "h100x256, h100x1024, local")
    p.add_argument("--devices", type=int, help="resize a preset to G devices (8 per node; local: one node)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", type=Path, help="checkpoint folder: experts, MoE layers, top-k and expert size")
    what.add_argument("--experts", type=int, help="experts per MoE layer (with --layers)")
    p.add_argument("--layers", type=int, help="MoE layers (with --experts)")
    p.add_argument("--top-k", type=int, default=None, help="experts per token (default 2; --model: the model's)")
    p.add_argument("--trace", type=Path, help="measured routing (a moemesh trace file) instead of --skew")
    p.add_argument("--skew", default="zipf:1.2", help="synthetic routing: zipf:S[,groups:N][,affinity:A] or uniform")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic routing")
    p.add_argument("--method", default="ours", choices=("ours", "swap", "round-robin"))
    p.add_argument("--slots", type=int, help="experts per device per layer (> ceil(E/G) adds replica slots)")
    p.add_argument("--tokens-per-device", type=float, default=256.0, help="batch each device routes per layer")
    p.add_argument("--no-dedupe", action="store_true", help="price every cross-node copy (no send-once-per-node)")
    p.add_argument("--hidden", type=int, default=PAPER_EXPERT[0], help="expert hidden size (no --model)")
    p.add_argument("--intermediate", type=int, default=PAPER_EXPERT[1], help="expert MLP size (no --model)")
    p.add_argument("--dtype-bytes", type=int, default=PAPER_EXPERT[2], help="bytes per weight / activation")
    p.add_argument("--matrices", type=int, default=PAPER_EXPERT[3], help="weight matrices per expert (SwiGLU: 3)")
    p.add_argument("--out", type=Path, help="write the heat map PNG here")
    p.add_argument("--write-placement", type=Path, help="write the placement (YAML, coordinator --placement)")

    def run(args: argparse.Namespace) -> int:
        return run_plan(settings_from_args(args))

    return run


def settings_from_args(args: argparse.Namespace) -> PlanSettings:
    if args.experts is not None and args.layers is None:
        raise InvalidRequestError("--experts needs --layers")
    if args.model is not None and args.layers is not None:
        raise InvalidRequestError("--layers comes from --model; give one of them")
    return PlanSettings(
        topology=args.topology, devices=args.devices, model=args.model, experts=args.experts, layers=args.layers,
        top_k=args.top_k, trace=args.trace, skew=args.skew, seed=args.seed, method=args.method, slots=args.slots,
        tokens_per_device=args.tokens_per_device, dedupe=not args.no_dedupe, hidden=args.hidden,
        intermediate=args.intermediate, dtype_bytes=args.dtype_bytes, matrices=args.matrices, out=args.out,
        write_placement=args.write_placement,
    )


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
    # Step 1: experts, layers, top-k and expert size: from the model or the flags
    if s.model is not None:
        from moemesh.model.config import load_config

        cfg = load_config(s.model)
        experts, layer_ids, top_k = cfg.num_experts, cfg.moe_layer_ids, s.top_k or cfg.top_k
        shape = ExpertShape.from_config(cfg)
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
                            tokens_per_source=s.tokens_per_device, seed=s.seed)
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
