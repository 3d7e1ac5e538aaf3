"""EP scaling: the same model and per-device load on 16 .. 1024 devices, and its chart.

Weak scaling: every device keeps `per_device_batch` decoding sequences, so the batch grows with
the devices. Two readings of "EP = G": the model's own experts replicated over the devices
(G / E replicas each, one expert per device), and a model with G experts (one distinct expert
per device, the paper's rule taken literally). Topologies grow node by node (`scaled_topology`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from moemesh.planner.topology import Topology
from moemesh.simulate.hardware import DeviceProfile
from moemesh.simulate.shapes import ModelShape, Workload
from moemesh.simulate.step_cost import Prediction, parse_deployment, predict

DEFAULT_DEVICES = (16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class ScalePoint:
    devices: int
    seq: int  # decode context
    replicated: Prediction  # the model's experts, replicated over the devices
    distinct: Prediction  # one distinct expert per device (E = devices)


def scaled_topology(topo: Topology, devices: int) -> Topology:
    """`topo` with `devices` devices: same devices per node, links and rates; more or fewer nodes."""
    per_node = min(topo.devices_per_node, devices)
    return replace(topo, name=f"{topo.name.split('[')[0]}@{devices}", devices=devices, devices_per_node=per_node,
                   nodes=math.ceil(devices / per_node))


def ep_scaling(shape: ModelShape, topo: Topology, profile: DeviceProfile, per_device_batch: int, seq: int,
               devices: tuple[int, ...] = DEFAULT_DEVICES, method: str = "ours") -> list[ScalePoint]:
    """Decode predictions for ep<G> at every G in `devices` (module docstring)."""
    out = []
    for g in devices:
        t = scaled_topology(topo, g)
        work = Workload(batch=per_device_batch * g, seq=seq, phase="decode", micro_batches=0)
        rep = predict(shape, parse_deployment(f"ep{g}", shape.experts, g), work, t, profile, method)
        wide = replace(shape, experts=g, name=f"{shape.name}, E={g}")
        dis = predict(wide, parse_deployment(f"ep{g}", g, g), work, t, profile, method)
        out.append(ScalePoint(g, seq, rep, dis))
    return out


def scaling_table(points: list[ScalePoint]) -> str:
    lines = [f"{'context':>7} {'devices':>7} {'TPS/dev (E fixed)':>18} {'TPOT ms':>8} {'TPS/dev (E=G)':>14} "
             f"{'TPOT ms':>8} {'comm ms':>8} {'hidden':>7}"]
    for p in points:
        h = p.distinct.hidden_share
        lines.append(f"{p.seq:>7} {p.devices:>7} {p.replicated.tps_per_device:>18,.0f} "
                     f"{p.replicated.step_s * 1e3:>8.2f} "
                     f"{p.distinct.tps_per_device:>14,.0f} {p.distinct.step_s * 1e3:>8.2f} "
                     f"{p.distinct.comm_s * 1e3:>8.3f} {'-' if h is None else f'{h:.0%}':>7}")
    return "\n".join(lines)


def plot_scaling(points: list[ScalePoint], out: Path, title: str) -> Path:
    """Two panels over devices (log2): TPS per device and TPOT, both readings of EP, one colour
    per decode context in `points`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, seq in enumerate(sorted({p.seq for p in points}, reverse=True)):
        pts = [p for p in points if p.seq == seq]
        g = [p.devices for p in pts]
        for key, label, style in (("replicated", "model's experts, replicated", "o-"),
                                  ("distinct", "E = devices", "s--")):
            kw = dict(color=f"C{i}", label=f"context {seq}: {label}")
            a.plot(g, [getattr(p, key).tps_per_device for p in pts], style, **kw)
            b.plot(g, [getattr(p, key).step_s * 1e3 for p in pts], style, **kw)
    g = sorted({p.devices for p in points})
    for ax, ylabel in ((a, "decode tokens/s per device"), (b, "TPOT (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(g, [str(x) for x in g])
        ax.set_xlabel("devices (EP degree)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    a.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
