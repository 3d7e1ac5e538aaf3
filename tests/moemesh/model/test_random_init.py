"""The in-memory random model: every weight's std is 1/sqrt(its fan-in), and it runs."""

from __future__ import annotations

from dataclasses import replace

import torch

from moemesh.model.decoder import RuntimeShape
from moemesh.model.random_init import paper_config, random_model


def small():
    # D 64, 2F 512: a w13 scaled by 1/sqrt(2F) (the old mistake) has std x sqrt(D) = 0.35, not 1
    return replace(paper_config(vocab=256), hidden_size=64, expert_intermediate_size=256, head_dim=16, num_heads=4,
                   num_kv_heads=2)


def test_every_weight_has_std_one_over_sqrt_fan_in():
    cfg = small()
    model = random_model(cfg, RuntimeShape(max_seqs=2, max_model_len=16))
    D, F, H, Dh = cfg.hidden_size, cfg.expert_intermediate_size, cfg.num_heads, cfg.head_dim
    layer = model.dense.layers[0]
    experts = model.moe.experts.layers[0]
    fan_in = {
        "wqkv": (layer.attn.wqkv, D), "wo": (layer.attn.wo, H * Dh), "router": (layer.router, D),
        "embed": (model.dense.embed, D), "lm_head": (model.dense.lm_head, D),
        "w13 (x @ w13: fan-in D, not 2F)": (torch.stack(experts.w13), D),
        "w2 (h @ w2.T: fan-in F)": (torch.stack(experts.w2), F),
    }
    for name, (t, n) in fan_in.items():
        ratio = float(t.float().std()) * n**0.5
        assert abs(ratio - 1) < 0.05, f"{name}: std x sqrt(fan_in) = {ratio:.3f}"


def test_activations_stay_order_one_through_an_expert():
    cfg = small()
    model = random_model(cfg, RuntimeShape(max_seqs=2, max_model_len=16))
    experts = model.moe.experts.layers[0]
    x = torch.randn(512, cfg.hidden_size, generator=torch.Generator().manual_seed(0))  # (T, D)
    gate_up = x @ experts.w13[0]  # (T, 2F)
    assert 0.8 < float(gate_up.std()) < 1.25  # fan-in D: unit variance in, unit variance out
