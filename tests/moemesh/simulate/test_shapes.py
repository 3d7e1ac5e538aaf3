"""moemesh.simulate.shapes: DeepSeek-V3's real sizes and MLA's weights, cache and FLOPs counted by
hand; from_config reads every family the model core reads."""

from __future__ import annotations

import pytest

from moemesh.errors import ConfigError
from moemesh.model.config import ARCHITECTURES, config_from_dict
from moemesh.model.tiny import TinySpec, hf_config
from moemesh.simulate.shapes import ModelShape, preset

DS = preset("deepseek-v3")


def test_deepseek_v3_preset_has_the_real_sizes():
    """deepseek-ai/DeepSeek-V3 inference/configs/config_671B.json: 61 layers, 3 dense, dim 7168,
    inter_dim 18432, 128 heads, 256 routed experts of 2048, 1 shared, top-8, 8 groups / 4."""
    assert (DS.layers, DS.moe_layer_ids, DS.dense_layers) == (61, tuple(range(3, 61)), 3)
    assert (DS.d_model, DS.dense_ff, DS.heads, DS.vocab, DS.dtype_bytes) == (7168, 18432, 128, 129280, 2)
    assert (DS.experts, DS.expert_ff, DS.shared_ff, DS.top_k) == (256, 2048, 2048, 8)
    assert DS.grouped is not None and (DS.grouped.n_group, DS.grouped.topk_group) == (8, 4)
    assert DS.mla is not None
    assert (DS.mla.q_lora_rank, DS.mla.kv_lora_rank, DS.mla.qk_nope_head_dim, DS.mla.qk_rope_head_dim,
            DS.mla.v_head_dim) == (1536, 512, 128, 64, 128)
    with pytest.raises(ConfigError):
        preset("deepseek-v4")


def test_mla_weights_and_cache_by_hand():
    """q_a 7168 x 1536 = 11,010,048; q_b 1536 x 128 x 192 = 37,748,736; kv_a 7168 x 576 = 4,128,768;
    kv_b 512 x 128 x 256 = 16,777,216; o 128 x 128 x 7168 = 117,440,512. Cache: 512 + 64 = 576
    values x 2 B per token per layer (128 heads x (192 + 128) x 2 B = 81,920 B expanded)."""
    assert DS.attn_params == 11_010_048 + 37_748_736 + 4_128_768 + 16_777_216 + 117_440_512
    assert DS.kv_bytes_per_token == 1152
    assert DS.shared_params == 3 * 7168 * 2048


def test_mla_flops_absorbed_for_decode_unabsorbed_for_prefill():
    """Per head and key: absorbed, scores over the cache (576) and a mix of latents (512): 2 x 1088
    FLOPs; unabsorbed, scores over 192 and a mix of 128: 2 x 320. Projections: 2 x weights."""
    proj = 2 * 187_105_280
    assert DS.attention_flops(1, 1000) == pytest.approx(proj + 128 * 2176 * 1000)
    assert DS.attention_flops(1, 1000, absorbed=False) == pytest.approx(proj + 128 * 640 * 1000)
    gqa = ModelShape(name="g", layers=1, moe_layer_ids=(0,), experts=4, top_k=2, d_model=64, heads=4, kv_heads=2,
                     head_dim=16, expert_ff=128, expert_matrices=3, dense_ff=0, vocab=0, dtype_bytes=4)
    # Q 64x64, K and V 64x32 each, O 64x64: 12,288 weights; per key, 4 heads x (2 x 16 + 2 x 16)
    assert gqa.attention_flops(2, 10) == gqa.attention_flops(2, 10, absorbed=False) == 2 * (2 * 12288 + 256 * 10)
    assert gqa.kv_bytes_per_token == 2 * 2 * 16 * 4


@pytest.mark.parametrize("family", list(ARCHITECTURES))
def test_from_config_reads_every_family(family):
    """A tiny checkpoint's config.json of each family: routed experts only are experts; shared
    experts, MLA, dense layers first and grouped routing carry over."""
    cfg = config_from_dict(hf_config(TinySpec(arch=family, layers=3, experts=8, top_k=2, shared_experts=1)))
    shape = ModelShape.from_config(cfg)
    assert (shape.experts, shape.top_k, shape.layers, shape.moe_layer_ids) == (8, 2, 3, cfg.moe_layer_ids)
    assert shape.expert_ff == cfg.expert_intermediate_size == 512
    assert shape.shared_ff == {"qwen2_moe": 512, "deepseek_v3": 512, "glm4_moe": 512}.get(family, 0)
    assert (shape.mla is not None) == (family == "deepseek_v3")
    assert (shape.grouped is not None) == (family in ("deepseek_v3", "glm4_moe"))
    assert shape.moe_layer_ids == ((1, 2) if family in ("deepseek_v3", "glm4_moe") else (0, 1, 2))
    if family == "deepseek_v3":  # the cache the model core keeps: latent + rope'd key
        assert shape.kv_bytes_per_token == cfg.mla.cache_width * 4
