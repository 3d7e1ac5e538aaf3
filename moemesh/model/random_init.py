"""A model with random weights made directly in memory (no checkpoint on disk).

For sizes no test folder could hold, such as the paper's 4-layer model (16 experts of
d_model 8192 x hidden 32768: ~100 GB in fp16), measured on one GPU by `make gpu-check`.
Shape legend: V vocab, D hidden, H heads, G kv heads, Dh head dim, E experts, F expert hidden.
"""

from __future__ import annotations

import torch

from moemesh.model.config import ModelConfig
from moemesh.model.decoder import MoEModel, RuntimeShape
from moemesh.model.moe import (
    GroupedExperts,
    LocalTransport,
    MoELayer,
    Transport,
)
from moemesh.model.routers import SoftmaxTopKRouter
from moemesh.model.weights import (
    AttentionWeights,
    DenseWeights,
    LayerExperts,
    LayerWeights,
)


def random_model(
    cfg: ModelConfig, runtime: RuntimeShape, seed: int = 0, transport: Transport | None = None
) -> MoEModel:
    """Every expert local unless a transport is given; std 1/sqrt(fan_in) keeps activations O(1).
    Fan-in is given per tensor: the (out, in) Linear weights read it from their last dimension, the
    experts' w13 (E, D, 2F) is applied as x @ w13 (fan-in D) and w2 (E, D, F) as h @ w2.T (fan-in F)."""
    g = torch.Generator(device=runtime.device).manual_seed(seed)

    def w(shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
        t = torch.empty(shape, dtype=runtime.dtype, device=runtime.device)
        return t.normal_(0.0, fan_in**-0.5, generator=g)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=runtime.dtype, device=runtime.device)

    D, H, G, Dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    layers = tuple(
        LayerWeights(
            input_norm=ones(D), post_norm=ones(D),
            attn=AttentionWeights(wqkv=w(((H + 2 * G) * Dh, D), D), bqkv=None, wo=w((D, H * Dh), H * Dh), bo=None,
                                  q_norm=ones(Dh) if cfg.qk_norm else None, k_norm=ones(Dh) if cfg.qk_norm else None),
            router=w((cfg.num_experts, D), D), dense_w13=None, dense_w2=None,
        )
        for _ in range(cfg.num_layers)
    )
    embed = w((cfg.vocab_size, D), D)
    dense = DenseWeights(embed=embed, lm_head=w((cfg.vocab_size, D), D), final_norm=ones(D), layers=layers)
    F = cfg.expert_intermediate_size
    experts = {
        layer: LayerExperts.stacked(tuple(range(cfg.num_experts)), w((cfg.num_experts, D, 2 * F), D),
                                    w((cfg.num_experts, D, F), F))
        for layer in range(cfg.num_layers)
    }
    moe = MoELayer(SoftmaxTopKRouter(cfg.top_k, cfg.norm_topk_prob), transport or LocalTransport(cfg.num_experts),
                   GroupedExperts(experts))
    return MoEModel(cfg, dense, moe, runtime)


def paper_config(vocab: int = 32000) -> ModelConfig:
    """The paper's model: 4 layers, 16 experts (top-2), d_model 8192, expert hidden 32768,
    16 heads x 512. The paper does not give a vocabulary or top-k; 32000 and 2 are Mixtral's."""
    from moemesh.model.config import config_from_dict

    return config_from_dict({
        "architectures": ["MixtralForCausalLM"], "vocab_size": vocab, "hidden_size": 8192,
        "intermediate_size": 32768, "num_hidden_layers": 4, "num_attention_heads": 16, "num_key_value_heads": 16,
        "head_dim": 512, "num_local_experts": 16, "num_experts_per_tok": 2, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5, "eos_token_id": None, "dtype": "float16",
    }, source="paper")
