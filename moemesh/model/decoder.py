"""The decoder: embeddings -> layers (attention + MoE or dense MLP) -> norm -> lm head.

Shape legend: T tokens in the step (all sequences flattened), R rows whose logits are wanted,
D hidden, V vocab, E experts, E_loc experts on this rank.

One `MoEModel` serves every deployment: the MoE layers go through `MoELayer`, whose transport
decides whether experts are local or spread over the mesh. The attention kind (grouped-query or
latent) and the router kind are chosen once here, from the config, and never branched on again.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from moemesh.model.activations import expert_activation
from moemesh.model.checkpoint import CheckpointReader
from moemesh.model.config import ModelConfig, load_config
from moemesh.model.layers import AttentionPlan, GroupedQueryAttention, KVCache, rms_norm
from moemesh.model.mla import LatentAttention, LatentCache
from moemesh.model.moe import (
    GroupedExperts,
    LocalTransport,
    MoELayer,
    Router,
    RoutingObserver,
    Transport,
    run_interleaved,
    run_to_end,
    stack_experts,
)
from moemesh.model.routers import GroupedSigmoidRouter, SoftmaxTopKRouter, TopKSoftmaxRouter
from moemesh.model.shard import Shard
from moemesh.model.weights import (
    DenseWeights,
    LayerExperts,
    load_dense,
    load_layer_experts,
)


@dataclass(frozen=True)
class RuntimeShape:
    """Sizes fixed at start-up: how many sequences run at once and how long they may grow."""

    max_seqs: int = 32  # S: KV cache slots
    max_model_len: int = 2048  # L: longest prompt + output
    dtype: torch.dtype = torch.float32
    device: str = "cpu"


class MoEModel:
    def __init__(self, cfg: ModelConfig, dense: DenseWeights, moe: MoELayer, runtime: RuntimeShape):
        self.cfg = cfg
        self.dense = dense
        self.moe = moe
        self.runtime = runtime
        max_len = min(runtime.max_model_len, cfg.max_position_embeddings)
        self.max_len = max_len
        self.attention: GroupedQueryAttention | LatentAttention = (
            GroupedQueryAttention if cfg.mla is None else LatentAttention
        )(cfg, runtime.max_seqs, max_len, runtime.dtype, runtime.device)

    @property
    def cache(self) -> KVCache | LatentCache:
        """The attention's cache: K/V heads (S, G, L, Dh) per layer, or MLA latents (S, L, C + Dr)."""
        return self.attention.cache

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, plan: AttentionPlan, logit_rows: torch.Tensor,
                t_max: int | None = None) -> torch.Tensor:
        """token_ids: (T,) int64; logit_rows: (R,) int64 rows of T to project -> logits (R, V) fp32.

        T may be 0 on a mesh rank with nothing to run: it still joins every MoE exchange.
        `t_max`: on a mesh, the most tokens any rank runs in this step (the step header's); it
        sizes every exchange. None in a single process.
        """
        return run_to_end(self._stages(token_ids, plan, logit_rows, t_max))

    @torch.inference_mode()
    def forward_overlapped(self, micro: list[tuple[torch.Tensor, AttentionPlan, torch.Tensor]],
                           t_max: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Several micro-batches at once, interleaved so one computes while another's dispatch or
        combine is in flight. The interleaving is the same on every rank (cross-rank invariant):
        round robin, each micro-batch advancing to its next exchange. `t_max`: (M,) per
        micro-batch, as in `forward`."""
        sizes = list(t_max) if t_max is not None else [None] * len(micro)
        assert len(sizes) == len(micro), "one T_max per micro-batch"
        return run_interleaved([self._stages(t, p, r, n) for (t, p, r), n in zip(micro, sizes)])

    def _stages(
        self, token_ids: torch.Tensor, plan: AttentionPlan, logit_rows: torch.Tensor, t_max: int | None
    ) -> Generator[None, None, torch.Tensor]:
        cfg = self.cfg
        h = F.embedding(token_ids, self.dense.embed)  # (T, D)
        for i, lw in enumerate(self.dense.layers):
            x = rms_norm(h, lw.input_norm, cfg.rms_norm_eps)
            if h.shape[0]:
                h = h + self.attention(x, lw.attn, i, plan)
            x = rms_norm(h, lw.post_norm, cfg.rms_norm_eps)
            if lw.router is not None:
                h = h + (yield from self.moe.stages(i, x, lw.router, t_max, lw.shared))
            else:
                assert lw.dense_w13 is not None and lw.dense_w2 is not None, "a layer without a router is dense"
                gate, up = F.linear(x, lw.dense_w13).chunk(2, dim=-1)  # (T, Fd) each
                h = h + F.linear(F.silu(gate) * up, lw.dense_w2)
        last = rms_norm(h[logit_rows], self.dense.final_norm, cfg.rms_norm_eps)  # (R, D)
        return F.linear(last, self.dense.lm_head).float()  # (R, V)


def load_experts(
    reader: CheckpointReader, cfg: ModelConfig, assignment: dict[int, list[int]], runtime: RuntimeShape,
    shards: dict[int, tuple[Shard, ...]] | None = None,
) -> dict[int, LayerExperts]:
    """assignment: MoE layer -> global expert ids this process holds (in local order);
    shards: MoE layer -> the part of each it holds (default: whole experts). Each layer's experts
    are stacked (`stack_experts`) so they run as grouped matmuls."""
    shards = shards or {}
    return {
        layer: stack_experts(load_layer_experts(reader, cfg, layer, ids, runtime.dtype, runtime.device,
                                                shards.get(layer)))
        for layer, ids in assignment.items()
    }


def build_model(
    model_dir: str | Path,
    runtime: RuntimeShape,
    transport: Transport | None = None,
    assignment: dict[int, list[int]] | None = None,
    reader: CheckpointReader | None = None,
    shards: dict[int, tuple[Shard, ...]] | None = None,
    overflow: str = "dropless",
    capacity_factor: float = 1.2,
    recorder: RoutingObserver | None = None,
) -> MoEModel:
    """Load a checkpoint. Defaults: every expert local (the reference and `--local` mode).

    A mesh worker passes its transport and the experts placed on it (and which shard of each),
    and a load recorder that sees every layer's routing.
    """
    cfg = load_config(model_dir)
    reader = reader or CheckpointReader(model_dir)
    if assignment is None:
        assignment = {layer: list(range(cfg.num_experts)) for layer in cfg.moe_layer_ids}
    dense = load_dense(reader, cfg, runtime.dtype, runtime.device)
    held = load_experts(reader, cfg, assignment, runtime, shards)
    experts = GroupedExperts(held, expert_activation(cfg.clamped_swiglu))
    moe: MoELayer = MoELayer(
        router=make_router(cfg, dense, overflow, capacity_factor),
        transport=transport or LocalTransport(cfg.num_experts),
        experts=experts,
        recorder=recorder,
        device=runtime.device,
    )
    return MoEModel(cfg, dense, moe, runtime)


def make_router(cfg: ModelConfig, dense: DenseWeights, overflow: str = "dropless", capacity_factor: float = 1.2
                ) -> Router:
    """The family's router: grouped sigmoid (with each layer's correction bias), top-k softmax over
    biased logits (with each layer's router bias), or softmax top-k."""
    if cfg.router_bias:
        logit_biases = {i: b for i, lw in enumerate(dense.layers) if (b := lw.router_logit_bias) is not None}
        return TopKSoftmaxRouter(cfg.top_k, logit_biases, overflow, capacity_factor)
    if cfg.grouped_routing is None:
        return SoftmaxTopKRouter(cfg.top_k, cfg.norm_topk_prob, overflow, capacity_factor)
    biases = {i: lw.router_bias for i, lw in enumerate(dense.layers) if lw.router_bias is not None}
    return GroupedSigmoidRouter(cfg.top_k, cfg.grouped_routing, cfg.norm_topk_prob, biases, overflow, capacity_factor)
