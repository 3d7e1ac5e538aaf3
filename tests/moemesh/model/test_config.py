"""moemesh.model.config: DeepSeek-V3's real config.json read into its sizes; yarn as the reference computes it."""

from __future__ import annotations

import pytest
import torch

from moemesh.errors import ConfigError
from moemesh.model.config import config_from_dict
from moemesh.model.layers import Rope
from moemesh.model.mla import softmax_scale

# deepseek-ai/DeepSeek-V3's config.json (the fields the model core reads; quantization_config left out).
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 7168,
    "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 163840, "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
    "topk_group": 4, "v_head_dim": 128, "vocab_size": 129280, "first_k_dense_replace": 3, "hidden_act": "silu",
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 0, "eos_token_id": 1,
}


def test_deepseek_v3_real_config():
    cfg = config_from_dict(DEEPSEEK_V3)
    assert cfg.family == "deepseek_v3" and cfg.num_experts == 256 and cfg.top_k == 8
    assert cfg.moe_layer_ids == tuple(range(3, 61)), "3 dense layers first, then 58 MoE layers"
    assert cfg.shared_intermediate_size == 2048 and not cfg.shared_expert_gate
    assert cfg.grouped_routing is not None and (cfg.grouped_routing.n_group, cfg.grouped_routing.topk_group) == (8, 4)
    assert cfg.mla is not None and cfg.mla.cache_width == 576 and cfg.mla.qk_head_dim == 192
    assert cfg.yarn is not None and cfg.yarn.factor == 40 and cfg.yarn.original_max_position_embeddings == 4096


def test_yarn_tables_and_softmax_scale_equal_the_reference():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    small = {**DEEPSEEK_V3, "num_hidden_layers": 1, "hidden_size": 64, "num_attention_heads": 2,
             "num_key_value_heads": 2, "vocab_size": 300, "n_routed_experts": 8, "n_group": 4, "topk_group": 2,
             "num_experts_per_tok": 2, "kv_lora_rank": 16, "q_lora_rank": 16, "qk_nope_head_dim": 16,
             "qk_rope_head_dim": 8, "v_head_dim": 8, "intermediate_size": 32, "moe_intermediate_size": 16,
             "rope_scaling": {**DEEPSEEK_V3["rope_scaling"], "mscale_all_dim": 0.707}}
    ref_cfg = transformers.DeepseekV3Config(**small)
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](ref_cfg, "cpu")
    ours = config_from_dict(small)
    assert ours.yarn is not None and ours.mla is not None
    rope = Rope(ours.mla.qk_rope_head_dim, ours.rope_theta, 64, torch.float32, "cpu", ours.yarn)
    positions = torch.arange(64, dtype=torch.float32)[:, None] * inv_freq[None, :]  # (L, Dr/2)
    want = torch.cat([positions, positions], dim=-1).cos() * attention_factor  # (L, Dr)
    assert torch.allclose(rope.cos, want, rtol=0, atol=1e-6)
    assert softmax_scale(ours.mla.qk_head_dim, ours.yarn) == pytest.approx(DeepseekV3Attention(ref_cfg, 0).scaling)
    assert softmax_scale(ours.mla.qk_head_dim, ours.yarn) != ours.mla.qk_head_dim ** -0.5


@pytest.mark.parametrize("change, message", [
    ({"n_group": 3}, "groups must split"),
    ({"topk_group": 9}, "groups must split"),
    ({"scoring_func": "softmax"}, "sigmoid"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantized"),
    ({"rope_scaling": {"type": "llama3", "factor": 8}}, "unsupported"),
])
def test_unsupported_deepseek_configs_are_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({**DEEPSEEK_V3, **change})


# openai/gpt-oss-20b's config.json (its quantization_config, mxfp4, is tested apart).
GPT_OSS_20B = {
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "eos_token_id": 200002, "head_dim": 64,
    "hidden_act": "silu", "hidden_size": 2880, "initial_context_length": 4096, "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12, "max_position_embeddings": 131072,
    "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 24,
    "num_key_value_heads": 8, "num_local_experts": 32, "pad_token_id": 199999, "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000, "sliding_window": 128, "swiglu_limit": 7.0, "tie_word_embeddings": False,
    "vocab_size": 201088,
}


def test_gpt_oss_real_config():
    from moemesh.model.config import ClampedSwiGLU

    cfg = config_from_dict(GPT_OSS_20B)
    assert cfg.family == "gpt_oss" and (cfg.num_experts, cfg.top_k, cfg.expert_intermediate_size) == (32, 4, 2880)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size) == (64, 8, 64, 2880)
    assert cfg.moe_layer_ids == tuple(range(24)) and cfg.shared_intermediate_size == 0
    assert cfg.full_attention_layers == tuple(range(1, 24, 2)) and cfg.sliding_window == 128
    assert [cfg.window(i) for i in range(3)] == [128, None, 128]
    assert cfg.attention_sinks and cfg.router_bias and cfg.attention_bias and cfg.o_bias
    assert cfg.clamped_swiglu == ClampedSwiGLU(alpha=1.702, limit=7.0) and cfg.rope_theta == 150000
    assert cfg.yarn is not None and cfg.yarn.factor == 32 and cfg.yarn.truncate is False
    assert cfg.eos_token_ids == (200002,)
    with pytest.raises(ConfigError, match="quantized"):
        config_from_dict({**GPT_OSS_20B, "quantization_config": {"quant_method": "mxfp4"}})
    with pytest.raises(ConfigError, match="layer_types"):
        config_from_dict({**GPT_OSS_20B, "layer_types": ["sliding_attention"] * 23})


def test_gpt_oss_yarn_tables_equal_the_reference():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    small = {**GPT_OSS_20B, "num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"],
             "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 300,
             "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 32}
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](transformers.GptOssConfig(**small), "cpu")
    ours = config_from_dict(small)
    rope = Rope(ours.head_dim, ours.rope_theta, 64, torch.float32, "cpu", ours.yarn)
    positions = torch.arange(64, dtype=torch.float32)[:, None] * inv_freq[None, :]  # (L, Dh/2)
    want = torch.cat([positions, positions], dim=-1).cos() * attention_factor  # (L, Dh)
    assert attention_factor != 1.0
    assert torch.allclose(rope.cos, want, rtol=0, atol=1e-6)
