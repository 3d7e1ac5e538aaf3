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
from moemesh.planner.slots import from_placement, holds
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
    """Per-topology index arrays the model reuses for every layer (all [G, G] over (source, device))."""

    same_other: np.ndarray  # same node, s != d (float mask)
    remote: np.ndarray  # different nodes (float mask)
    landing: np.ndarray  # int: device of node(d) a token from s lands on (s's local index)
    forward: np.ndarray  # remote and landing != d (float mask): the copy takes an NVLink hop
    node_onehot: np.ndarray  # [G, N]


@lru_cache(maxsize=16)
def _topo_arrays(topology: Topology) -> _TopoArrays:
    node, local, sizes = topology.node_of, topology.local_of, topology.node_sizes
    same = node[:, None] == node[None, :]
    G = topology.devices
    landing = node[None, :] * topology.devices_per_node + local[:, None] % sizes[node][None, :]  # [S, G]
    forward = ~same & (landing != np.arange(G)[None, :])
    onehot = np.zeros((G, topology.nodes))
    onehot[np.arange(G), node] = 1.0
    return _TopoArrays(
        same_other=(same & ~np.eye(G, dtype=bool)).astype(np.float64), remote=(~same).astype(np.float64),
        landing=landing, forward=forward.astype(np.float64), node_onehot=onehot,
    )


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
class LayerLoads:
    """One layer's loads in token units (bytes = x token_bytes)."""

    link_tokens: np.ndarray  # [K] copies through nvl-* ports, tokens through ib-* ports
    device_tokens: np.ndarray  # [G] copies computed on each device


class CostModel:
    """The cost model for one topology, expert shape and options; see the module docstring."""

    def __init__(self, topology: Topology, shape: ExpertShape, options: CostOptions = CostOptions()):
        self.topology = topology
        self.shape = shape
        self.options = options
        self.links = link_layout(topology)
        self._arrays = _topo_arrays(topology)

    @cached_property
    def device_layer_s_per_token(self) -> float:
        """Compute seconds one token copy costs a device."""
        return self.shape.flops_per_token / self.topology.device_flops_per_s

    def layer_loads(self, tokens: np.ndarray, slots: np.ndarray, coactivation: np.ndarray, top_k: int) -> LayerLoads:
        """Loads of one layer.

        Parameters:
            tokens: [G, E] token copies source device s -> expert e
            slots: [G, P] experts on each device (-1 = empty)
            coactivation: [E, E] tokens routed to both e and f
        """
        ta = self._arrays
        G, E = tokens.shape
        # Step 1: who holds what; a source holding e keeps its copies of e
        held = holds(slots, E)  # [G, E]
        replicas = held.sum(axis=0)  # [E]
        local = (tokens * held).sum(axis=1)  # [G]
        share = np.zeros((G, E + 1))
        share[:, :E] = np.where(held, 0.0, tokens) / np.maximum(replicas, 1)  # [S, E] per replica
        # Step 2: copies from each source to each device (each replica takes an equal share)
        pair = share[:, np.where(slots >= 0, slots, E)].sum(axis=2)  # [S, G]
        device_tokens = pair.sum(axis=0) + local  # [G]
        # Step 3: intra-node copies use the source's and the destination's NVLink ports
        intra = pair * ta.same_other  # [S, G]
        nvl_out, nvl_in = intra.sum(axis=1), intra.sum(axis=0)
        # Step 4: cross-node copies use both nodes' InfiniBand ports
        remote = pair * ta.remote  # [S, G]
        node_copies = remote @ ta.node_onehot  # [S, N]
        if self.options.dedupe_per_node and self.topology.nodes > 1:
            # Step 5: send once per (token, node): subtract pairs of a token's copies on one node
            node_share = (held.T @ ta.node_onehot) / np.maximum(replicas, 1)[:, None]  # [E, N]
            pairs_on_node = 0.5 * ((coactivation @ node_share) * node_share).sum(axis=0)  # [N]
            source_share = tokens.sum(axis=1) / max(tokens.sum(), 1e-30)  # [S]
            crossing = np.maximum(node_copies - source_share[:, None] * pairs_on_node[None, :], node_copies / top_k)
            # Step 6: landed tokens fan out over NVLink from the landing device
            fwd = remote * ta.forward  # [S, G]
            nvl_in = nvl_in + fwd.sum(axis=0)
            nvl_out = nvl_out + np.bincount(ta.landing.ravel(), weights=fwd.ravel(), minlength=G)
        else:
            crossing = node_copies
        ib_out = ta.node_onehot.T @ crossing.sum(axis=1)  # [N] by source node
        ib_in = crossing.sum(axis=0)  # [N]
        return LayerLoads(link_tokens=np.concatenate([nvl_out, nvl_in, ib_out, ib_in]), device_tokens=device_tokens)

    def layer_max_link_s(self, tokens: np.ndarray, slots: np.ndarray, coactivation: np.ndarray, top_k: int) -> float:
        """The busiest port's seconds for one layer (what the swap search compares)."""
        loads = self.layer_loads(tokens, slots, coactivation, top_k)
        return float(self.links.time_s(loads.link_tokens * self.shape.token_bytes).max())

    def evaluate_slots(self, slots: np.ndarray, traffic: Traffic) -> PlacementCost:
        """slots [L, G, P] -> PlacementCost (the formulas in the module docstring)."""
        G = self.topology.devices
        if slots.shape[1] != G:
            raise ValueError(f"placement has {slots.shape[1]} devices, topology {G}")
        t = traffic.with_sources(G)
        loads = [self.layer_loads(t.tokens[l], slots[l], t.coactivation[l], t.top_k) for l in range(t.num_layers)]
        link_bytes = np.stack([x.link_tokens for x in loads]) * self.shape.token_bytes  # [L, K]
        device_tokens = np.stack([x.device_tokens for x in loads])  # [L, G]
        return self._times(t, link_bytes, device_tokens)

    def evaluate(self, placement: Placement, traffic: Traffic) -> PlacementCost:
        """Cost of a Placement (its layers must be traffic.layer_ids)."""
        return self.evaluate_slots(from_placement(placement, traffic.layer_ids), traffic)

    def _times(self, t: Traffic, link_bytes: np.ndarray, device_tokens: np.ndarray) -> PlacementCost:
        link_s = self.links.time_s(link_bytes)  # [L, K]
        dispatch_s = link_s[:, self.links.device_links].max(axis=2)  # [L, G]
        comm_s = 2.0 * dispatch_s  # combine mirrors dispatch
        compute_s = device_tokens * self.device_layer_s_per_token  # [L, G]
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
