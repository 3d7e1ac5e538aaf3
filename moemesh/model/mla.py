"""Multi-head latent attention (DeepSeek-V2/V3) over a cache of compressed latents.

Shape legend: T tokens in a step, B decoding sequences, n one sequence's new tokens, S cache slots,
L cache length (max context), Lb longest decode context this step, D hidden, H heads,
C kv_lora_rank, Dn / Dr / Dv the nope / rope / value head dims, W = C + Dr the cache width.

The cache holds, per token and layer, W = C + Dr values: the latent c (after kv_a_layernorm) and
the rope'd key k_pe that every head shares. GQA's cache would hold 2 * H * Dh per token.

Two equal computations of the same attention (kv_b_proj split per head into W_UK (Dn, C) and
W_UV (Dv, C)):
- unabsorbed (the reference's; used for prefill): every cached latent is expanded into per-head
  keys k_nope[h] = W_UK[h] c and values v[h] = W_UV[h] c, then ordinary attention with the query
  (q_nope[h] | q_pe[h]) against (k_nope[h] | k_pe).
- absorbed (decode): q_nope[h] . (W_UK[h] c) = (W_UK[h]^T q_nope[h]) . c, so the query is folded
  into latent space once and attends to the cache as it is (one shared key/value "head" of width W;
  values are its first C columns); and sum_j p_j W_UV[h] c_j = W_UV[h] (sum_j p_j c_j), so the
  output is mixed in latent space and projected once per head. Nothing per position is expanded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moemesh.model.config import MLAShape, ModelConfig, Yarn
from moemesh.model.layers import AttentionPlan, Rope, Segment, rms_norm, yarn_mscale
from moemesh.model.weights import AttentionWeights, MLAWeights

# The reference builds q_a_layernorm and kv_a_layernorm with RMSNorm's default eps, not rms_norm_eps.
LORA_NORM_EPS = 1e-6


def softmax_scale(qk_head_dim: int, yarn: Yarn | None) -> float:
    """1/sqrt(Dn + Dr), times mscale(factor, mscale_all_dim)^2 under yarn (the reference's scaling)."""
    scale = qk_head_dim**-0.5
    if yarn is not None and yarn.mscale_all_dim:
        m = yarn_mscale(yarn.factor, yarn.mscale_all_dim)
        scale = scale * m * m
    return scale


class LatentCache:
    """Per layer one tensor (S, L, W): the latent c then the rope'd k_pe of every cached token."""

    def __init__(self, num_layers: int, slots: int, max_len: int, width: int, dtype: torch.dtype, device: str):
        self.latent = [torch.zeros((slots, max_len, width), dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len

    def values_per_token(self, layer: int) -> int:
        """Cached values per token in `layer`: kv_lora_rank + qk_rope_head_dim."""
        return int(self.latent[layer].shape[-1])

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.latent)


class LatentAttention:
    """The attention seam for DeepSeek-V3. `absorb_decode`: decode with the absorbed weights (the
    default); False runs decode unabsorbed too (the reference's computation, for tests)."""

    def __init__(self, cfg: ModelConfig, slots: int, max_len: int, dtype: torch.dtype, device: str,
                 absorb_decode: bool = True):
        assert cfg.mla is not None, "latent attention needs an MLA config"
        self.m: MLAShape = cfg.mla
        self.heads = cfg.num_heads
        self.cache = LatentCache(cfg.num_layers, slots, max_len, self.m.cache_width, dtype, device)
        self.rope = Rope(self.m.qk_rope_head_dim, cfg.rope_theta, max_len, dtype, device, cfg.yarn,
                         interleave=self.m.rope_interleave)
        self.scale = softmax_scale(self.m.qk_head_dim, cfg.yarn)
        self.absorb_decode = absorb_decode

    def __call__(self, x: torch.Tensor, w: AttentionWeights | MLAWeights, layer: int, plan: AttentionPlan
                 ) -> torch.Tensor:
        """x: (T, D) normed hidden states -> (T, D); writes this step's latents into the cache."""
        assert isinstance(w, MLAWeights), "latent attention needs MLA weights"
        m, H, T = self.m, self.heads, x.shape[0]
        q = self._queries(x, w).view(T, H, m.qk_head_dim)  # (T, H, Dn + Dr)
        q_nope, q_pe = q.split([m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)  # (T, H, Dn), (T, H, Dr)
        c, k_pe = F.linear(x, w.kv_a).split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)  # (T, C), (T, Dr)
        c = rms_norm(c, w.kv_a_norm, LORA_NORM_EPS)
        q_pe = self.rope.apply(q_pe, plan.positions)
        k_pe = self.rope.apply(k_pe.unsqueeze(1), plan.positions).squeeze(1)  # (T, Dr)
        cache = self.cache.latent[layer]
        cache[plan.slots, plan.positions] = torch.cat([c, k_pe], dim=-1)  # scatter (T, W) into (S, L, W)
        out = torch.empty(T, H, m.v_head_dim, dtype=x.dtype, device=x.device)  # (T, H, Dv)
        B = plan.num_decode
        if B:
            context = self._decode_context(cache, plan)  # (B, Lb, W)
            decode = self._absorbed if self.absorb_decode else self._unabsorbed
            out[:B] = decode(q_nope[:B], q_pe[:B], context, w, plan.decode_mask)
        for seg in plan.segments:
            rows = slice(seg.offset, seg.offset + seg.length)
            out[rows] = self._prefill(q_nope[rows], q_pe[rows], cache, w, seg)
        return F.linear(out.view(T, H * m.v_head_dim), w.wo)  # (T, D)

    def _queries(self, x: torch.Tensor, w: MLAWeights) -> torch.Tensor:
        if w.q_a is None:
            return F.linear(x, w.q_b)  # (T, H*(Dn+Dr))
        assert w.q_a_norm is not None, "q_a_proj comes with q_a_layernorm"
        return F.linear(rms_norm(F.linear(x, w.q_a), w.q_a_norm, LORA_NORM_EPS), w.q_b)  # (T, H*(Dn+Dr))

    @staticmethod
    def _decode_context(cache: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        if plan.decode_first_slot is not None:  # consecutive slots: a view, no copy
            return cache[plan.decode_first_slot : plan.decode_first_slot + plan.num_decode, : plan.decode_len]
        return cache[plan.decode_slots, : plan.decode_len]  # gather (B, Lb, W)

    def _absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, context: torch.Tensor, w: MLAWeights,
                  mask: torch.Tensor | None) -> torch.Tensor:
        """q_nope (B, H, Dn), q_pe (B, H, Dr), context (B, Lb, W) -> (B, H, Dv), never expanding the latents."""
        q_latent = torch.einsum("bhd,hdc->bhc", q_nope, w.w_uk)  # (B, H, C): W_UK folded into the query
        query = torch.cat([q_latent, q_pe], dim=-1).unsqueeze(2)  # (B, H, 1, W)
        keys = context.unsqueeze(1)  # (B, 1, Lb, W): one head shared by all H
        values = keys[..., : self.m.kv_lora_rank]  # (B, 1, Lb, C)
        o = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=self.scale,
                                           enable_gqa=True)  # (B, H, 1, C)
        return torch.einsum("bhc,hvc->bhv", o.squeeze(2), w.w_uv)  # (B, H, Dv): W_UV applied once per head

    def _unabsorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, context: torch.Tensor, w: MLAWeights,
                    mask: torch.Tensor | None) -> torch.Tensor:
        """The reference's computation: q_nope (B, H, Dn), q_pe (B, H, Dr), context (B, Lb, W) -> (B, H, Dv)."""
        keys, values = self._expand(context, w)  # (B, H, Lb, Dn + Dr), (B, H, Lb, Dv)
        query = torch.cat([q_nope, q_pe], dim=-1).unsqueeze(2)  # (B, H, 1, Dn + Dr)
        o = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=self.scale)  # (B, H, 1, Dv)
        return o.squeeze(2)

    def _prefill(self, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, w: MLAWeights,
                 seg: Segment) -> torch.Tensor:
        """q_nope (n, H, Dn), q_pe (n, H, Dr) of one sequence -> (n, H, Dv), causal over its context."""
        end = seg.start_pos + seg.length
        keys, values = self._expand(cache[seg.slot, :end].unsqueeze(0), w)  # (1, H, end, Dn+Dr), (1, H, end, Dv)
        query = torch.cat([q_nope, q_pe], dim=-1).transpose(0, 1).unsqueeze(0)  # (1, H, n, Dn + Dr)
        if seg.start_pos == 0:
            o = F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=self.scale)
        else:
            rows = torch.arange(seg.start_pos, end, device=q_nope.device)[:, None]  # (n, 1)
            cols = torch.arange(end, device=q_nope.device)[None, :]  # (1, end)
            o = F.scaled_dot_product_attention(query, keys, values, attn_mask=cols <= rows, scale=self.scale)
        return o.squeeze(0).transpose(0, 1)  # (n, H, Dv)

    def _expand(self, context: torch.Tensor, w: MLAWeights) -> tuple[torch.Tensor, torch.Tensor]:
        """context (B, L, W) -> per-head keys (B, H, L, Dn + Dr) and values (B, H, L, Dv)."""
        c, k_pe = context.split([self.m.kv_lora_rank, self.m.qk_rope_head_dim], dim=-1)  # (B, L, C), (B, L, Dr)
        k_nope = torch.einsum("blc,hdc->bhld", c, w.w_uk)  # (B, H, L, Dn)
        values = torch.einsum("blc,hvc->bhlv", c, w.w_uv)  # (B, H, L, Dv)
        k_pe = k_pe.unsqueeze(1).expand(-1, self.heads, -1, -1)  # (B, H, L, Dr)
        return torch.cat([k_nope, k_pe], dim=-1), values
