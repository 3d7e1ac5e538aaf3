"""The model core against Hugging Face transformers (the reference), on real saved checkpoints."""

from __future__ import annotations

import pytest
import torch

from moemesh.engine.engine import Engine, generate
from moemesh.engine.sampling import SamplingParams
from moemesh.model.decoder import RuntimeShape, build_model
from moemesh.model.layers import Segment, build_attention_plan

CONFIGS = {
    "mixtral-top1-gqa-untied-single": dict(arch="mixtral", top_k=1, heads=4, kv_heads=2),
    "mixtral-top2-mha-tied-sharded": dict(arch="mixtral", top_k=2, heads=4, kv_heads=4, tie=True, shard_size="200KB"),
    "qwen3-top8-gqa-sharded": dict(arch="qwen3_moe", experts=16, top_k=8, heads=4, kv_heads=1, shard_size="300KB"),
    "qwen3-top2-norm-tied-dense-layer": dict(
        arch="qwen3_moe", layers=3, top_k=2, tie=True, norm_topk_prob=True, mlp_only_layers=[1]
    ),
    "qwen2-shared-gated-qkv-bias": dict(arch="qwen2_moe", top_k=2, heads=4, kv_heads=2, norm_topk_prob=True),
    "qwen2-top4-unnormalised-sharded": dict(arch="qwen2_moe", top_k=4, heads=4, kv_heads=1, shard_size="200KB"),
    "olmoe-full-qk-norm": dict(arch="olmoe", top_k=2, heads=4, kv_heads=2),
    "olmoe-top8-normalised-tied": dict(arch="olmoe", experts=16, top_k=8, heads=4, kv_heads=4, tie=True,
                                       norm_topk_prob=True),
    # 8 routed experts top-2 in 4 groups (2 kept), 1 shared expert, q_lora_rank set, first layer dense.
    "deepseek-v3-mla-grouped-shared": dict(arch="deepseek_v3", layers=3, top_k=2, heads=4, kv_heads=4),
    # GLM-4.5: partial rotary (half of each head), q/k/v biases, per-head q/k norms, grouped sigmoid
    # routing (2 groups, 1 kept), a shared expert, the first layer dense.
    "glm4-moe-partial-rotary-grouped": dict(arch="glm4_moe", layers=3, top_k=2, heads=4, kv_heads=2),
    "glm4-moe-one-group-top4": dict(arch="glm4_moe", layers=2, top_k=4, heads=4, kv_heads=1, n_group=1, topk_group=1,
                                    use_qk_norm=False, attention_bias=False),
    "deepseek-v3-plain-q-yarn-rotate-half": dict(
        arch="deepseek_v3", layers=3, top_k=3, heads=2, kv_heads=2, q_lora_rank=None, rope_interleave=False,
        n_group=2, topk_group=2, routed_scaling_factor=1.0, norm_topk_prob=False,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=128,
                             mscale=1.0, mscale_all_dim=0.707, beta_fast=32, beta_slow=1),
    ),
    # GPT-OSS: attention sinks, sliding (window 4, which the prompts and the 32 tokens cross) and
    # full layers alternating, biased q/k/v/o, router and experts, the reference's yarn (no truncation).
    "gpt-oss-sinks-sliding-full-sliding": dict(arch="gpt_oss", layers=3, top_k=2, heads=4, kv_heads=2),
    # A clamp that bites (limit 0.5: most gate and up values are clamped), full layer first, top-4, MHA, tied.
    "gpt-oss-tight-clamp-full-first-top4": dict(
        arch="gpt_oss", layers=2, top_k=4, heads=4, kv_heads=4, tie=True, swiglu_limit=0.5, swiglu_alpha=1.0,
        layer_types=["full_attention", "sliding_attention"], sliding_window=3,
    ),
}
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [100, 200, 250, 3, 4, 5, 6, 7, 8, 9, 10, 11, 290], [42]]


def _all_logits(model, prompts: list[list[int]]) -> list[torch.Tensor]:
    """One prefill step holding every prompt (a ragged batch); logits of every position."""
    segments, offset = [], 0
    for slot, p in enumerate(prompts):
        segments.append(Segment(slot=slot, offset=offset, length=len(p), start_pos=0))
        offset += len(p)
    plan = build_attention_plan([], [], segments, model.cfg.sliding_window, "cpu")
    tokens = torch.tensor([t for p in prompts for t in p])  # (T,)
    logits = model.forward(tokens, plan, torch.arange(offset))  # (T, V)
    assert logits.shape == (offset, model.cfg.vocab_size)
    return list(logits.split([len(p) for p in prompts]))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_greedy_match_transformers(hf_model, name):
    cfg = dict(CONFIGS[name])
    ckpt, ref = hf_model(cfg.pop("arch"), **cfg)
    model = build_model(ckpt, RuntimeShape(max_seqs=8, max_model_len=128))
    if "rope_parameters" in cfg:
        assert model.cfg.yarn is not None and model.cfg.yarn.factor == 4.0
    for ours, prompt in zip(_all_logits(model, PROMPTS), PROMPTS):
        with torch.no_grad():
            theirs = ref(torch.tensor([prompt])).logits[0]  # (n, V)
        rel = (ours - theirs).abs().max() / theirs.abs().max()
        assert rel <= 1e-4, f"relative logit error {rel:.2e}"

    outputs = generate(Engine(model), PROMPTS, SamplingParams(max_new_tokens=32))
    for out, prompt in zip(outputs, PROMPTS):
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, len(prompt):]
        assert out == expected.tolist()
        assert len(out) == 32


def test_bf16_checkpoint_is_computed_in_fp32(hf_model, tmp_path):
    _, ref = hf_model("mixtral")
    import transformers

    ref.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model = build_model(tmp_path / "bf16", RuntimeShape(max_seqs=2, max_model_len=64))
    assert model.dense.embed.dtype == torch.float32
    # A fresh reference in fp32 from the bf16 file (casting `ref` back would round its rope table).
    ref32 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = ref32(torch.tensor([PROMPTS[0]])).logits[0]
    ours = _all_logits(model, [PROMPTS[0]])[0]
    assert (ours - theirs).abs().max() / theirs.abs().max() <= 1e-4


def test_sliding_window_matches_transformers(hf_model):
    ckpt, ref = hf_model("mixtral", sliding_window=4)
    model = build_model(ckpt, RuntimeShape(max_seqs=4, max_model_len=64))
    assert model.cfg.sliding_window == 4
    out = generate(Engine(model), [PROMPTS[2]], SamplingParams(max_new_tokens=12))[0]
    expected = ref.generate(torch.tensor([PROMPTS[2]]), max_new_tokens=12, do_sample=False)[0, len(PROMPTS[2]):]
    assert out == expected.tolist()
