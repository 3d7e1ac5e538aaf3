"""What `moemesh plan` shows: text tables and a PNG heat map of a Plan. matplotlib (Agg) only here."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moemesh.planner.cost import PlacementCost
from moemesh.planner.problem import Plan, Problem, round_robin_slots

MAX_TABLE_LAYERS = 16
MAX_TABLE_DEVICES = 64
MAX_LINK_ROWS = 12
ANNOTATE_CELLS = 1024


def placement_table(plan: Plan, problem: Problem) -> str:
    """Devices x layers: the experts each device holds (`*` = one of several replicas)."""
    slots, replicas = plan.slots, plan.report.replicas  # [L, G, P], [L, E]
    L, G, _ = slots.shape
    topo = problem.topology
    layers = range(min(L, MAX_TABLE_LAYERS))
    cells = [[_cell(slots[l, g], replicas[l]) for l in layers] for g in range(G)]
    width = max(4, *(len(c) for row in cells for c in row))
    head = "node dev  " + " ".join(f"L{problem.layer_ids[l]}".rjust(width) for l in layers)
    lines = [head]
    for g in range(min(G, MAX_TABLE_DEVICES)):
        lines.append(f"{topo.node_of[g]:>4} {g:>3}  " + " ".join(c.rjust(width) for c in cells[g]))
    if G > MAX_TABLE_DEVICES:
        lines.append(f"... {G - MAX_TABLE_DEVICES} more devices")
    if L > MAX_TABLE_LAYERS:
        lines.append(f"... {L - MAX_TABLE_LAYERS} more layers")
    return "\n".join(lines)


def _cell(experts: np.ndarray, replicas: np.ndarray) -> str:
    held = [int(e) for e in experts if e >= 0]
    return ",".join(f"{e}*" if replicas[e] > 1 else str(e) for e in held) or "-"


def link_table(plan: Plan) -> str:
    """The busiest ports (by their worst layer), this plan against round-robin."""
    cost, rr = plan.report.cost, plan.report.round_robin
    names = cost.links.names
    worst = cost.link_s.max(axis=0)  # [K]
    order = np.argsort(-worst, kind="stable")[:MAX_LINK_ROWS]
    lines = [f"{'link':<12} {'MB/layer':>10} {'max us':>9} {'rr MB/layer':>12} {'rr max us':>10}"]
    for k in order:
        if worst[k] <= 0:
            break
        lines.append(f"{names[k]:<12} {cost.link_bytes[:, k].mean() / 1e6:>10.2f} {worst[k] * 1e6:>9.1f} "
                     f"{rr.link_bytes[:, k].mean() / 1e6:>12.2f} {rr.link_s[:, k].max() * 1e6:>10.1f}")
    if len(lines) == 1:
        lines.append("(no traffic crosses a link)")
    shown = len(lines) - 1
    if len(names) > shown:
        lines.append(f"... {len(names) - shown} quieter links")
    return "\n".join(lines)


def device_table(plan: Plan) -> str:
    """Per-device tokens (mean over layers) for the busiest devices, and the balance summary."""
    cost, rr = plan.report.cost, plan.report.round_robin
    mean_tokens = cost.device_tokens.mean(axis=0)  # [G]
    order = np.argsort(-mean_tokens, kind="stable")[:MAX_LINK_ROWS]
    lines = [f"{'device':<8} {'tokens/layer':>13} {'compute us':>11} {'rr tokens/layer':>16}"]
    for g in order:
        lines.append(f"{g:<8} {mean_tokens[g]:>13.1f} {cost.compute_s[:, g].mean() * 1e6:>11.1f} "
                     f"{rr.device_tokens[:, g].mean():>16.1f}")
    if cost.device_tokens.shape[1] > len(order):
        lines.append(f"... {cost.device_tokens.shape[1] - len(order)} lighter devices")
    lines.append(f"max/mean device load: worst layer {cost.balance.max():.3f} (round-robin {rr.balance.max():.3f}), "
                 f"mean over layers {cost.balance.mean():.3f} (round-robin {rr.balance.mean():.3f})")
    return "\n".join(lines)


def summary_table(plan: Plan) -> str:
    """Round-robin against this plan: max link load, balance, predicted time, InfiniBand bytes."""
    report = plan.report
    rows = [("round-robin", report.round_robin)]
    if report.method != "round-robin":
        rows.append((report.method, report.cost))
    lines = [f"{'method':<12} {'max link ms':>12} {'max/mean dev':>13} {'MoE time ms':>12} {'IB GB':>8}"]
    for name, cost in rows:
        lines.append(_summary_row(name, cost))
    lines.append(f"predicted gain over round-robin: max link load x{report.link_gain:.2f}, "
                 f"MoE layer time x{report.time_gain:.2f} (planned in {report.runtime_s * 1e3:.0f} ms"
                 + (f", {len(report.swaps)} swaps" if report.swaps else "")
                 + (f", layers left round-robin: {list(report.fallback_layers)}" if report.fallback_layers else "")
                 + ")")
    return "\n".join(lines)


def _summary_row(name: str, cost: PlacementCost) -> str:
    return (f"{name:<12} {cost.total_max_link_s * 1e3:>12.3f} {cost.balance.max():>13.3f} "
            f"{cost.total_layer_s * 1e3:>12.3f} {cost.ib_bytes / 1e9:>8.3f}")


def write_png(plan: Plan, problem: Problem, path: str | Path) -> Path:
    """Two heat maps, devices x layers, round-robin and this plan: colour = device load / mean of
    the layer, text = expert ids (when the grid is small enough to read)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    report = plan.report
    panels = [("round-robin", report.round_robin, None), (report.method, report.cost, plan)]
    if report.method == "round-robin":
        panels = panels[1:]
    L, G = report.cost.device_tokens.shape
    vmax = max(float((c.device_tokens / np.maximum(c.device_tokens.mean(axis=1, keepdims=True), 1e-30)).max())
               for _, c, _ in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(min(3 + 0.6 * L, 16) * len(panels), min(3 + 0.3 * G, 30)),
                             squeeze=False)
    image = None
    for ax, (name, cost, shown) in zip(axes[0], panels):
        relative = (cost.device_tokens / np.maximum(cost.device_tokens.mean(axis=1, keepdims=True), 1e-30)).T  # [G, L]
        image = ax.imshow(relative, aspect="auto", cmap="viridis", vmin=0, vmax=max(vmax, 1.0), interpolation="nearest")
        ax.set_title(f"{name}\nmax link {cost.total_max_link_s * 1e3:.3g} ms, max/mean {cost.balance.max():.2f}",
                     fontsize=9)
        ax.set_xlabel("MoE layer")
        ax.set_ylabel("device")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xticks(range(L), [str(i) for i in problem.layer_ids], fontsize=7)
        if G * L <= ANNOTATE_CELLS:
            slots = shown.slots if shown is not None else round_robin_slots(problem)
            replicas = np.stack([np.bincount(s[s >= 0], minlength=problem.num_experts) for s in slots])
            for g in range(G):
                for l in range(L):
                    ax.text(l, g, _cell(slots[l, g], replicas[l]), ha="center", va="center", fontsize=6,
                            color="white" if relative[g, l] < 0.6 * max(vmax, 1.0) else "black")
    assert image is not None, "at least one panel"
    fig.colorbar(image, ax=list(axes[0]), label="device load / layer mean")
    fig.suptitle(f"{problem.topology.name}: {problem.num_experts} experts x {L} layers, {problem.traffic.origin}",
                 fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
