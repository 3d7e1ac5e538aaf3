"""Group-limited routing's effect on cross-node traffic, per EP degree. Pure (numpy).

For a model whose router keeps a token inside topk_group of n_group expert groups (DeepSeek-V3:
4 of 8), each EP degree G of the sweep (N = G / devices per node nodes) gets:

- the mean number of nodes other than its own a token reaches (moemesh.planner.groups), for
  routing that favours no expert: without the limit (exact: top-K of all E), and from the router
  itself on the same seeded scores: with the limit and groups spread over the nodes (expert e on
  node e mod N), with the limit and groups aligned with nodes (contiguous blocks: the planner's
  `aligned` method); the uniform model's value for the aligned layout beside it; and the bound
  k x max(1, N / n);
- the InfiniBand bytes a device sends per decode step, with one crossing per (token, node) as
  DeepEP dispatches (dispatch + combine: 2 x remote nodes x D x dtype bytes per token and MoE
  layer), without the limit and aligned, and the share aligning saves;
- the cost model's exchange time per step for the planner's `ours` and `aligned` placements on
  the same group-limited synthetic traffic (moemesh.simulate.step_cost), one micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from moemesh.planner.groups import (
    aligned_nodes,
    expected_remote_nodes,
    nodes_bound,
    sampled_remote_nodes,
    spread_nodes,
)
from moemesh.planner.topology import Topology
from moemesh.simulate.hardware import DeviceProfile
from moemesh.simulate.shapes import ModelShape, Workload
from moemesh.simulate.step_cost import parse_deployment, predict
from moemesh.simulate.sweep import scaled_topology

PRICED_CONTEXT = 128  # the cost model's columns: decode at a short context, where links matter most


@dataclass(frozen=True)
class GroupRow:
    devices: int
    nodes: int
    remote_no_limit: float  # mean remote nodes per token, top-K over all experts (exact)
    remote_spread: float  # with the group limit, groups spread over nodes (the router, sampled)
    remote_aligned: float  # with the group limit, groups aligned with nodes (the router, sampled)
    remote_aligned_uniform: float  # the same by the uniform model (exact combinatorics)
    bound: int  # the most nodes a token reaches with groups aligned
    ib_bytes_no_limit: float  # InfiniBand bytes one device sends per decode step (dispatch + combine)
    ib_bytes_aligned: float
    comm_ours_s: float | None  # the cost model's exchange time per step, placement `ours`
    comm_aligned_s: float | None  # ... placement `aligned`

    @property
    def saved(self) -> float:
        """Share of the InfiniBand bytes that the limit with aligned groups saves."""
        return 1.0 - self.remote_aligned / self.remote_no_limit if self.remote_no_limit else 0.0


def group_effect(shape: ModelShape, topo: Topology, devices: tuple[int, ...], per_device_batch: int,
                 profile: DeviceProfile | None = None) -> list[GroupRow]:
    """One GroupRow per EP degree in `devices` (module docstring); `profile` None: no cost-model columns."""
    assert shape.grouped is not None, "a model with group-limited routing"
    n, k, E, K = shape.grouped.n_group, shape.grouped.topk_group, shape.experts, shape.top_k
    per_token = 2 * len(shape.moe_layer_ids) * shape.expert.token_bytes * per_device_batch
    out = []
    for g in devices:
        t = scaled_topology(topo, g)
        N, share = t.nodes, t.node_sizes / g
        free = expected_remote_nodes(aligned_nodes(E, N), K, n, n, share)
        spread = sampled_remote_nodes(spread_nodes(E, N), K, (n, k), share)
        aligned = sampled_remote_nodes(aligned_nodes(E, N), K, (n, k), share)
        uniform = expected_remote_nodes(aligned_nodes(E, N), K, n, k, share)
        ours = lined = None
        if profile is not None:
            work = Workload(per_device_batch * g, PRICED_CONTEXT, "decode", 1)
            dep = parse_deployment(f"ep{g}", E, g)
            ours = predict(shape, dep, work, t, profile, "ours").comm_s
            lined = predict(shape, dep, work, t, profile, "aligned").comm_s
        out.append(GroupRow(g, N, free, spread, aligned, uniform, nodes_bound(n, k, N, K), free * per_token,
                            aligned * per_token, ours, lined))
    return out


def group_table(rows: list[GroupRow]) -> str:
    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x * 1e3:.2f}"

    lines = [f"{'devices':>7} {'nodes':>5} {'remote nodes/token: no limit':>28} {'spread':>6} {'aligned':>7} "
             f"{'(uniform)':>9} {'bound':>5} {'IB MB/dev/step: no limit':>24} {'aligned':>7} {'saved':>5} "
             f"{'comm ms: ours':>13} {'aligned':>7}"]
    for r in rows:
        lines.append(f"{r.devices:>7} {r.nodes:>5} {r.remote_no_limit:>28.2f} {r.remote_spread:>6.2f} "
                     f"{r.remote_aligned:>7.2f} {r.remote_aligned_uniform:>9.2f} {r.bound:>5} "
                     f"{r.ib_bytes_no_limit / 1e6:>24.1f} "
                     f"{r.ib_bytes_aligned / 1e6:>7.1f} {r.saved:>5.0%} {ms(r.comm_ours_s):>13} "
                     f"{ms(r.comm_aligned_s):>7}")
    return "\n".join(lines)
