"""Tensor names, shapes and in-memory layout of a checkpoint's weights.

Shape legend: V vocab, D hidden, H query heads, G key/value heads, Dh head dim,
E experts per layer, E_loc experts held by this process, F expert hidden, Fd dense-MLP hidden,
Fs shared-expert hidden, F_i the hidden width of a held piece (F, or F / shards);
MLA: Q q_lora_rank, C kv_lora_rank, Dn/Dr/Dv nope/rope/value head dims.

The dense part (embeddings, attention, norms, routers, dense MLPs, shared experts, lm head) is what
every worker replicates; routed experts are loaded per (layer, expert) so a worker holds only its own,
their biases (GPT-OSS) with them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch

from moemesh.model.checkpoint import CheckpointReader
from moemesh.model.config import ModelConfig
from moemesh.model.shard import WHOLE, Shard

_PREFIX = {"mixtral": "block_sparse_moe", "qwen3_moe": "mlp", "qwen2_moe": "mlp", "olmoe": "mlp", "deepseek_v3": "mlp",
           "glm4_moe": "mlp", "gpt_oss": "mlp"}
_ROUTER = {"gpt_oss": "router"}  # the router's module name; every other family: "gate"
# Families whose checkpoints hold each layer's experts stacked, transposed and with biases:
# gate_up_proj (E, D, 2F) with gate and up columns interleaved, down_proj (E, F, D), their biases.
_FUSED_TRANSPOSED = ("gpt_oss",)
# (gate, up, down) projection names inside one expert
_SWIGLU = ("gate_proj", "up_proj", "down_proj")
_EXPERT_PROJ = {"mixtral": ("w1", "w3", "w2")}  # every other family: _SWIGLU
# the shared expert's module name
_SHARED = {"qwen2_moe": "shared_expert", "deepseek_v3": "shared_experts", "glm4_moe": "shared_experts"}


def _attention_shapes(cfg: ModelConfig, p: str) -> dict[str, tuple[int, ...]]:
    """Grouped-query attention of layer prefix `p` (optional biases, per-head or full q/k norms)."""
    D, Dh = cfg.hidden_size, cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {}
    for proj, rows in (("q", cfg.num_heads * Dh), ("k", cfg.num_kv_heads * Dh), ("v", cfg.num_kv_heads * Dh)):
        shapes[f"{p}.self_attn.{proj}_proj.weight"] = (rows, D)
        if cfg.attention_bias:
            shapes[f"{p}.self_attn.{proj}_proj.bias"] = (rows,)
    shapes[f"{p}.self_attn.o_proj.weight"] = (D, cfg.num_heads * Dh)
    if cfg.o_bias:
        shapes[f"{p}.self_attn.o_proj.bias"] = (D,)
    if cfg.attention_sinks:
        shapes[f"{p}.self_attn.sinks"] = (cfg.num_heads,)
    if cfg.qk_norm:
        full = cfg.qk_norm_full
        shapes[f"{p}.self_attn.q_norm.weight"] = (cfg.num_heads * Dh,) if full else (Dh,)
        shapes[f"{p}.self_attn.k_norm.weight"] = (cfg.num_kv_heads * Dh,) if full else (Dh,)
    return shapes


def _mla_shapes(cfg: ModelConfig, p: str) -> dict[str, tuple[int, ...]]:
    """Multi-head latent attention of layer prefix `p` (DeepSeek-V3 names)."""
    m = cfg.mla
    assert m is not None, "only MLA configs have MLA tensors"
    D, H, a = cfg.hidden_size, cfg.num_heads, f"{p}.self_attn"
    shapes: dict[str, tuple[int, ...]] = {}
    if m.q_lora_rank is None:
        shapes[f"{a}.q_proj.weight"] = (H * m.qk_head_dim, D)
    else:
        shapes[f"{a}.q_a_proj.weight"] = (m.q_lora_rank, D)
        shapes[f"{a}.q_a_layernorm.weight"] = (m.q_lora_rank,)
        shapes[f"{a}.q_b_proj.weight"] = (H * m.qk_head_dim, m.q_lora_rank)
    shapes[f"{a}.kv_a_proj_with_mqa.weight"] = (m.cache_width, D)
    shapes[f"{a}.kv_a_layernorm.weight"] = (m.kv_lora_rank,)
    shapes[f"{a}.kv_b_proj.weight"] = (H * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank)
    shapes[f"{a}.o_proj.weight"] = (D, H * m.v_head_dim)
    return shapes


def _mlp_shapes(prefix: str, D: int, F: int) -> dict[str, tuple[int, ...]]:
    gate, up, down = _SWIGLU
    return {f"{prefix}.{gate}.weight": (F, D), f"{prefix}.{up}.weight": (F, D), f"{prefix}.{down}.weight": (D, F)}


def dense_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every dense tensor (what each worker replicates)."""
    D = cfg.hidden_size
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
        shapes.update(_mla_shapes(cfg, p) if cfg.mla is not None else _attention_shapes(cfg, p))
        if not cfg.moe_layers[i]:
            shapes.update(_mlp_shapes(f"{p}.mlp", D, cfg.dense_intermediate_size))
            continue
        moe = f"{p}.{_PREFIX[cfg.family]}"
        router = f"{moe}.{_ROUTER.get(cfg.family, 'gate')}"
        shapes[f"{router}.weight"] = (cfg.num_experts, D)
        if cfg.router_bias:
            shapes[f"{router}.bias"] = (cfg.num_experts,)
        if cfg.grouped_routing is not None:
            shapes[f"{moe}.gate.e_score_correction_bias"] = (cfg.num_experts,)
        if cfg.shared_intermediate_size:
            shapes.update(_mlp_shapes(f"{moe}.{_SHARED[cfg.family]}", D, cfg.shared_intermediate_size))
        if cfg.shared_expert_gate:
            shapes[f"{moe}.shared_expert_gate.weight"] = (1, D)
    return shapes


def layer_expert_tensor_shapes(cfg: ModelConfig, layer: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every routed-expert tensor of one MoE layer as the family's checkpoints hold
    them: per expert, or (GPT-OSS) stacked with biases."""
    if cfg.family in _FUSED_TRANSPOSED:
        return _fused_transposed_shapes(cfg, layer)
    shapes: dict[str, tuple[int, ...]] = {}
    for expert in range(cfg.num_experts):
        shapes.update(expert_tensor_shapes(cfg, layer, expert))
    return shapes


def _fused_transposed_shapes(cfg: ModelConfig, layer: int) -> dict[str, tuple[int, ...]]:
    E, D, F = cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size
    p = f"model.layers.{layer}.{_PREFIX[cfg.family]}.experts"
    return {f"{p}.gate_up_proj": (E, D, 2 * F), f"{p}.gate_up_proj_bias": (E, 2 * F),
            f"{p}.down_proj": (E, F, D), f"{p}.down_proj_bias": (E, D)}


def expert_tensor_shapes(cfg: ModelConfig, layer: int, expert: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the three projections of one expert, in (gate, up, down) order."""
    assert cfg.family not in _FUSED_TRANSPOSED, "this family's checkpoints hold no per-expert tensors"
    D, F = cfg.hidden_size, cfg.expert_intermediate_size
    gate, up, down = _EXPERT_PROJ.get(cfg.family, _SWIGLU)
    p = f"model.layers.{layer}.{_PREFIX[cfg.family]}.experts.{expert}"
    return {f"{p}.{gate}.weight": (F, D), f"{p}.{up}.weight": (F, D), f"{p}.{down}.weight": (D, F)}


@dataclass(frozen=True)
class AttentionWeights:
    wqkv: torch.Tensor  # (H*Dh + 2*G*Dh, D): q, k, v projections fused into one matmul
    bqkv: torch.Tensor | None  # (H*Dh + 2*G*Dh,)
    wo: torch.Tensor  # (D, H*Dh)
    bo: torch.Tensor | None  # (D,)
    q_norm: torch.Tensor | None  # (Dh,) per head (Qwen3) or (H*Dh,) over the projection (OLMoE)
    k_norm: torch.Tensor | None  # (Dh,) or (G*Dh,)
    sinks: torch.Tensor | None = None  # (H,) per-head logit in the softmax's denominator (GPT-OSS)


@dataclass(frozen=True)
class MLAWeights:
    """Multi-head latent attention. kv_b_proj is kept split per head into W_UK and W_UV: the
    unabsorbed path expands the latent with them, the absorbed decode path folds them into the
    query and the output."""

    q_a: torch.Tensor | None  # (Q, D); None when the checkpoint has a plain q_proj
    q_a_norm: torch.Tensor | None  # (Q,)
    q_b: torch.Tensor  # (H*(Dn+Dr), Q), or q_proj's (H*(Dn+Dr), D)
    kv_a: torch.Tensor  # (C+Dr, D): the latent and the shared rope key, one matmul
    kv_a_norm: torch.Tensor  # (C,)
    w_uk: torch.Tensor  # (H, Dn, C)
    w_uv: torch.Tensor  # (H, Dv, C)
    wo: torch.Tensor  # (D, H*Dv)


@dataclass(frozen=True)
class SharedExpertWeights:
    """The shared expert(s) every token of a MoE layer uses: dense work on each rank's own tokens."""

    w13: torch.Tensor  # (2*Fs, D) gate and up fused
    w2: torch.Tensor  # (D, Fs)
    gate: torch.Tensor | None  # (1, D): output scaled by sigmoid(x @ gate.T) (Qwen2-MoE); None = unscaled


@dataclass(frozen=True)
class LayerWeights:
    input_norm: torch.Tensor  # (D,)
    post_norm: torch.Tensor  # (D,)
    attn: AttentionWeights | MLAWeights
    router: torch.Tensor | None  # (E, D) for MoE layers
    dense_w13: torch.Tensor | None  # (2*Fd, D) gate and up fused, for dense MLP layers
    dense_w2: torch.Tensor | None  # (D, Fd)
    router_bias: torch.Tensor | None = None  # (E,) e_score_correction_bias: selection only (DeepSeek-V3)
    router_logit_bias: torch.Tensor | None = None  # (E,) the router linear's bias, part of its logits (GPT-OSS)
    shared: SharedExpertWeights | None = None


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
    Per-expert tensors are the record: one rank may hold a whole expert and a shard of another
    (different widths), and an epoch switch reuses held tensors as they are. Where a layer's
    experts share one shape, the compute stacks them once for grouped matmuls (moemesh.model.moe);
    an epoch switch restacks only the layers it changes (one transient extra copy of that layer).

    Biased experts (GPT-OSS) carry their biases here, so whatever loads or moves an expert moves
    them with it: b13 per local expert (2*F_i,) in w13's column order; b2 (D,) is added once per
    expert, by the piece with shard index 0 (None on the others: the pieces' outputs sum).
    """

    expert_ids: tuple[int, ...]
    w13: tuple[torch.Tensor, ...]  # per local expert (D, 2*F_i): gate columns then up columns
    w2: tuple[torch.Tensor, ...]  # per local expert (D, F_i): the checkpoint's layout (y = h @ w2.T)
    shards: tuple[Shard, ...] = ()  # per local expert; () = every one WHOLE
    b13: tuple[torch.Tensor, ...] = ()  # per local expert (2*F_i,); () = unbiased experts
    b2: tuple[torch.Tensor | None, ...] = ()  # per local expert (D,) or None; () = unbiased experts

    def __post_init__(self) -> None:
        if not self.shards:
            object.__setattr__(self, "shards", (WHOLE,) * len(self.expert_ids))
        assert len(self.w13) == len(self.w2) == len(self.shards) == len(self.expert_ids), "one entry per local expert"
        assert len(self.b13) == len(self.b2) in (0, len(self.expert_ids)), "biases for every local expert or none"

    @classmethod
    def stacked(cls, expert_ids: tuple[int, ...], w13: torch.Tensor, w2: torch.Tensor) -> LayerExperts:
        """Whole unbiased experts from stacked w13 (E_loc, D, 2F) and w2 (E_loc, D, F); views, no copy."""
        return cls(expert_ids=tuple(expert_ids), w13=tuple(w13.unbind(0)), w2=tuple(w2.unbind(0)))

    @property
    def biased(self) -> bool:
        return bool(self.b13)

    @property
    def nbytes(self) -> int:
        tensors = [*self.w13, *self.w2, *self.b13, *(b for b in self.b2 if b is not None)]
        return sum(t.nbytes for t in tensors)

    def piece(self, expert: int, shard: Shard) -> ExpertPiece | None:
        """That part of `expert` if this holds it, or its columns copied out of a held whole
        expert (biases included); None when it cannot be derived from what is held."""
        if expert not in self.expert_ids:
            return None
        i = self.expert_ids.index(expert)
        b13, b2 = (self.b13[i], self.b2[i]) if self.biased else (None, None)
        if self.shards[i] == shard:
            return ExpertPiece(self.w13[i], self.w2[i], b13, b2)
        if self.shards[i] == WHOLE:
            w13, w2 = shard_weights(self.w13[i], self.w2[i], shard)
            if b13 is None:
                return ExpertPiece(w13, w2, None, None)
            return ExpertPiece(w13, w2, *shard_biases(b13, b2, shard))
        return None

    @classmethod
    def of_pieces(cls, expert_ids: tuple[int, ...], pieces: list[ExpertPiece], shards: tuple[Shard, ...]
                  ) -> LayerExperts:
        """The layer's experts from one piece per expert id (all biased or none)."""
        biased = [p.b13 is not None for p in pieces]
        assert all(biased) or not any(biased), "biased and unbiased pieces in one layer"
        return cls(expert_ids=expert_ids, w13=tuple(p.w13 for p in pieces), w2=tuple(p.w2 for p in pieces),
                   shards=shards, b13=tuple(p.b13 for p in pieces if p.b13 is not None),
                   b2=tuple(p.b2 for p in pieces) if any(biased) else ())


class ExpertPiece(NamedTuple):
    """One expert (or one shard of it) as a rank holds it."""

    w13: torch.Tensor  # (D, 2*F_i)
    w2: torch.Tensor  # (D, F_i)
    b13: torch.Tensor | None  # (2*F_i,); None = unbiased
    b2: torch.Tensor | None  # (D,); None = unbiased, or a shard other than index 0


def shard_weights(w13: torch.Tensor, w2: torch.Tensor, shard: Shard) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole expert's w13 (D, 2F) and w2 (D, F) -> shard's (D, 2F/S) and (D, F/S), contiguous."""
    F = w2.shape[1]
    cols = shard.columns(F)
    gate, up = w13[:, cols], w13[:, F + cols.start : F + cols.stop]  # (D, F/S) each
    return torch.cat([gate, up], dim=1).contiguous(), w2[:, cols].contiguous()


def shard_biases(b13: torch.Tensor, b2: torch.Tensor | None, shard: Shard
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A whole expert's b13 (2F,) and b2 (D,) -> shard's (2F/S,) and b2 on shard index 0 only."""
    F = b13.shape[0] // 2
    cols = shard.columns(F)
    part = torch.cat([b13[cols], b13[F + cols.start : F + cols.stop]]).contiguous()  # (2F/S,)
    return part, (b2 if shard.index == 0 else None)


def load_dense(reader: CheckpointReader, cfg: ModelConfig, dtype: torch.dtype, device: str) -> DenseWeights:
    t = reader.read(dense_tensor_shapes(cfg), dtype=dtype, device=device)
    layers = tuple(_layer_weights(t, cfg, i) for i in range(cfg.num_layers))
    embed = t["model.embed_tokens.weight"]
    lm_head = embed if cfg.tie_word_embeddings else t["lm_head.weight"]
    return DenseWeights(embed=embed, lm_head=lm_head, final_norm=t["model.norm.weight"], layers=layers)


def _layer_weights(t: Mapping[str, torch.Tensor], cfg: ModelConfig, i: int) -> LayerWeights:
    p = f"model.layers.{i}"
    attn = _mla_weights(t, cfg, f"{p}.self_attn") if cfg.mla is not None else _attention_weights(t, f"{p}.self_attn")
    if not cfg.moe_layers[i]:
        return LayerWeights(
            input_norm=t[f"{p}.input_layernorm.weight"], post_norm=t[f"{p}.post_attention_layernorm.weight"],
            attn=attn, router=None, dense_w13=_w13(t, f"{p}.mlp"), dense_w2=t[f"{p}.mlp.down_proj.weight"],
        )
    moe = f"{p}.{_PREFIX[cfg.family]}"
    shared = None
    if cfg.shared_intermediate_size:
        s = f"{moe}.{_SHARED[cfg.family]}"
        shared = SharedExpertWeights(w13=_w13(t, s), w2=t[f"{s}.down_proj.weight"],
                                     gate=t.get(f"{moe}.shared_expert_gate.weight"))
    router = f"{moe}.{_ROUTER.get(cfg.family, 'gate')}"
    return LayerWeights(
        input_norm=t[f"{p}.input_layernorm.weight"], post_norm=t[f"{p}.post_attention_layernorm.weight"],
        attn=attn, router=t[f"{router}.weight"], dense_w13=None, dense_w2=None,
        router_bias=t.get(f"{moe}.gate.e_score_correction_bias"), shared=shared,
        router_logit_bias=t.get(f"{router}.bias"),
    )


def _w13(t: Mapping[str, torch.Tensor], prefix: str) -> torch.Tensor:
    return torch.cat([t[f"{prefix}.gate_proj.weight"], t[f"{prefix}.up_proj.weight"]])  # (2F, D)


def _attention_weights(t: Mapping[str, torch.Tensor], a: str) -> AttentionWeights:
    qkv = [f"{a}.{x}_proj" for x in "qkv"]
    return AttentionWeights(
        wqkv=torch.cat([t[f"{n}.weight"] for n in qkv]),
        bqkv=torch.cat([t[f"{n}.bias"] for n in qkv]) if f"{a}.q_proj.bias" in t else None,
        wo=t[f"{a}.o_proj.weight"],
        bo=t.get(f"{a}.o_proj.bias"),
        q_norm=t.get(f"{a}.q_norm.weight"),
        k_norm=t.get(f"{a}.k_norm.weight"),
        sinks=t.get(f"{a}.sinks"),
    )


def _mla_weights(t: Mapping[str, torch.Tensor], cfg: ModelConfig, a: str) -> MLAWeights:
    m = cfg.mla
    assert m is not None, "only MLA configs have MLA tensors"
    kv_b = t[f"{a}.kv_b_proj.weight"].view(cfg.num_heads, m.qk_nope_head_dim + m.v_head_dim, m.kv_lora_rank)
    w_uk, w_uv = kv_b.split([m.qk_nope_head_dim, m.v_head_dim], dim=1)  # (H, Dn, C), (H, Dv, C)
    lora = m.q_lora_rank is not None
    return MLAWeights(
        q_a=t[f"{a}.q_a_proj.weight"] if lora else None,
        q_a_norm=t[f"{a}.q_a_layernorm.weight"] if lora else None,
        q_b=t[f"{a}.q_b_proj.weight"] if lora else t[f"{a}.q_proj.weight"],
        kv_a=t[f"{a}.kv_a_proj_with_mqa.weight"],
        kv_a_norm=t[f"{a}.kv_a_layernorm.weight"],
        w_uk=w_uk.contiguous(),
        w_uv=w_uv.contiguous(),
        wo=t[f"{a}.o_proj.weight"],
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
    """Read only the given experts of one layer (only `shards[i]`'s columns of expert i), from
    per-expert tensors, from the fused (E, 2F, D) gate_up_proj / (E, D, F) down_proj layout, or
    from GPT-OSS's transposed, interleaved and biased one."""
    ids = tuple(experts)
    parts = tuple(shards) if shards is not None else (WHOLE,) * len(ids)
    fused = f"model.layers.{layer}.{_PREFIX[cfg.family]}.experts"
    read = (_read_fused_transposed if cfg.family in _FUSED_TRANSPOSED
            else _read_fused if reader.has(f"{fused}.gate_up_proj") else _read_per_expert)
    pieces = []
    for e, shard in zip(ids, parts, strict=True):
        if not 0 <= e < cfg.num_experts:
            raise ValueError(f"expert {e} out of range 0..{cfg.num_experts - 1}")
        gate, up, down, bias = read(reader, cfg, layer, e, shard, dtype, device)  # (F_i, D), (F_i, D), (D, F_i)
        # (D, 2F_i): stored transposed because streaming it this way is ~2x faster for the few
        # rows a decode step sends each expert (measured in docs/architecture.md).
        w13 = torch.cat([gate, up]).t().contiguous()
        b13, b2 = (None, None) if bias is None else (torch.cat(bias[:2]).contiguous(), bias[2])  # (2F_i,), (D,)
        pieces.append(ExpertPiece(w13, down.contiguous(), b13, b2 if shard.index == 0 else None))
    return LayerExperts.of_pieces(ids, pieces, parts)


# gate (F_i, D), up (F_i, D), down (D, F_i), and the biases (gate (F_i,), up (F_i,), down (D,)) or None
_Parts = tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]


def _read_per_expert(reader: CheckpointReader, cfg: ModelConfig, layer: int, e: int, shard: Shard,
                     dtype: torch.dtype, device: str) -> _Parts:
    shapes = expert_tensor_shapes(cfg, layer, e)
    gate_name, up_name, down_name = shapes
    cols = shard.columns(cfg.expert_intermediate_size)
    slices = {gate_name: (cols,), up_name: (cols,), down_name: (slice(None), cols)}
    t = reader.read(shapes, dtype=dtype, device=device, slices=slices if shard != WHOLE else None)
    return t[gate_name], t[up_name], t[down_name], None


def _read_fused(reader: CheckpointReader, cfg: ModelConfig, layer: int, e: int, shard: Shard,
                dtype: torch.dtype, device: str) -> _Parts:
    """Expert e's rows of the stacked tensors: gate rows [0, F), up rows [F, 2F) of gate_up_proj."""
    E, D, F = cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size
    p = f"model.layers.{layer}.{_PREFIX[cfg.family]}.experts"
    gate_up, down = {f"{p}.gate_up_proj": (E, 2 * F, D)}, {f"{p}.down_proj": (E, D, F)}
    cols, one = shard.columns(F), slice(e, e + 1)
    up_cols = slice(F + cols.start, F + cols.stop)
    gate = reader.read(gate_up, dtype, device, slices={f"{p}.gate_up_proj": (one, cols)})  # (1, F_i, D)
    up = reader.read(gate_up, dtype, device, slices={f"{p}.gate_up_proj": (one, up_cols)})  # (1, F_i, D)
    d = reader.read(down, dtype, device, slices={f"{p}.down_proj": (one, slice(None), cols)})  # (1, D, F_i)
    return gate[f"{p}.gate_up_proj"][0], up[f"{p}.gate_up_proj"][0], d[f"{p}.down_proj"][0], None


def _read_fused_transposed(reader: CheckpointReader, cfg: ModelConfig, layer: int, e: int, shard: Shard,
                           dtype: torch.dtype, device: str) -> _Parts:
    """Expert e's slices of GPT-OSS's stacked tensors: gate_up_proj (E, D, 2F) holds gate column f
    at 2f and up column f at 2f + 1, so a shard's columns [a, b) are the contiguous [2a, 2b)."""
    shapes = _fused_transposed_shapes(cfg, layer)
    gate_up, gate_up_bias, down, down_bias = shapes
    cols, one = shard.columns(cfg.expert_intermediate_size), slice(e, e + 1)
    pairs = slice(2 * cols.start, 2 * cols.stop)
    t = reader.read(shapes, dtype, device, slices={gate_up: (one, slice(None), pairs), gate_up_bias: (one, pairs),
                                                    down: (one, cols), down_bias: (one,)})
    w, b = t[gate_up][0], t[gate_up_bias][0]  # (D, 2F_i) interleaved, (2F_i,) interleaved
    gate, up = w[:, 0::2].t(), w[:, 1::2].t()  # (F_i, D) each
    return gate, up, t[down][0].t(), (b[0::2], b[1::2], t[down_bias][0])  # down (D, F_i)
