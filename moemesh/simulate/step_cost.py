"""The cost model of one forward step of a deployment: FLOPs and bytes at the device's rates,
exchanges from the planner's placement and per-link loads, overlap from the timeline. Pure
(numpy, no torch).

Deployments (`parse_deployment`):
- `ep<N>`: N devices, data-parallel attention (every device runs attention for its share of the
  sequences), experts spread by the planner with at most one per device per layer when N >= E
  (replicas when N > E); one all-to-all each way per MoE layer across all N devices.
- `colocated<k>`: the topology's devices in expert-parallel groups of ceil(E / k) devices, k
  experts per device (the "several experts per GPU" shape); exchanges stay inside a group.
- `tp<T>pp<P>`: the paper's baseline: P pipeline stages of T tensor-parallel devices; every
  device holds 1/T of the attention and of every expert of its stage's layers; two ring
  all-reduces per layer; P micro-batches keep the stages busy.

Per layer and micro-batch, every stage is the slowest device's time (the mesh runs in lockstep):
- attention = roofline(FLOPs, attention weights + KV cache read) + router + layer overhead;
- dispatch = the planner's dispatch time of the device (busiest of its ports: latency + bytes /
  bandwidth) + per-peer message cost; combine mirrors it;
- experts = roofline(token copies x FLOPs per copy, weights of the experts that receive tokens)
  + per-expert overhead; an expert receives a token with probability 1 - exp(-expected copies).
  Only routed experts are placed and dispatched;
- shared = roofline(the device's tokens x the shared experts' FLOPs, their weights): dense work
  every device runs for its own tokens, scheduled while the dispatch flies (moemesh.simulate.timeline);
- attention: MLA decodes absorbed and prefills unabsorbed (ModelShape.attention_flops), reading
  its latent cache (C + Dr values per token per layer);
- grouped routing (DeepSeek-V3): the planner's synthetic traffic is group-limited, so its
  co-activation (and the InfiniBand crossings the cost model derives from it) carries the groups.
A step = the scheduled layers (moemesh.simulate.timeline) + lm head + step and serving overheads
+ header (the lockstep agreement collective).
Decode: TPOT = step time, TPS = batch / step. Prefill: TPS = prompt tokens / step.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import numpy as np

from moemesh.errors import ConfigError
from moemesh.planner.cost import CostOptions
from moemesh.planner.search import Problem, plan
from moemesh.planner.topology import LinkSpec, Topology
from moemesh.planner.traffic import Skew, Traffic, synthetic
from moemesh.simulate.hardware import DeviceProfile
from moemesh.simulate.shapes import ModelShape, Workload
from moemesh.simulate.timeline import StageTimes, Timeline, schedule

PAPER_COLOCATED = 8  # the paper's baseline: "8 experts per layer per GPU"


@dataclass(frozen=True)
class Deployment:
    """How the model is spread: `kind` "ep" (expert parallel) or "tp" (tensor x pipeline)."""

    name: str
    kind: str
    devices: int  # all devices of the deployment
    group: int  # devices of one exchange group: EP group (all-to-all) or TP group (all-reduce)
    pp: int = 1  # pipeline stages (tp only)

    @property
    def replicas(self) -> int:
        """Independent copies of the whole model (data parallel over groups)."""
        return self.devices // (self.group * self.pp)


def parse_deployment(text: str, experts: int, devices: int) -> Deployment:
    """`ep`, `ep<N>`, `colocated[<k>]`, `tp<T>pp<P>` or `tp<T>`; `devices` is the topology's."""
    t = text.strip().lower()
    if t in ("ep", "epn"):
        t = f"ep{devices}"
    if m := re.fullmatch(r"ep(\d+)", t):
        n = int(m.group(1))
        return Deployment(t, "ep", n, n)
    if m := re.fullmatch(r"colocated(\d*)", t):
        k = min(int(m.group(1) or PAPER_COLOCATED), experts)
        group = max(1, math.ceil(experts / k))
        if k < 1 or devices % group:
            raise ConfigError(f"{text}: {devices} devices do not split into groups of {group} ({k} experts each)")
        return Deployment(f"colocated{k}", "ep", devices, group)
    if m := re.fullmatch(r"tp(\d+)(?:pp(\d+))?", t):
        tp, pp = int(m.group(1)), int(m.group(2) or 1)
        return Deployment(t, "tp", tp * pp, tp, pp)
    raise ConfigError(f"deployment {text!r}: want ep<N>, colocated<k> or tp<T>pp<P>")


@dataclass(frozen=True)
class LayerRow:
    """One layer of the timeline; stage times summed over micro-batches, seconds."""

    layer: int
    attention_s: float
    dispatch_s: float
    experts_s: float
    combine_s: float
    span_s: float  # wall time of the layer in the scheduled step
    hidden_share: float | None  # of this layer's communication; None = no communication
    shared_s: float = 0.0  # shared experts (overlapping the dispatch)


@dataclass(frozen=True)
class Prediction:
    deployment: Deployment
    workload: Workload
    topology: str
    profile: str
    comm_labels: tuple[str, str]  # ("dispatch", "combine") or ("all-reduce", "all-reduce")
    rows: tuple[LayerRow, ...]
    step_s: float  # one forward step (decode: one token for every sequence)
    tpot_s: float | None  # decode only
    tps: float  # tokens per second, whole deployment
    comm_s: float  # communication per step (all layers, busy time)
    exposed_comm_s: float
    hidden_share: float | None
    memory_bytes: float  # per device: weights + KV cache
    memory_ok: bool
    placement: str
    parts: dict  # step breakdown: layers_s, head_s, overhead_s, header_s

    @property
    def tps_per_device(self) -> float:
        return self.tps / self.deployment.devices


def sub_topology(topo: Topology, devices: int) -> Topology:
    """The first `devices` devices of `topo` (whole nodes first); ConfigError if too few."""
    if devices > topo.devices:
        raise ConfigError(f"deployment needs {devices} devices; topology {topo.name} has {topo.devices}")
    if devices == topo.devices:
        return topo
    return replace(topo, name=f"{topo.name}[:{devices}]", devices=devices,
                   nodes=math.ceil(devices / topo.devices_per_node))


@dataclass(frozen=True)
class Routing:
    """Measured routing instead of the synthetic one (ep only): `traffic` is one micro-batch's
    copies per (source device, expert), `slots` the planner's experts per device per layer (more
    than ceil(E / G) leaves room for replicas), `options` its pricing (dedupe_per_node=False: every
    cross-node copy travels on its own, as moemesh's transport sends them)."""

    traffic: Traffic
    slots: int | None = None
    options: CostOptions = CostOptions()


def predict(shape: ModelShape, dep: Deployment, work: Workload, topo: Topology, profile: DeviceProfile,
            method: str = "ours", skew: Skew = Skew(zipf=0.0), seed: int = 0,
            routing: Routing | None = None) -> Prediction:
    """The step time, TPOT and TPS of `dep` serving `work` (module docstring).
    work.micro_batches == 0: try 1 and 2 and keep the faster step."""
    if work.micro_batches == 0:
        tries = [predict(shape, dep, replace(work, micro_batches=m), topo, profile, method, skew, seed, routing)
                 for m in (1, 2)]
        return min(tries, key=lambda p: p.step_s)
    if dep.kind == "tp":
        return _predict_tp(shape, dep, work, sub_topology(topo, dep.devices), profile)
    return _predict_ep(shape, dep, work, sub_topology(topo, dep.devices), profile, method, skew, seed, routing)


# ---- pieces shared by both kinds ------------------------------------------------------------
def _hit(expected_copies: np.ndarray | float) -> np.ndarray:
    """Probability that an expert receives at least one of `expected_copies` (Poisson)."""
    return 1.0 - np.exp(-np.asarray(expected_copies, dtype=np.float64))


def _attention_s(shape: ModelShape, profile: DeviceProfile, seqs: float, work: Workload, shards: int = 1) -> float:
    """One attention block + router for `seqs` sequences on one device (1/shards of the heads)."""
    tokens = seqs * (1 if work.phase == "decode" else work.seq)
    flops = (shape.attention_flops(tokens, work.context, absorbed=work.phase == "decode") / shards
             + 2.0 * tokens * shape.router_params)
    kv = seqs * work.seq * shape.kv_bytes_per_token / shards
    weights = shape.attn_weight_bytes / shards + shape.router_params * shape.dtype_bytes
    return profile.roofline_s(flops, weights + kv) + profile.layer_overhead_s


def _head_s(shape: ModelShape, profile: DeviceProfile, seqs: float) -> float:
    """The lm head for the last token of `seqs` sequences on one device."""
    return profile.roofline_s(2.0 * seqs * shape.head_params, shape.head_params * shape.dtype_bytes)


def _kv_bytes(shape: ModelShape, seqs: float, work: Workload, layers: int, shards: int = 1) -> float:
    return seqs * work.seq * shape.kv_bytes_per_token * layers / shards


def _rows(tl: Timeline, layer_ids: list[int]) -> tuple[LayerRow, ...]:
    return tuple(LayerRow(layer_ids[l], attention_s=tl.stage_s(l, "attention"), dispatch_s=tl.stage_s(l, "dispatch"),
                          experts_s=tl.stage_s(l, "experts"), combine_s=tl.stage_s(l, "combine"),
                          span_s=tl.layer_span_s(l), hidden_share=tl.layer_hidden_share(l),
                          shared_s=tl.stage_s(l, "shared")) for l in range(tl.layers))


# ---- expert parallel ------------------------------------------------------------------------
def _predict_ep(shape: ModelShape, dep: Deployment, work: Workload, topo: Topology, profile: DeviceProfile,
                method: str, skew: Skew, seed: int, routing: Routing | None = None) -> Prediction:
    G, m = dep.group, work.micro_batches
    seqs_dev = work.batch / dep.devices  # sequences whose attention each device runs
    tokens_mb = work.tokens / dep.devices / m  # tokens per device per micro-batch
    group_topo = sub_topology(topo, G)
    layers, placement = _ep_layers(shape, work, group_topo, profile, seqs_dev / m, tokens_mb, method, skew, seed,
                                   routing)
    tl = schedule(layers, m)
    head = _head_s(shape, profile, seqs_dev)
    header = profile.header_s if G > 1 else 0.0
    overhead = profile.step_overhead_s + profile.serving_overhead_s
    step = tl.makespan_s + head + overhead + header
    P = max(1, math.ceil(shape.experts / G)) if G < shape.experts else 1  # noqa: SIM300 - G is the rank count, not a constant
    memory = (len(shape.moe_layer_ids) * (P * shape.expert.expert_bytes + shape.shared_params * shape.dtype_bytes)
              + shape.layers * (shape.attn_weight_bytes + shape.router_params * shape.dtype_bytes)
              + shape.dense_layers * 3 * shape.d_model * shape.dense_ff * shape.dtype_bytes
              + shape.head_params * shape.dtype_bytes + _kv_bytes(shape, seqs_dev, work, shape.layers))
    return _prediction(dep, work, topo, profile, ("dispatch", "combine"), tl, step, memory, placement,
                       {"layers_s": tl.makespan_s, "head_s": head, "overhead_s": overhead, "header_s": header})


def _ep_layers(shape: ModelShape, work: Workload, topo: Topology, profile: DeviceProfile, seqs_mb: float,
               tokens_mb: float, method: str, skew: Skew, seed: int, routing: Routing | None = None
               ) -> tuple[list[StageTimes], str]:
    """Stage times of one micro-batch in every layer, from the planner's placement and costs."""
    G = topo.devices
    moe = list(shape.moe_layer_ids)
    limit = (shape.grouped.n_group, shape.grouped.topk_group) if shape.grouped else None
    if routing is None:
        routing = Routing(synthetic(shape.experts, moe, sources=G, top_k=shape.top_k, skew=skew,
                                    tokens_per_source=max(tokens_mb, 1e-9), seed=seed, group_limit=limit))
    traffic = routing.traffic.with_sources(G)
    # memory is the prediction's own column (memory_ok), so the planner prices any placement here
    problem = Problem(topo, traffic, shape.expert, routing.options, memory_fraction=math.inf, slots=routing.slots)
    chosen = plan(problem, method)
    cost = problem.model.evaluate(chosen.placement, traffic)  # the planner's per-link and per-device loads
    attention = _attention_s(shape, profile, seqs_mb, work)
    shared = _shared_s(shape, profile, tokens_mb)
    per_copy = traffic.expert_tokens / np.maximum(chosen.report.replicas, 1)  # [L, E] copies per replica
    out = []
    for layer in range(shape.layers):
        if layer not in moe:
            dense = _dense_mlp_s(shape, profile, tokens_mb)
            out.append(StageTimes(attention, 0.0, dense, 0.0))
            continue
        l = moe.index(layer)
        experts = _ep_experts_s(shape, profile, chosen.slots[l], per_copy[l], cost.device_tokens[l])
        exchange = _ep_exchange_s(cost.comm_s[l] / 2, profile, G, tokens_mb * shape.top_k)
        out.append(StageTimes(attention, exchange, experts, exchange, shared))
    origin = f"{chosen.report.method} over {G} device(s), traffic {traffic.origin}"
    return out, origin


def _ep_experts_s(shape: ModelShape, profile: DeviceProfile, slots: np.ndarray, per_copy: np.ndarray,
                  device_tokens: np.ndarray) -> float:
    """Slowest device's expert stage: slots [G, P] experts held, per_copy [E] copies per replica."""
    e = shape.expert
    held = np.where(slots >= 0, per_copy[np.maximum(slots, 0)], 0.0)  # [G, P] expected copies
    hits = _hit(held).sum(axis=1)  # [G] experts expected to receive tokens
    times = [profile.roofline_s(n * e.flops_per_token, h * e.expert_bytes) + h * profile.expert_overhead_s
             for n, h in zip(device_tokens, hits)]
    return max(times)


def _ep_exchange_s(dispatch_s: np.ndarray, profile: DeviceProfile, G: int, copies: float) -> float:
    """One all-to-all: the slowest device's port time plus a message per peer it sends to."""
    if G == 1:
        return 0.0
    peers = min(G - 1, math.ceil(copies))
    return float(dispatch_s.max()) + peers * profile.per_peer_s


def _shared_s(shape: ModelShape, profile: DeviceProfile, tokens: float, shards: int = 1) -> float:
    """The shared experts of one MoE layer for `tokens` tokens on one device (0 without any)."""
    params = shape.shared_params / shards
    return profile.roofline_s(2.0 * tokens * params, params * shape.dtype_bytes) if params else 0.0


def _dense_mlp_s(shape: ModelShape, profile: DeviceProfile, tokens: float, shards: int = 1) -> float:
    params = 3 * shape.d_model * shape.dense_ff / shards
    return profile.roofline_s(2.0 * tokens * params, params * shape.dtype_bytes)


# ---- tensor x pipeline parallel ---------------------------------------------------------------
def _ring_allreduce_s(link: LinkSpec, devices: int, bytes_: float) -> float:
    """Ring all-reduce of `bytes_` over `devices`: 2 (n-1) steps of bytes/n each."""
    if devices == 1 or bytes_ <= 0:
        return 0.0
    n = devices
    return 2 * (n - 1) * link.latency_s + 2 * (n - 1) / n * bytes_ / link.bandwidth_bytes_per_s


def _predict_tp(
    shape: ModelShape, dep: Deployment, work: Workload, topo: Topology, profile: DeviceProfile
) -> Prediction:
    """P stages of T devices; m = max(P, micro_batches) micro-batches of batch / m sequences.

    A micro-batch runs a stage in t (its layers, each: attention, all-reduce, experts, all-reduce;
    an all-reduce needs its own micro-batch's result, so nothing overlaps inside a stage) and hops
    to the next stage in x; it gets its next token after P (t + x) + lm head, which is the TPOT,
    while the P stages work on the other micro-batches (m = P keeps every stage busy)."""
    T, P = dep.group, dep.pp
    m = max(P, work.micro_batches)
    seqs_mb = work.batch / dep.replicas / m
    tokens_mb = seqs_mb * (1 if work.phase == "decode" else work.seq)
    link = topo.intra if T <= topo.devices_per_node else topo.inter  # noqa: SIM300 - T is the TP degree, not a constant
    act_bytes = tokens_mb * shape.d_model * shape.dtype_bytes
    allreduce = _ring_allreduce_s(link, T, act_bytes)
    attention = _attention_s(shape, profile, seqs_mb, work, shards=T)
    e = shape.expert
    copies = tokens_mb * shape.top_k
    hits = float(_hit(np.full(shape.experts, copies / shape.experts)).sum())
    experts = (profile.roofline_s(copies * e.flops_per_token / T, hits * e.expert_bytes / T)
               + hits * profile.expert_overhead_s + _shared_s(shape, profile, tokens_mb, T))
    per_stage = math.ceil(shape.layers / P)
    stage = schedule([StageTimes(attention, allreduce, experts if layer in shape.moe_layer_ids else
                                 _dense_mlp_s(shape, profile, tokens_mb, T), allreduce)
                      for layer in range(per_stage)], 1)
    cross = topo.inter if topo.nodes > 1 else topo.intra  # stage boundary: the next node
    hop = float(cross.time_s(act_bytes)) if P > 1 else 0.0
    head = _head_s(shape, profile, seqs_mb)
    header = profile.header_s if T > 1 else 0.0
    overhead = profile.step_overhead_s + profile.serving_overhead_s
    layers_s = P * (stage.makespan_s + hop)
    step = layers_s + head + overhead + header
    moe_bytes = shape.experts * e.expert_bytes + shape.shared_params * shape.dtype_bytes if shape.moe_layer_ids else 0
    memory = (per_stage * (shape.attn_weight_bytes + moe_bytes) / T
              + _kv_bytes(shape, work.batch / dep.replicas, work, per_stage, T))
    pred = _prediction(dep, work, topo, profile, ("all-reduce", "all-reduce"), stage, step, memory,
                       f"every expert split {T} ways; {per_stage} layers per stage; {m} micro-batches",
                       {"layers_s": layers_s, "head_s": head, "overhead_s": overhead,
                        "header_s": header, "stage_s": stage.makespan_s, "hop_s": hop, "micro_batches": m})
    # every micro-batch crosses every stage once per token: P stages' worth of exchanges per token
    return replace(pred, comm_s=P * stage.comm_s, exposed_comm_s=P * stage.exposed_comm_s)


def _prediction(dep, work, topo, profile, labels, tl: Timeline, step: float, memory: float, placement: str,
                parts: dict) -> Prediction:
    tps = (work.batch if work.phase == "decode" else work.tokens) / step
    return Prediction(
        deployment=dep, workload=work, topology=topo.name, profile=profile.name, comm_labels=labels,
        rows=_rows(tl, list(range(tl.layers))), step_s=step, tpot_s=step if work.phase == "decode" else None,
        tps=tps, comm_s=tl.comm_s, exposed_comm_s=tl.exposed_comm_s, hidden_share=tl.hidden_share,
        memory_bytes=memory, memory_ok=memory <= profile.memory_bytes, placement=placement, parts=parts,
    )
