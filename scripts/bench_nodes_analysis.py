"""`make bench-nodes`' pure half (scripts/bench_nodes.py runs the clusters): the placements over
the mesh's ranks, the simulator's predictions, the padded-block pricing, and the report (table,
verdict, picture, the generated block of docs/topology.md)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from moemesh.mesh.placement import Placement

METHODS = (("round-robin", "round-robin", None), ("swap", "swap", None), ("ours", "ours", None),
           ("ours + replicas", "ours", 1))  # (row, planner method, spare slots per device)


# ---- placements and predictions ------------------------------------------------------------------
def gating_factors(seed: int, zipf: float, cfg) -> dict[int, tuple[float, ...]]:
    """Per MoE layer: factor 1 / rank^zipf over a random ranking of the experts (the routing's
    skew); none for zipf 0 (the model's own routing)."""
    rng = np.random.default_rng(seed)
    return {layer: tuple(float(f) for f in (1.0 / (1.0 + rng.permutation(cfg.num_experts)) ** zipf))
            for layer in cfg.moe_layer_ids} if zipf else {}


def device_order(members: list) -> list[int]:
    """Rank of planner device g: devices are numbered node by node (moemesh.planner.topology)."""
    return [m.rank for m in sorted(members, key=lambda m: (int(m.node.removeprefix("node")), m.rank))]


def on_ranks(p: Placement, rank_of: list[int], gating: dict[int, tuple[float, ...]]) -> Placement:
    """A planner placement over devices as one over the mesh's ranks, with the routing's gating."""
    table = {layer: tuple(tuple(tuple(rank_of[d] for d in g) for g in groups) for groups in experts)
             for layer, experts in p.replicas.items()}
    return Placement(epoch=0, world_size=p.world_size, replicas=table, origin="bench-nodes", gating=gating)


def traffic_per_step(routed: list, rank_of: list[int], requests: int, cfg):
    """Measured copies [S, L, E] (rank order) -> one decode step's Traffic over devices."""
    from moemesh.planner.traffic import from_counts

    counts = np.asarray(routed)[rank_of]  # (G, L, E) in device order
    traffic = from_counts(counts, cfg.top_k, layer_ids=cfg.moe_layer_ids, origin="measured")
    per_step = requests * cfg.top_k  # copies per layer in a decode step
    return traffic.scaled(per_step / float(counts.sum(axis=(0, 2)).mean()))


def padded_link_bytes(nodes: int, per_node: int, requests: int, max_local: int, cfg) -> float:
    """Bytes per step through a node's busiest port as the transport sends them: every (source,
    destination) block is C = T_max x min(K, experts a rank holds) rows of D + 1 fp32 values."""
    rows = -(-requests // (nodes * per_node)) * min(cfg.top_k, max_local)
    return 2 * len(cfg.moe_layer_ids) * per_node * (nodes - 1) * per_node * rows * (cfg.hidden_size + 1) * 4


def predictions(model: Path, topo, traffic, requests: int, context: int, profile) -> dict[str, dict]:
    """`moemesh simulate`'s step time and the planner's busiest inter-node port (bytes per step,
    dispatch + combine) for each placement, with moemesh's transport (no send-once-per-node)."""
    from moemesh.model.config import load_config
    from moemesh.planner.cost import CostOptions
    from moemesh.planner.search import Problem, plan
    from moemesh.simulate.shapes import ModelShape, Workload
    from moemesh.simulate.step_cost import Routing, parse_deployment, predict

    shape = replace(ModelShape.from_config(load_config(model), name=model.name), dtype_bytes=4)
    G = topo.devices
    dep = parse_deployment(f"ep{G}", shape.experts, G)
    work = Workload(batch=requests, seq=context, phase="decode", micro_batches=1)
    options = CostOptions(dedupe_per_node=False)
    least = -(-shape.experts // G)
    out = {}
    for row, method, spare in METHODS:
        slots = least + spare if spare else None
        pred = predict(shape, dep, work, topo, profile, method, routing=Routing(traffic, slots, options))
        problem = Problem(topo, traffic.with_sources(G), shape.expert, options, memory_fraction=float("inf"),
                          slots=slots)
        chosen = plan(problem, method)
        cost = problem.model.evaluate(chosen.placement, problem.traffic)
        ib = [k for k, name in enumerate(cost.links.names) if name.startswith("ib-")]
        out[row] = {"placement": chosen.placement, "step_ms": pred.step_s * 1e3, "tokens_per_s": pred.tps,
                    "exposed_comm_ms": pred.exposed_comm_s * 1e3, "header_ms": pred.parts["header_s"] * 1e3,
                    "max_link_bytes": 2 * float(cost.link_bytes[:, ib].sum(axis=0).max()),
                    "max_local": int(max(len(chosen.placement.experts_on(r, layer)) for layer in chosen.placement.layers
                                         for r in range(G)))}
    return out



LOCAL_NOTE = "link of the `local` topology (1.6 GB/s, 0.2 ms) inside a node and as latency between nodes"


def table(rows: list[dict]) -> str:
    head = (f"{'cluster':7} {'placement':16} {'link KB/step':>12} {'pred KB':>8} {'padded KB':>9} "
            f"{'step ms':>8} {'pred ms':>8} {'err':>6} {'padded ms':>9} {'err':>6} {'tok/s':>7} {'pred tok/s':>10} "
            f"{'kernel/wkr':>10}")
    lines = [head]
    for r in rows:
        err = r["pred_step_ms"] / r["step_ms"] - 1
        err_padded = r["pred_padded_step_ms"] / r["step_ms"] - 1
        lines.append(f"{r['cluster']:7} {r['placement']:16} {r['max_link_bytes'] / 1e3:12.1f} "
                     f"{r['pred_max_link_bytes'] / 1e3:8.1f} {r['padded_link_bytes'] / 1e3:9.1f} {r['step_ms']:8.1f} "
                     f"{r['pred_step_ms']:8.1f} {err:+6.0%} {r['pred_padded_step_ms']:9.1f} {err_padded:+6.0%} "
                     f"{r['tokens_per_s']:7.0f} {r['pred_tokens_per_s']:10.0f} {r['kernel_vs_workers']:10.3f}")
    return "\n".join(lines)


def verdict(rows: list[dict]) -> list[str]:
    """Whether the measured ordering of the placements matches the predicted one, per cluster, and
    the simulator's worst step-time error."""
    out = []
    for cluster in dict.fromkeys(r["cluster"] for r in rows):
        rs = [r for r in rows if r["cluster"] == cluster]
        measured = [r["placement"] for r in sorted(rs, key=lambda r: r["step_ms"])]
        predicted = [r["placement"] for r in sorted(rs, key=lambda r: r["pred_step_ms"])]
        worst = max(abs(r["pred_step_ms"] / r["step_ms"] - 1) for r in rs)
        spread = max(r["step_ms"] for r in rs) / min(r["step_ms"] for r in rs) - 1
        out.append(f"{cluster}: measured fastest-first {measured}; predicted {predicted}: "
                   f"{'same order' if measured == predicted else 'different order'}; slowest placement "
                   f"{spread:.0%} slower than the fastest; simulator step error at most {worst:.0%}")
    return out


def picture(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.6))
    x = np.arange(len(rows))
    ax.bar(x - 0.27, [r["step_ms"] for r in rows], 0.27, label="measured")
    ax.bar(x, [r["pred_step_ms"] for r in rows], 0.27, label="moemesh simulate")
    ax.bar(x + 0.27, [r["pred_padded_step_ms"] for r in rows], 0.27, label="simulate, exchanges as sent (padded)")
    ax.set_xticks(x, [f"{r['cluster']}\n{r['placement']}" for r in rows], fontsize=7)
    ax.set_ylabel("decode step, ms")
    ax.set_title("Placements on emulated nodes (tbf-shaped links): measured vs predicted step")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_doc(path: Path, picture_path: Path, tag: str, text: str) -> None:
    """Replace the generated part of `path` between the markers of `tag` (one block per kind of
    routing: "zipf", "trained"), keeping the prose around it; a missing block is appended."""
    begin, end = f"<!-- bench-nodes:{tag}:begin -->", f"<!-- bench-nodes:{tag}:end -->"
    body = f"{begin}\n```\n{text}\n```\n\n![placements on emulated nodes]({picture_path.name})\n{end}"
    old = path.read_text() if path.exists() else "# Topology-aware placement on emulated nodes\n"
    if begin not in old:
        old = f"{old.rstrip()}\n\n{begin}\n{end}\n"
    head, _, rest = old.partition(begin)
    _, _, tail = rest.partition(end)
    path.write_text(head + body + tail)
