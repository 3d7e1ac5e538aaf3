"""Dense building blocks: RMSNorm, rotary embeddings, grouped-query attention over a KV cache.

Shape legend: T tokens in a step (all sequences flattened), B decoding sequences, S cache slots,
L cache length (max context), D hidden, H query heads, G key/value heads, Dh head dim.

Numerics follow Hugging Face's implementations (fp32 norm statistics, RoPE angles computed in
fp32, softmax attention via SDPA; with attention sinks (GPT-OSS) the reference's explicit softmax,
a learned per-head logit joining each row's denominator). A layer attends to a sliding window or
to the whole context as the config says for that layer (`ModelConfig.window`).

The attention kind is a seam: `GroupedQueryAttention` here, `LatentAttention` (moemesh.model.mla)
for DeepSeek-V3; each owns its cache, whose per-layer shape is its own (K/V heads here, one
compressed latent there). The decoder picks one at build time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moemesh.model.config import ModelConfig, Yarn
from moemesh.model.weights import AttentionWeights, MLAWeights


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: (..., N), weight: (N,) -> (..., N), statistics in fp32."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


class Rope:
    """Precomputed rotary tables for positions 0..max_positions-1 (HF "default" or "yarn" rope).

    `interleave`: rotate interleaved pairs (x0, x1), (x2, x3), ... and write the result in
    rotate-half layout, as DeepSeek's reference does (the same for queries and keys, so their
    dot products are the pairs' dot products).
    """

    def __init__(self, head_dim: int, theta: float, max_positions: int, dtype: torch.dtype, device: str,
                 yarn: Yarn | None = None, interleave: bool = False, rotary_dim: int = 0):
        self.rotary_dim = rotary_dim if 0 < rotary_dim < head_dim else 0  # 0: the whole head rotates
        head_dim = self.rotary_dim or head_dim  # the tables cover the rotated dims only
        if yarn is None:
            inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
            scaling = 1.0
        else:
            inv_freq, scaling = yarn_inv_freq(head_dim, theta, yarn)
        pos = torch.arange(max_positions, dtype=torch.float32)
        freqs = pos[:, None] * inv_freq[None, :]  # (L, Dh/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (L, Dh)
        self.cos = (emb.cos() * scaling).to(dtype=dtype, device=device)  # (L, Dh)
        self.sin = (emb.sin() * scaling).to(dtype=dtype, device=device)  # (L, Dh)
        self.interleave = interleave

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: (T, heads, Dh), positions: (T,) int64 -> rotated (T, heads, Dh)."""
        if self.rotary_dim:  # partial rotary: the first rotary_dim dims rotate, the rest pass
            rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]  # (T, heads, Dr), (T, heads, Dh - Dr)
            return torch.cat([self._rotate(rot, positions), rest], dim=-1)
        return self._rotate(x, positions)

    def _rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos = self.cos[positions].unsqueeze(1)  # (T, 1, Dh)
        sin = self.sin[positions].unsqueeze(1)  # (T, 1, Dh)
        half = x.shape[-1] // 2
        if self.interleave:
            cos, sin = cos[..., :half], sin[..., :half]  # (T, 1, Dh/2): one angle per pair
            x1, x2 = x[..., 0::2], x[..., 1::2]  # (T, heads, Dh/2) each
            return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)  # (T, heads, Dh)
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # (T, heads, Dh)
        return x * cos + rotated * sin


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_inv_freq(dim: int, base: float, yarn: Yarn) -> tuple[torch.Tensor, float]:
    """(Dh/2,) inverse frequencies and the cos/sin scaling, as transformers' _compute_yarn_parameters."""
    factor = yarn.factor
    attention_factor = yarn.attention_factor
    if attention_factor is None:
        if yarn.mscale and yarn.mscale_all_dim:
            attention_factor = yarn_mscale(factor, yarn.mscale) / yarn_mscale(factor, yarn.mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        original = yarn.original_max_position_embeddings
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the reference's guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)  # (Dh/2,)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)  # (Dh/2,)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


@dataclass(frozen=True)
class Segment:
    """One prefilling sequence's tokens inside the step: rows [offset, offset + length) of T."""

    slot: int
    offset: int
    length: int
    start_pos: int  # position of the first token (0 unless the cache already holds a prefix)


@dataclass(frozen=True)
class AttentionPlan:
    """How the T tokens of a step map onto cache slots.

    Decode tokens come first: rows [0, B) are one token each of the sequences in `decode_slots`;
    prefill segments follow. Built once per step, shared by every layer.
    """

    positions: torch.Tensor  # (T,) int64: position of each token
    slots: torch.Tensor  # (T,) int64: cache slot of each token
    decode_slots: torch.Tensor  # (B,) int64
    decode_mask: torch.Tensor | None  # (B, 1, 1, Lb) bool: True = attend; None when B == 0
    decode_len: int  # Lb: longest decode context this step
    segments: tuple[Segment, ...]
    decode_first_slot: int | None = None  # set when decode_slots are consecutive ascending
    window: int | None = None  # the sliding window decode_mask applies (None: full causal)
    decode_full_mask: torch.Tensor | None = None  # (B, 1, 1, Lb) without the window; set when window is

    def decode_mask_for(self, window: int | None) -> torch.Tensor | None:
        """The decode mask of a layer attending to `window` (None: the whole context)."""
        if window is None and self.window is not None:
            return self.decode_full_mask
        assert window == self.window or self.num_decode == 0, "the plan was built for another sliding window"
        return self.decode_mask

    @property
    def num_decode(self) -> int:
        return int(self.decode_slots.shape[0])


def build_attention_plan(
    decode_slots: list[int],
    decode_positions: list[int],
    segments: list[Segment],
    sliding_window: int | None,
    device: str,
) -> AttentionPlan:
    """Decode token i sits at decode_positions[i] (its context is positions 0..that one)."""
    positions = list(decode_positions)
    slots = list(decode_slots)
    for seg in segments:
        positions.extend(range(seg.start_pos, seg.start_pos + seg.length))
        slots.extend([seg.slot] * seg.length)
    mask, full_mask, longest = None, None, 0
    if decode_slots:
        lengths = torch.tensor(decode_positions, dtype=torch.int64) + 1  # (B,)
        longest = int(lengths.max())
        cols = torch.arange(longest)  # (Lb,)
        keep = cols[None, :] < lengths[:, None]  # (B, Lb)
        if sliding_window is not None:
            full_mask = keep[:, None, None, :].to(device)  # (B, 1, 1, Lb) for full-attention layers
            keep = keep & (cols[None, :] > (lengths[:, None] - 1 - sliding_window))
        mask = keep[:, None, None, :].to(device)  # (B, 1, 1, Lb)
    return AttentionPlan(
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        slots=torch.tensor(slots, dtype=torch.int64, device=device),
        decode_slots=torch.tensor(decode_slots, dtype=torch.int64, device=device),
        decode_mask=mask,
        decode_len=longest,
        segments=tuple(segments),
        decode_first_slot=_consecutive_start(decode_slots),
        window=sliding_window,
        decode_full_mask=full_mask,
    )


def _consecutive_start(slots: list[int]) -> int | None:
    if slots and slots == list(range(slots[0], slots[0] + len(slots))):
        return slots[0]
    return None


class KVCache:
    """Per layer key and value tensors (S, G, L, Dh), one slot per running sequence."""

    def values_per_token(self, layer: int) -> int:
        """Cached values per token in `layer`: K and V of every key/value head."""
        return 2 * self.k[layer].shape[1] * self.k[layer].shape[3]

    def __init__(self, num_layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: str):
        shape = (slots, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k) + sum(t.nbytes for t in self.v)


class GroupedQueryAttention:
    """The attention seam for Mixtral, Qwen and OLMoE: H query heads over G cached K/V heads."""

    def __init__(self, cfg: ModelConfig, slots: int, max_len: int, dtype: torch.dtype, device: str):
        self.cache = KVCache(cfg.num_layers, slots, cfg.num_kv_heads, max_len, cfg.head_dim, dtype, device)
        self.rope = Rope(cfg.head_dim, cfg.rope_theta, max_len, dtype, device, cfg.yarn, rotary_dim=cfg.rotary_dim)
        self.shape = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        self.eps = cfg.rms_norm_eps
        self.windows = tuple(cfg.window(i) for i in range(cfg.num_layers))

    def __call__(self, x: torch.Tensor, w: AttentionWeights | MLAWeights, layer: int, plan: AttentionPlan
                 ) -> torch.Tensor:
        assert isinstance(w, AttentionWeights), "grouped-query attention needs q/k/v weights"
        return attention(x, w, layer, self.cache, plan, self.rope, self.shape, self.eps, self.windows[layer])


def attention(
    x: torch.Tensor,
    w: AttentionWeights,
    layer: int,
    cache: KVCache,
    plan: AttentionPlan,
    rope: Rope,
    shape: tuple[int, int, int],
    eps: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """x: (T, D) normed hidden states -> (T, D) attention output; writes this step's K/V."""
    H, G, Dh = shape
    T = x.shape[0]
    qkv = F.linear(x, w.wqkv, w.bqkv)  # (T, (H + 2G) * Dh)
    if w.q_norm is None:  # no norm between projection and rope: q and k heads rotate together
        qk = rope.apply(qkv[:, : (H + G) * Dh].view(T, H + G, Dh), plan.positions)  # (T, H + G, Dh)
        q, k = qk[:, :H], qk[:, H:]  # (T, H, Dh), (T, G, Dh)
    else:
        q, k = _normed_heads(qkv, w, shape, eps)
        q = rope.apply(q, plan.positions)
        k = rope.apply(k, plan.positions)
    v = qkv[:, (H + G) * Dh :].view(T, G, Dh)  # (T, G, Dh)
    kc, vc = cache.k[layer], cache.v[layer]
    kc[plan.slots, :, plan.positions] = k  # scatter (T, G, Dh) into (S, G, L, Dh)
    vc[plan.slots, :, plan.positions] = v
    B = plan.num_decode
    if B == T:  # decode only: its result is the whole output
        out = _decode_attention(q, kc, vc, plan, plan.decode_mask_for(sliding_window), w.sinks)  # (T, H, Dh)
    else:
        out = torch.empty(T, H, Dh, dtype=x.dtype, device=x.device)  # (T, H, Dh)
        if B:
            out[:B] = _decode_attention(q[:B], kc, vc, plan, plan.decode_mask_for(sliding_window), w.sinks)
        for seg in plan.segments:
            rows = slice(seg.offset, seg.offset + seg.length)
            out[rows] = _prefill_attention(q[rows], kc, vc, seg, sliding_window, w.sinks)
    return F.linear(out.reshape(T, H * Dh), w.wo, w.bo)  # (T, D)


def _normed_heads(qkv: torch.Tensor, w: AttentionWeights, shape: tuple[int, int, int], eps: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv: (T, (H + 2G) * Dh) -> q (T, H, Dh), k (T, G, Dh) after q_norm / k_norm: over the whole
    projection (OLMoE) or per head (Qwen3)."""
    H, G, Dh = shape
    T = qkv.shape[0]
    q, k = qkv[:, : H * Dh], qkv[:, H * Dh : (H + G) * Dh]
    assert w.q_norm is not None and w.k_norm is not None, "q_norm and k_norm come together"
    if w.q_norm.shape[0] == H * Dh != Dh:  # OLMoE: over the whole projection, before the split into heads
        return rms_norm(q, w.q_norm, eps).view(T, H, Dh), rms_norm(k, w.k_norm, eps).view(T, G, Dh)
    return rms_norm(q.reshape(T, H, Dh), w.q_norm, eps), rms_norm(k.reshape(T, G, Dh), w.k_norm, eps)


def _decode_attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, plan: AttentionPlan,
                      mask: torch.Tensor | None, sinks: torch.Tensor | None) -> torch.Tensor:
    """q: (B, H, Dh) one token per sequence -> (B, H, Dh); mask (B, 1, 1, Lb)."""
    if plan.decode_first_slot is not None:  # slots a..a+B-1 in order: a view, no copy
        rows = slice(plan.decode_first_slot, plan.decode_first_slot + plan.num_decode)
        keys = kc[rows, :, : plan.decode_len]  # (B, G, Lb, Dh)
        values = vc[rows, :, : plan.decode_len]  # (B, G, Lb, Dh)
    else:
        keys = kc[plan.decode_slots, :, : plan.decode_len]  # gather (B, G, Lb, Dh)
        values = vc[plan.decode_slots, :, : plan.decode_len]  # gather (B, G, Lb, Dh)
    o = _attend(q.unsqueeze(2), keys, values, mask, sinks)  # (B, H, 1, Dh)
    return o.squeeze(2)


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
            sinks: torch.Tensor | None) -> torch.Tensor:
    """q (B, H, n, Dh), keys and values (B, G, L, Dh), mask (B or 1, 1, n or 1, L) bool (True =
    attend; None = every key) -> (B, H, n, Dh), scaled by Dh^-0.5. Without sinks: SDPA. With sinks
    (H,): the reference's eager computation, the sink a last column of each row's logits that is
    dropped after the softmax."""
    if sinks is None:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
    B, H, n, Dh = q.shape
    repeat = H // keys.shape[1]
    keys = keys.repeat_interleave(repeat, dim=1)  # (B, H, L, Dh): query head h reads key head h // repeat
    values = values.repeat_interleave(repeat, dim=1)  # (B, H, L, Dh)
    logits = torch.matmul(q, keys.transpose(2, 3)) * Dh**-0.5  # (B, H, n, L)
    if mask is not None:
        logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    sink = sinks.view(1, H, 1, 1).expand(B, H, n, 1).to(logits.dtype)  # (B, H, n, 1)
    combined = torch.cat([logits, sink], dim=-1)  # (B, H, n, L + 1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    probs = torch.softmax(combined, dim=-1)[..., :-1]  # (B, H, n, L): the sink's share dropped
    return torch.matmul(probs.to(values.dtype), values)


def _prefill_attention(
    q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, seg: Segment, sliding_window: int | None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: (n, H, Dh) one sequence's new tokens -> (n, H, Dh), causal over its cached context."""
    end = seg.start_pos + seg.length
    keys = kc[seg.slot, :, :end].unsqueeze(0)  # (1, G, end, Dh)
    values = vc[seg.slot, :, :end].unsqueeze(0)  # (1, G, end, Dh)
    qh = q.transpose(0, 1).unsqueeze(0)  # (1, H, n, Dh)
    if seg.start_pos == 0 and sliding_window is None and sinks is None:
        o = F.scaled_dot_product_attention(qh, keys, values, is_causal=True, enable_gqa=True)
    else:
        rows = torch.arange(seg.start_pos, end, device=q.device)[:, None]  # (n, 1)
        cols = torch.arange(end, device=q.device)[None, :]  # (1, end)
        keep = cols <= rows
        if sliding_window is not None:
            keep &= cols > rows - sliding_window
        o = _attend(qh, keys, values, keep, sinks)  # (1, H, n, Dh)
    return o.squeeze(0).transpose(0, 1)  # (n, H, Dh)
