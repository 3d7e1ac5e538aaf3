"""Tensor names, shapes and in-memory layout of a checkpoint's weights.

Shape legend: V vocab, D hidden, H query heads, G key/value heads, Dh head dim,
E experts per layer, E_loc experts held by this process, F expert hidden, Fd dense-MLP hidden.

The dense part (embeddings, attention, norms, routers, dense MLPs, lm head) is what every
worker replicates; experts are loaded per (layer, expert) so a worker holds only its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from moemesh.model.checkpoint import CheckpointReader
from moemesh.model.config import ModelConfig
from moemesh.model.shard import WHOLE, Shard

_PREFIX = {"mixtral": "block_sparse_moe", "qwen3_moe": "mlp"}
# (gate, up, down) projection names inside one expert
_EXPERT_PROJ = {"mixtral": ("w1", "w3", "w2"), "qwen3_moe": ("gate_proj", "up_proj", "down_proj")}


def dense_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every dense tensor (what each worker replicates)."""
    D, Dh = cfg.hidden_size, cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (cfg.vocab_size, D),
        "model.norm.weight": (D,),
    }
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, D)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = (D,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (D,)
        for proj, rows in (("q", cfg.num_heads * Dh), ("k", cfg.num_kv_heads * Dh), ("v", cfg.num_kv_heads * Dh)):
            shapes[f"{p}.self_attn.{proj}_proj.weight"] = (rows, D)
            if cfg.attention_bias:
                shapes[f"{p}.self_attn.{proj}_proj.bias"] = (rows,)
        shapes[f"{p}.self_attn.o_proj.weight"] = (D, cfg.num_heads * Dh)
        if cfg.attention_bias:
            shapes[f"{p}.self_attn.o_proj.bias"] = (D,)
        if cfg.qk_norm:
            shapes[f"{p}.self_attn.q_norm.weight"] = (Dh,)
            shapes[f"{p}.self_attn.k_norm.weight"] = (Dh,)
        if cfg.moe_layers[i]:
            shapes[f"{p}.{_PREFIX[cfg.family]}.gate.weight"] = (cfg.num_experts, D)
        else:
            Fd = cfg.dense_intermediate_size
            shapes[f"{p}.mlp.gate_proj.weight"] = (Fd, D)
            shapes[f"{p}.mlp.up_proj.weight"] = (Fd, D)
            shapes[f"{p}.mlp.down_proj.weight"] = (D, Fd)
    return shapes


def expert_tensor_shapes(cfg: ModelConfig, layer: int, expert: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the three projections of one expert, in (gate, up, down) order."""
    D, F = cfg.hidden_size, cfg.expert_intermediate_size
    gate, up, down = _EXPERT_PROJ[cfg.family]
    p = f"model.layers.{layer}.{_PREFIX[cfg.family]}.experts.{expert}"
    return {f"{p}.{gate}.weight": (F, D), f"{p}.{up}.weight": (F, D), f"{p}.{down}.weight": (D, F)}


@dataclass(frozen=True)
class AttentionWeights:
    wqkv: torch.Tensor  # (H*Dh + 2*G*Dh, D): q, k, v projections fused into one matmul
    bqkv: torch.Tensor | None  # (H*Dh + 2*G*Dh,)
    wo: torch.Tensor  # (D, H*Dh)
    bo: torch.Tensor | None  # (D,)
    q_norm: torch.Tensor | None  # (Dh,) Qwen3 only
    k_norm: torch.Tensor | None  # (Dh,) Qwen3 only


@dataclass(frozen=True)
class LayerWeights:
    input_norm: torch.Tensor  # (D,)
    post_norm: torch.Tensor  # (D,)
    attn: AttentionWeights
    router: torch.Tensor | None  # (E, D) for MoE layers
    dense_w13: torch.Tensor | None  # (2*Fd, D) gate and up fused, for dense MLP layers
    dense_w2: torch.Tensor | None  # (D, Fd)


@dataclass(frozen=True)
class DenseWeights:
    embed: torch.Tensor  # (V, D)
    lm_head: torch.Tensor  # (V, D); the same storage as embed when tied
    final_norm: torch.Tensor  # (D,)
    layers: tuple[LayerWeights, ...]


@dataclass(frozen=True)
class LayerExperts:
    """The experts of one MoE layer held by this process, whole or one shard each.

    Local expert i is global expert `expert_ids[i]`, of which this process holds `shards[i]`
    (WHOLE, or columns F_i = F / count of its hidden dimension; see moemesh.model.shard).
    Per-expert tensors rather than one stacked tensor: one rank may hold a whole expert and a
    shard of another (different widths), and an epoch switch reuses held tensors as they are
    (no restacking copy, no transient second copy of the weights).
    """

    expert_ids: tuple[int, ...]
    w13: tuple[torch.Tensor, ...]  # per local expert (D, 2*F_i): gate columns then up columns
    w2: tuple[torch.Tensor, ...]  # per local expert (D, F_i): the checkpoint's layout (y = h @ w2.T)
    shards: tuple[Shard, ...] = ()  # per local expert; () = every one WHOLE

    def __post_init__(self) -> None:
        if not self.shards:
            object.__setattr__(self, "shards", (WHOLE,) * len(self.expert_ids))
        assert len(self.w13) == len(self.w2) == len(self.shards) == len(self.expert_ids), "one entry per local expert"

    @classmethod
    def stacked(cls, expert_ids: tuple[int, ...], w13: torch.Tensor, w2: torch.Tensor) -> LayerExperts:
        """Whole experts from stacked w13 (E_loc, D, 2F) and w2 (E_loc, D, F); views, no copy."""
        return cls(expert_ids=tuple(expert_ids), w13=tuple(w13.unbind(0)), w2=tuple(w2.unbind(0)))

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.w13) + sum(t.nbytes for t in self.w2)

    def piece(self, expert: int, shard: Shard) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(w13, w2) of that part of `expert` if this holds it, or its columns copied out of a
        held whole expert; None when it cannot be derived from what is held."""
        if expert not in self.expert_ids:
            return None
        i = self.expert_ids.index(expert)
        if self.shards[i] == shard:
            return self.w13[i], self.w2[i]
        if self.shards[i] == WHOLE:
            return shard_weights(self.w13[i], self.w2[i], shard)
        return None


def shard_weights(w13: torch.Tensor, w2: torch.Tensor, shard: Shard) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole expert's w13 (D, 2F) and w2 (D, F) -> shard's (D, 2F/S) and (D, F/S), contiguous."""
    F = w2.shape[1]
    cols = shard.columns(F)
    gate, up = w13[:, cols], w13[:, F + cols.start : F + cols.stop]  # (D, F/S) each
    return torch.cat([gate, up], dim=1).contiguous(), w2[:, cols].contiguous()


def load_dense(reader: CheckpointReader, cfg: ModelConfig, dtype: torch.dtype, device: str) -> DenseWeights:
    t = reader.read(dense_tensor_shapes(cfg), dtype=dtype, device=device)
    layers = tuple(_layer_weights(t, cfg, i) for i in range(cfg.num_layers))
    embed = t["model.embed_tokens.weight"]
    lm_head = embed if cfg.tie_word_embeddings else t["lm_head.weight"]
    return DenseWeights(embed=embed, lm_head=lm_head, final_norm=t["model.norm.weight"], layers=layers)


def _layer_weights(t: Mapping[str, torch.Tensor], cfg: ModelConfig, i: int) -> LayerWeights:
    p = f"model.layers.{i}"
    a = f"{p}.self_attn"
    bias = cfg.attention_bias
    attn = AttentionWeights(
        wqkv=torch.cat([t[f"{a}.q_proj.weight"], t[f"{a}.k_proj.weight"], t[f"{a}.v_proj.weight"]]),
        bqkv=torch.cat([t[f"{a}.q_proj.bias"], t[f"{a}.k_proj.bias"], t[f"{a}.v_proj.bias"]]) if bias else None,
        wo=t[f"{a}.o_proj.weight"],
        bo=t[f"{a}.o_proj.bias"] if bias else None,
        q_norm=t.get(f"{a}.q_norm.weight"),
        k_norm=t.get(f"{a}.k_norm.weight"),
    )
    sparse = cfg.moe_layers[i]
    return LayerWeights(
        input_norm=t[f"{p}.input_layernorm.weight"],
        post_norm=t[f"{p}.post_attention_layernorm.weight"],
        attn=attn,
        router=t[f"{p}.{_PREFIX[cfg.family]}.gate.weight"] if sparse else None,
        dense_w13=None if sparse else torch.cat([t[f"{p}.mlp.gate_proj.weight"], t[f"{p}.mlp.up_proj.weight"]]),
        dense_w2=None if sparse else t[f"{p}.mlp.down_proj.weight"],
    )


def load_layer_experts(
    reader: CheckpointReader,
    cfg: ModelConfig,
    layer: int,
    experts: Iterable[int],
    dtype: torch.dtype,
    device: str,
    shards: Iterable[Shard] | None = None,
) -> LayerExperts:
    """Read only the given experts of one layer (only `shards[i]`'s columns of expert i)."""
    ids = tuple(experts)
    parts = tuple(shards) if shards is not None else (WHOLE,) * len(ids)
    w13, w2 = [], []
    for e, shard in zip(ids, parts, strict=True):
        if not 0 <= e < cfg.num_experts:
            raise ValueError(f"expert {e} out of range 0..{cfg.num_experts - 1}")
        shapes = expert_tensor_shapes(cfg, layer, e)
        gate_name, up_name, down_name = shapes
        cols = shard.columns(cfg.expert_intermediate_size)
        slices = {gate_name: (cols,), up_name: (cols,), down_name: (slice(None), cols)}
        t = reader.read(shapes, dtype=dtype, device=device, slices=slices if shard != WHOLE else None)
        # (D, 2F_i): stored transposed because streaming it this way is ~2x faster for the few
        # rows a decode step sends each expert (measured in docs/architecture.md).
        w13.append(torch.cat([t[gate_name], t[up_name]]).t().contiguous())
        w2.append(t[down_name].contiguous())  # (D, F_i)
    return LayerExperts(expert_ids=ids, w13=tuple(w13), w2=tuple(w2), shards=parts)
