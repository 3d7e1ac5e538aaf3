"""The cost model: what a placement costs on a topology for a given routing. Pure: numpy only.

One model, shared by the planner and the simulator. Units are in the names (_bytes, _s, _tokens).
Shape legend: L MoE layers, S source ranks (= G: every device runs attention and sends tokens),
E experts, G devices, N nodes, P slots per device per layer, K links = 2G + 2N.

Routing (what moemesh.mesh.transport does): a token copy for expert e from source s stays on s
when s holds a replica of e, else goes to one of e's P_e replicas, each taking an equal share.

Links (ports, one per direction): `nvl-out:g` / `nvl-in:g` for device g's NVLink port,
`ib-out:n` / `ib-in:n` for node n's InfiniBand port. A copy s -> d on one node uses nvl-out:s
and nvl-in:d. A copy across nodes uses ib-out:node(s) and ib-in:node(d), and then
- direct (dedupe_per_node=False): nothing else (RDMA straight into d);
- send once per node (dedupe_per_node=True, DeepEP-style): the token crosses InfiniBand once
  per (token, destination node), lands on the device of node(d) with s's local index, which
  fans it out over NVLink (nvl-out:landing, nvl-in:d) to each of its experts there.
  Tokens crossing = copies - pairs of one token's copies landing on the same node, bounded
  below by copies / K (second-order inclusion-exclusion from the co-activation matrix: exact
  for top-2, a lower bound above).

Formulas, per layer (dispatch; combine sends the same bytes back over the mirrored ports):

    link_bytes[k]   = token copies (tokens, for ib-*) through port k x token_bytes
    link_s[k]       = latency_k + link_bytes[k] / bandwidth_k   (0 when no bytes)
    dispatch_s[g]   = max(link_s of nvl-out:g, nvl-in:g, ib-out:node(g), ib-in:node(g))
    comm_s[g]       = dispatch_s[g] + combine_s[g] = 2 dispatch_s[g]   (mirror)
    compute_s[g]    = device_tokens[g] x flops_per_token / device_flops_per_s
    device_s[g]     = compute_s[g] + comm_s[g] - min(overlap x comm_s[g], compute_s[g])
    layer_s         = max_g device_s[g]

"Max link load" everywhere means max_k link_s[k] of a layer (seconds, so NVLink and InfiniBand
compare); device load means device_tokens (copies an expert computes on that device).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any

import numpy as np

from moemesh.mesh.placement import Placement
from moemesh.planner.slots import from_placement
from moemesh.planner.topology import Topology
from moemesh.planner.traffic import Traffic

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1}


@dataclass(frozen=True)
class ExpertShape:
    """One expert's size: D, F, bytes per element, weight matrices (SwiGLU: gate, up, down = 3)."""

    hidden_size: int
    intermediate_size: int
    dtype_bytes: int = 2
    matrices: int = 3

    @property
    def token_bytes(self) -> int:
        """Bytes of one token's hidden state on the wire: D x dtype bytes."""
        return self.hidden_size * self.dtype_bytes

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert's weights: matrices x D x F x dtype bytes."""
        return self.matrices * self.hidden_size * self.intermediate_size * self.dtype_bytes

    @property
    def flops_per_token(self) -> float:
        """FLOPs one token costs one expert: 2 x matrices x D x F."""
        return 2.0 * self.matrices * self.hidden_size * self.intermediate_size

    @staticmethod
    def paper() -> ExpertShape:
        """The paper's expert: d_model 8192, MLP hidden 32768, FP16, two linears (1.07 GB)."""
        return ExpertShape(hidden_size=8192, intermediate_size=32768, dtype_bytes=2, matrices=2)

    @staticmethod
    def from_config(cfg: Any) -> ExpertShape:
        """From a moemesh.model.config.ModelConfig (Mixtral / Qwen3-MoE experts are SwiGLU)."""
        return ExpertShape(hidden_size=cfg.hidden_size, intermediate_size=cfg.expert_intermediate_size,
                           dtype_bytes=DTYPE_BYTES.get(cfg.torch_dtype, 2), matrices=3)


@dataclass(frozen=True)
class CostOptions:
    dedupe_per_node: bool = True  # cross-node: one InfiniBand crossing per (token, node), NVLink fan-out
    overlap: float = 0.0  # share of communication hidden behind compute (the paper claims 0.8)


@dataclass(frozen=True)
class LinkLayout:
    """The K = 2G + 2N ports of a topology, in order: nvl-out, nvl-in (per device), ib-out, ib-in (per node)."""

    names: tuple[str, ...]  # (K,)
    bandwidth_bytes_per_s: np.ndarray  # [K]
    latency_s: np.ndarray  # [K]
    device_links: np.ndarray  # [G, 4] the ports device g's traffic uses

    def time_s(self, link_bytes: np.ndarray) -> np.ndarray:
        """[..., K] bytes -> [..., K] seconds: latency + bytes / bandwidth, 0 where no bytes."""
        return np.where(link_bytes > 0, self.latency_s + link_bytes / self.bandwidth_bytes_per_s, 0.0)


@dataclass(frozen=True)
class PlacementCost:
    """What one placement costs for one batch of traffic (dispatch direction; combine mirrors)."""

    layer_ids: tuple[int, ...]  # (L,)
    links: LinkLayout
    link_bytes: np.ndarray  # [L, K]
    link_s: np.ndarray  # [L, K]
    device_tokens: np.ndarray  # [L, G] copies each device's experts compute
    compute_s: np.ndarray  # [L, G]
    comm_s: np.ndarray  # [L, G] dispatch + combine
    device_s: np.ndarray  # [L, G]
    layer_s: np.ndarray  # [L]
    tokens_per_layer: np.ndarray  # [L] tokens (not copies) in the batch

    @property
    def max_link_s(self) -> np.ndarray:
        """[L] the busiest port's time per layer: the paper's objective."""
        return self.link_s.max(axis=1)

    @property
    def max_link_bytes(self) -> np.ndarray:
        """[L] bytes through the busiest port (by time) per layer."""
        return np.take_along_axis(self.link_bytes, self.link_s.argmax(axis=1)[:, None], axis=1)[:, 0]

    @property
    def balance(self) -> np.ndarray:
        """[L] max / mean device tokens per layer (1.0 = perfectly even)."""
        mean = self.device_tokens.mean(axis=1)
        return np.where(mean > 0, self.device_tokens.max(axis=1) / np.maximum(mean, 1e-30), 1.0)

    @property
    def total_max_link_s(self) -> float:
        """Sum over layers of the busiest port's time: a batch's link-bound time through the model."""
        return float(self.max_link_s.sum())

    @property
    def total_layer_s(self) -> float:
        """Predicted time of one batch through every MoE layer (sum of layer_s)."""
        return float(self.layer_s.sum())

    @property
    def ib_bytes(self) -> float:
        """Bytes over InfiniBand (leaving nodes), all layers."""
        out = [i for i, n in enumerate(self.links.names) if n.startswith("ib-out")]
        return float(self.link_bytes[:, out].sum())


@dataclass(frozen=True)
class _TopoArrays:
    """Per-topology index arrays the model reuses for every evaluation."""

    node_starts: np.ndarray  # [N] first device of each node
    remote: np.ndarray  # [G, N] 1.0 where node n is not device g's node
    local_onehot: np.ndarray  # [R, G] source s lands on landing row r (see `_topo_arrays`)
    land_row: np.ndarray  # [G] landing row of device g: tokens landing on g are those of row land_row[g]


@lru_cache(maxsize=16)
def _topo_arrays(topology: Topology) -> _TopoArrays:
    """A token from source s crossing to node n lands on the device of n with local index
    local(s) mod size(n). Rows 0..D-1 collect sources by local index (full nodes); a partial last
    node of size z adds rows D..D+z-1 collecting sources by local(s) mod z."""
    G, N, D = topology.devices, topology.nodes, topology.devices_per_node
    node, local, sizes = topology.node_of, topology.local_of, topology.node_sizes
    last = int(sizes[-1])
    rows = D + (last if last < D else 0)
    onehot = np.zeros((rows, G))
    onehot[local, np.arange(G)] = 1.0
    land_row = local.copy()
    if last < D:
        onehot[D + local % last, np.arange(G)] = 1.0
        land_row[node == N - 1] += D
    remote = (node[:, None] != np.arange(N)[None, :]).astype(np.float64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return _TopoArrays(node_starts=starts, remote=remote, local_onehot=onehot, land_row=land_row)


@lru_cache(maxsize=16)
def link_layout(topology: Topology) -> LinkLayout:
    G, N = topology.devices, topology.nodes
    names = tuple([f"nvl-out:{g}" for g in range(G)] + [f"nvl-in:{g}" for g in range(G)]
                  + [f"ib-out:{n}" for n in range(N)] + [f"ib-in:{n}" for n in range(N)])
    bw = np.array([topology.intra.bandwidth_bytes_per_s] * 2 * G + [topology.inter.bandwidth_bytes_per_s] * 2 * N)
    lat = np.array([topology.intra.latency_s] * 2 * G + [topology.inter.latency_s] * 2 * N)
    g = np.arange(G)
    node = topology.node_of
    device_links = np.stack([g, G + g, 2 * G + node, 2 * G + N + node], axis=1)
    return LinkLayout(names=names, bandwidth_bytes_per_s=bw, latency_s=lat, device_links=device_links)


@dataclass(frozen=True)
class Loads:
    """Loads of L layers in token units (bytes = x token_bytes)."""

    link_tokens: np.ndarray  # [L, K] copies through nvl-* ports, tokens through ib-* ports
    device_tokens: np.ndarray  # [L, G] copies computed on each device


class CostModel:
    """The cost model for one topology, expert shape and options; see the module docstring."""

    def __init__(self, topology: Topology, shape: ExpertShape, options: CostOptions = CostOptions()):
        self.topology = topology
        self.shape = shape
        self.options = options
        self.links = link_layout(topology)
        self._arrays = _topo_arrays(topology)

    @cached_property
    def compute_s_per_token(self) -> float:
        """Compute seconds one token copy costs the device holding its expert."""
        return self.shape.flops_per_token / self.topology.device_flops_per_s

    def loads(self, tokens: np.ndarray, slots: np.ndarray, coactivation: np.ndarray, top_k: int) -> Loads:
        """Port and device loads of L layers, without forming the [S, G] copy matrix.

        Parameters:
            tokens: [L, G, E] token copies source device s -> expert e
            slots: [L, G, P] experts on each device (-1 = empty)
            coactivation: [L, E, E] tokens routed to both e and f
        """
        ta, topo = self._arrays, self.topology
        L, G, E = tokens.shape
        N, node = topo.nodes, topo.node_of
        # Step 1: the units (layer, device, expert) and each expert's replicas per node
        l_, g_, k_ = np.nonzero(slots >= 0)
        e_ = slots[l_, g_, k_]
        on_node = np.zeros((L, E, N))
        np.add.at(on_node, (l_, e_, node[g_]), 1.0)
        replicas = on_node.sum(axis=2)  # [L, E]
        inv = 1.0 / np.maximum(replicas, 1.0)  # [L, E] share of each replica
        node_share = on_node * inv[:, :, None]  # [L, E, N]
        w = inv[l_, e_]  # [U]

        def per_device(values: np.ndarray) -> np.ndarray:  # [U] -> [L, G]
            return np.bincount(l_ * G + g_, weights=values, minlength=L * G).reshape(L, G)

        # Step 2: a source holding e keeps its copies of e; the rest split evenly over replicas
        local = per_device(tokens[l_, g_, e_])  # [L, G]
        xr = tokens.copy()
        xr[l_, g_, e_] = 0.0  # [L, S, E] copies that leave their source
        by_node = np.add.reduceat(xr, ta.node_starts, axis=1)  # [L, N, E] sent from each node
        total = by_node.sum(axis=1)  # [L, E]
        to_node = xr @ node_share  # [L, S, N] copies source s sends to node n
        device_tokens = per_device(total[l_, e_] * w) + local
        # Step 3: intra-node copies: the source's and the destination's NVLink ports
        nvl_out = to_node[:, np.arange(G), node]  # [L, G]
        nvl_in = per_device(by_node[l_, node[g_], e_] * w)
        # Step 4: cross-node copies: both nodes' InfiniBand ports
        remote = to_node * ta.remote[None]  # [L, S, N]
        if self.options.dedupe_per_node and N > 1:
            # Step 5: one crossing per (token, node): subtract pairs of a token's copies on one node
            pairs = 0.5 * ((coactivation @ node_share) * node_share).sum(axis=1)  # [L, N]
            source_share = tokens.sum(axis=2) / np.maximum(tokens.sum(axis=(1, 2)), 1e-30)[:, None]  # [L, S]
            crossing = np.maximum(remote - source_share[:, :, None] * pairs[:, None, :], remote / top_k)
            # Step 6: landed tokens fan out over NVLink from the device with the source's local index
            landing = ta.local_onehot @ xr  # [L, R, E] copies by landing row (own node included)
            remote_in = per_device((total[l_, e_] - by_node[l_, node[g_], e_]) * w)
            direct = per_device(landing[l_, ta.land_row[g_], e_] * w)  # landed on their own expert
            nvl_in = nvl_in + remote_in - direct
            # copies landing on device g bound for its node: by landing row, less g's own (not remote)
            landed_for_node = (landing @ node_share)[:, ta.land_row, node] - nvl_out  # [L, G]
            nvl_out = nvl_out + landed_for_node - direct
        else:
            crossing = remote
        ib_out = np.add.reduceat(crossing.sum(axis=2), ta.node_starts, axis=1)  # [L, N]
        ib_in = crossing.sum(axis=1)  # [L, N]
        return Loads(link_tokens=np.concatenate([nvl_out, nvl_in, ib_out, ib_in], axis=1), device_tokens=device_tokens)

    def layer_max_link_s(self, tokens: np.ndarray, slots: np.ndarray, coactivation: np.ndarray, top_k: int) -> float:
        """The busiest port's seconds for one layer (tokens [G, E], slots [G, P], coactivation [E, E])."""
        return float(self.max_link_s(tokens[None], slots[None], coactivation[None], top_k)[0])

    def max_link_s(self, tokens: np.ndarray, slots: np.ndarray, coactivation: np.ndarray, top_k: int) -> np.ndarray:
        """[L] the busiest port's seconds per layer (the paper's objective)."""
        loads = self.loads(tokens, slots, coactivation, top_k)
        return self.links.time_s(loads.link_tokens * self.shape.token_bytes).max(axis=1)

    def evaluate_slots(self, slots: np.ndarray, traffic: Traffic) -> PlacementCost:
        """slots [L, G, P] -> PlacementCost (the formulas in the module docstring)."""
        G = self.topology.devices
        if slots.shape[1] != G:
            raise ValueError(f"placement has {slots.shape[1]} devices, topology {G}")
        t = traffic.with_sources(G)
        loads = self.loads(t.tokens, slots, t.coactivation, t.top_k)
        return self._times(t, loads.link_tokens * self.shape.token_bytes, loads.device_tokens)

    def evaluate(self, placement: Placement, traffic: Traffic) -> PlacementCost:
        """Cost of a Placement (its layers must be traffic.layer_ids)."""
        return self.evaluate_slots(from_placement(placement, traffic.layer_ids), traffic)

    def _times(self, t: Traffic, link_bytes: np.ndarray, device_tokens: np.ndarray) -> PlacementCost:
        link_s = self.links.time_s(link_bytes)  # [L, K]
        dispatch_s = link_s[:, self.links.device_links].max(axis=2)  # [L, G]
        comm_s = 2.0 * dispatch_s  # combine mirrors dispatch
        compute_s = device_tokens * self.compute_s_per_token  # [L, G]
        device_s = compute_s + comm_s - np.minimum(self.options.overlap * comm_s, compute_s)
        return PlacementCost(
            layer_ids=t.layer_ids, links=self.links, link_bytes=link_bytes, link_s=link_s,
            device_tokens=device_tokens, compute_s=compute_s, comm_s=comm_s, device_s=device_s,
            layer_s=device_s.max(axis=1), tokens_per_layer=t.tokens_per_layer,
        )


def evaluate(placement: Placement, topology: Topology, traffic: Traffic, shape: ExpertShape,
             options: CostOptions = CostOptions()) -> PlacementCost:
    """Cost of `placement` on `topology` for `traffic` (CostModel(...).evaluate in one call)."""
    return CostModel(topology, shape, options).evaluate(placement, traffic)
