"""`moemesh simulate`: predict a deployment's per-layer timeline, TPOT and TPS from first principles.

    moemesh simulate --topology paper-16xh100 --model paper --deployment ep16
    moemesh simulate --topology paper-16xh100 --model deepseek-v3 --deployment ep64
    moemesh simulate --topology cluster.yaml --model ./ckpt --deployment tp8pp2 --batch 256 --seq 2048
    moemesh simulate --topology local --model ./ckpt --deployment ep2 --measure   # this machine's rates

Prints the per-layer timeline (attention, dispatch, expert compute, combine, hidden share), the
step summary and an EP scaling table (16 .. 1024 devices); with `--model paper` also the paper's
table beside our predictions and where the paper's numbers disagree with each other; for a model
with group-limited routing (`--model deepseek-v3`) the nodes a token reaches with and without the
limit and what aligning groups with nodes saves (moemesh.simulate.grouped); `--out PNG` writes the
scaling chart, `--json FILE` everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from moemesh.errors import MoemeshError
from moemesh.settings import add_options, option, parse_bool, settings_from

PLACEMENTS = ("round-robin", "swap", "ours", "aligned")  # moemesh.planner.search.METHODS
SHORT_CONTEXT = 128  # the scaling sweep also runs at this context, where weights and links dominate


def _sweep(text: str) -> tuple[int, ...]:
    """"16:1024" -> powers of two from 16 to 1024; "16,64,256" -> those; "" -> none."""
    if not text:
        return ()
    if ":" in text:
        lo, hi = (int(x) for x in text.split(":"))
        return tuple(2**i for i in range(int(math.log2(lo)), int(math.log2(hi)) + 1))
    return tuple(int(x) for x in text.split(","))


def _micro_batches(text: str) -> int:
    """"auto" -> 0 (the faster of 1 and 2), else the count."""
    return 0 if text == "auto" else int(text)


@dataclass(frozen=True)
class SimulateSettings:
    """`moemesh simulate`: what to predict. Flags only (no MOEMESH_* variables): the JSON report
    records these settings, and they are the whole input."""

    ENV_PREFIX: ClassVar[str | None] = None

    topology: str = option("--topology", "preset (paper-16xh100, h100x64, local, ...) or YAML",
                           default="paper-16xh100")
    model: str = option("--model", 'checkpoint folder or a preset: "paper", "deepseek-v3"', default="paper")
    deployment: str = option("--deployment", "ep<N>, colocated<k> or tp<T>pp<P>", default="ep16")
    # sequences, whole deployment (None: the paper's 1024, else 64 per device)
    batch: int | None = option("--batch", "sequences in flight, whole deployment", int, default=None)
    # context (decode) or prompt length (prefill); None: 10000 for paper, else 1024
    seq: int | None = option("--seq", "context tokens (decode) / prompt tokens (prefill)", int, default=None)
    phase: str = option("--phase", "decode or prefill", default="decode", choices=("decode", "prefill"))
    micro_batches: int = option("--micro-batches", "1, 2, ... or auto (0: the faster of 1 and 2)", _micro_batches,
                                default=0)
    placement: str = option("--placement", "the planner's method", default="ours", choices=PLACEMENTS)
    skew: str = option("--skew", "routing skew for the planner's traffic, e.g. zipf:1.2", default="uniform")
    top_k: int | None = option("--top-k", "override the model's top-k", int, default=None)
    measure: bool = option("--measure", "measure this CPU first (one process per device; --model DIR; no serving "
                           "overhead)", parse_bool, default=False)
    # a GPU check's gpu-check.json: its measured matmul rate and bandwidth
    rates: Path | None = option("--rates", "use the rates a GPU check measured (docs/gpu-check/gpu-check.json)",
                                Path, default=None, metavar="GPU_CHECK_JSON")
    sweep: tuple[int, ...] = option("--sweep", "EP scaling devices: 16:1024 (powers of two), 16,64,256, or empty",
                                    _sweep, default=_sweep("16:1024"))
    out: Path | None = option("--out", "write the EP scaling chart (PNG) here", Path, default=None)
    json_path: Path | None = option("--json", "also write the results here", Path, default=None, metavar="FILE")


def add_simulate_command(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    p = sub.add_parser("simulate", help="predict TPS / TPOT of a deployment from FLOPs, bytes and links")
    add_options(p, SimulateSettings)

    def run(args: argparse.Namespace) -> int:
        return simulate(settings_from(SimulateSettings, args, {}))

    return run


def _inputs(s: SimulateSettings):
    """(shape, topology, profile) for the settings (before any --measure)."""
    from moemesh.model.config import load_config
    from moemesh.planner.topology import resolve_topology
    from moemesh.simulate.hardware import profile_for
    from moemesh.simulate.shapes import PRESETS, ModelShape, preset

    if s.model in PRESETS:
        shape = preset(s.model)
    else:
        shape = ModelShape.from_config(load_config(s.model), name=Path(s.model).name)
    if s.top_k:
        shape = replace(shape, top_k=s.top_k)
    topo = resolve_topology(s.topology)
    profile = profile_for(topo)
    if s.rates:
        from moemesh.simulate.hardware import profile_from_gpu_check

        profile = profile_from_gpu_check(s.rates, profile)
    return shape, topo, profile


def _measured(s: SimulateSettings, shape, dep, work):
    """This CPU's profile and loopback topology, measured now with one process per device: rates,
    engine overheads, and the all_to_all latency in the predicted step's duty cycle (as
    moemesh.simulate.cpu_check does; a worker's serving overhead needs a mesh and is left out)."""
    from moemesh.simulate.cpu_check import duty_cycle
    from moemesh.simulate.hardware import cpu_profile, cpu_topology
    from moemesh.simulate.measure import Calibrator
    from moemesh.simulate.step_cost import predict

    if not Path(s.model).is_dir():
        raise MoemeshError("--measure measures this CPU: give --model DIR (a checkpoint the CPU mesh serves)")
    shape = replace(shape, dtype_bytes=4)  # the CPU engine computes in fp32
    with Calibrator(dep.devices) as cal:
        rates = cal.rates()
        overheads = cal.overheads(s.model, max(1, round(work.batch / dep.devices)), work.seq)
        profile = cpu_profile(rates, overheads)
        first = predict(shape, dep, work, cpu_topology(rates, dep.devices), profile, s.placement)
        busy = cal.busy_latency(duty_cycle(first))
    rates = replace(rates, a2a_latency_s=busy, gather_latency_s=busy)
    return shape, cpu_topology(rates, dep.devices), cpu_profile(rates, overheads)


def simulate(s: SimulateSettings) -> int:
    from moemesh.planner.traffic import parse_skew
    from moemesh.simulate.paper import (
        PAPER_BATCH,
        PAPER_SEQ,
        findings,
        paper_predictions,
        paper_table,
    )
    from moemesh.simulate.shapes import Workload
    from moemesh.simulate.step_cost import parse_deployment, predict
    from moemesh.simulate.sweep import ep_scaling, plot_scaling, scaling_table

    shape, topo, profile = _inputs(s)
    paper = s.model == "paper"
    dep = parse_deployment(s.deployment, shape.experts, topo.devices)
    batch = s.batch or (PAPER_BATCH if paper else 64 * dep.devices)
    seq = s.seq or (PAPER_SEQ if paper else 1024)
    work = Workload(batch, seq, s.phase, s.micro_batches)
    if s.measure:
        shape, topo, profile = _measured(s, shape, dep, work)
    pred = predict(shape, dep, work, topo, profile, s.placement, parse_skew(s.skew))
    print(f"model: {shape.name}; top-{shape.top_k}; {shape.dtype_bytes} B per element")
    print(f"topology: {topo.describe()}")
    print(f"device: {profile.name} ({profile.source})")
    print(timeline_table(pred))
    report: dict[str, Any] = {"settings": {k: str(v) for k, v in asdict(s).items()},
                              "prediction": prediction_dict(pred)}
    if paper:
        preds = paper_predictions(shape, topo, profile, batch, seq, s.placement)
        print()
        print(paper_table(preds))
        print("\nwhere the paper's numbers disagree with each other:")
        notes = findings(shape, profile, preds, batch, seq, topo.devices)
        for i, f in enumerate(notes, 1):
            print(f"{i:>2}. {f.claim}: {f.derived}")
        report["paper"] = [{"deployment": d, "workload": w, **prediction_dict(p)} for d, w, p in preds]
        report["findings"] = [asdict(f) for f in notes]
    if shape.grouped and s.sweep:
        from moemesh.simulate.grouped import group_effect, group_table

        rows = group_effect(shape, topo, s.sweep, max(1, round(batch / dep.devices)), profile)
        print(f"\ngroup-limited routing (top-{shape.top_k} in {shape.grouped.topk_group} of {shape.grouped.n_group} "
              f"groups), decode, uniform routing; remote nodes per token and InfiniBand bytes (dispatch + combine):")
        print(group_table(rows))
        report["groups"] = [asdict(r) for r in rows]
    if s.sweep:
        per_device = max(1, round(batch / dep.devices))
        contexts = sorted({seq, SHORT_CONTEXT}, reverse=True)
        points = [p for c in contexts for p in ep_scaling(shape, topo, profile, per_device, c, s.sweep, s.placement)]
        print(f"\nEP scaling, decode, {per_device} sequences per device, contexts {contexts}:")
        print(scaling_table(points))
        report["scaling"] = [{"devices": p.devices, "replicated": prediction_dict(p.replicated),
                              "distinct": prediction_dict(p.distinct)} for p in points]
        if s.out:
            plot_scaling(points, s.out, f"{shape.name} on {topo.name.split('@')[0]}: EP scaling, "
                                        f"{per_device} decoding sequences per device")
            print(f"wrote {s.out}")
    if s.json_path:
        s.json_path.write_text(json.dumps(report, indent=2, default=float) + "\n")
    return 0


def timeline_table(p) -> str:
    """The per-layer timeline and the step summary of one prediction, as text (times in ms)."""
    a, b = p.comm_labels
    w = p.workload
    shared_head = f" {'shared':>10}" if any(r.shared_s for r in p.rows) else ""  # shared experts, beside the dispatch
    lines = [f"deployment {p.deployment.name}: {p.deployment.devices} devices, exchange group {p.deployment.group}"
             f"{f', {p.deployment.pp} stages' if p.deployment.pp > 1 else ''}; placement: {p.placement}",
             f"workload: {w.phase}, batch {w.batch}, {'context' if w.phase == 'decode' else 'prompt'} {w.seq}, "
             f"{p.parts.get('micro_batches', w.micro_batches)} micro-batch(es)",
             f"{'layer':>5} {'attention':>10} {a:>10}{shared_head} {'experts':>10} {b:>10} {'layer span':>11} "
             f"{'hidden':>7}   (ms)"]
    for r in p.rows:
        h = "-" if r.hidden_share is None else f"{r.hidden_share:.0%}"
        sh = f" {r.shared_s * 1e3:>10.3f}" if shared_head else ""
        lines.append(f"{r.layer:>5} {r.attention_s * 1e3:>10.3f} {r.dispatch_s * 1e3:>10.3f}{sh} "
                     f"{r.experts_s * 1e3:>10.3f} {r.combine_s * 1e3:>10.3f} {r.span_s * 1e3:>11.3f} {h:>7}")
    if p.deployment.kind == "tp":
        lines.append(f"(one pipeline stage, one micro-batch; a token crosses {p.deployment.pp} stages: "
                     f"stage {p.parts['stage_s'] * 1e3:.3f} ms + hop {p.parts['hop_s'] * 1e3:.3f} ms each)")
    hidden = "-" if p.hidden_share is None else f"{p.hidden_share:.0%}"
    tpot = f"{p.tpot_s * 1e3:.3f} ms" if p.tpot_s else "- (prefill)"
    ms = {name: p.parts[f"{name}_s"] * 1e3 for name in ("layers", "head", "overhead", "header")}
    lines.append(f"step {p.step_s * 1e3:.3f} ms (layers {ms['layers']:.3f}, lm head {ms['head']:.3f},"
                 f" overhead {ms['overhead']:.3f}, header {ms['header']:.3f}); TPOT {tpot}; "
                 f"TPS {p.tps:,.0f} ({p.tps_per_device:,.0f} per device)")
    lines.append(f"communication {p.comm_s * 1e3:.3f} ms per step, exposed {p.exposed_comm_s * 1e3:.3f} ms, "
                 f"hidden {hidden}; "
                 f"memory {p.memory_bytes / 1e9:.2f} GB per device{'' if p.memory_ok else ' -- DOES NOT FIT'}")
    return "\n".join(lines)


def prediction_dict(p) -> dict:
    return {"deployment": p.deployment.name, "devices": p.deployment.devices, "phase": p.workload.phase,
            "batch": p.workload.batch, "seq": p.workload.seq, "step_s": p.step_s, "tpot_s": p.tpot_s, "tps": p.tps,
            "tps_per_device": p.tps_per_device, "comm_s": p.comm_s, "exposed_comm_s": p.exposed_comm_s,
            "hidden_share": p.hidden_share, "memory_bytes": p.memory_bytes, "memory_ok": p.memory_ok,
            "layers": [asdict(r) for r in p.rows], "parts": {k: float(v) for k, v in p.parts.items()}}
