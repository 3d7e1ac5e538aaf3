"""Shared fixtures: real checkpoints written to temp folders by Hugging Face transformers.

transformers is the reference implementation; checkpoints it saves are the real hub layout.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from moemesh.launcher import UpProcess

# One torch thread per test process: these machines have 2 cores and tests run beside workers.
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def save_hf_model(
    out: Path,
    arch: str,
    *,
    layers: int = 2,
    experts: int = 8,
    top_k: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 96,
    vocab: int = 300,
    tie: bool = False,
    shard_size: str | None = None,
    seed: int = 0,
    **extra,
):
    """Random-initialise a transformers MoE model with weights large enough to route unevenly,
    save it to `out` (sharded when `shard_size` is set) and return the model (fp32, eval)."""
    import transformers

    common = dict(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, num_experts_per_tok=top_k, tie_word_embeddings=tie,
        eos_token_id=None, bos_token_id=None, max_position_embeddings=512,
    )
    if arch == "mixtral":
        cfg = transformers.MixtralConfig(num_local_experts=experts, intermediate_size=intermediate, **common, **extra)
        cls = transformers.MixtralForCausalLM
    elif arch == "olmoe":
        cfg = transformers.OlmoeConfig(num_experts=experts, intermediate_size=intermediate, **common, **extra)
        cls = transformers.OlmoeForCausalLM
    elif arch == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(
            num_experts=experts, moe_intermediate_size=intermediate, intermediate_size=2 * intermediate,
            shared_expert_intermediate_size=intermediate, **common, **extra,
        )
        cls = transformers.Qwen2MoeForCausalLM
    elif arch == "deepseek_v3":
        mla = dict(q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12,
                   n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5)
        cfg = transformers.DeepseekV3Config(
            n_routed_experts=experts, moe_intermediate_size=intermediate, intermediate_size=2 * intermediate,
            **{**common, **mla, **extra},
        )
        cls = transformers.DeepseekV3ForCausalLM
    elif arch == "glm4_moe":
        glm = dict(n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=1.5,
                   use_qk_norm=True, attention_bias=True, head_dim=hidden // heads)
        cfg = transformers.Glm4MoeConfig(
            n_routed_experts=experts, moe_intermediate_size=intermediate, intermediate_size=2 * intermediate,
            **{**common, **glm, **extra},
        )
        cls = transformers.Glm4MoeForCausalLM
    elif arch == "gpt_oss":
        # Sliding and full layers alternate; a window of 4 that the test prompts cross; the
        # reference's default yarn rope (factor 32, no truncation).
        oss = dict(sliding_window=4, head_dim=hidden // heads)
        cfg = transformers.GptOssConfig(
            num_local_experts=experts, intermediate_size=intermediate, **{**common, **oss, **extra},
        )
        cls = transformers.GptOssForCausalLM
    else:
        cfg = transformers.Qwen3MoeConfig(
            num_experts=experts, moe_intermediate_size=intermediate, intermediate_size=2 * intermediate,
            **common, **extra,
        )
        cls = transformers.Qwen3MoeForCausalLM
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.25)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # a real checkpoint's bias is not zero
                b.normal_(0.0, 0.1)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(out, **kwargs)
    return model


@pytest.fixture
def hf_model(tmp_path: Path) -> Callable[..., tuple[Path, object]]:
    """Factory: hf_model(arch, **config) -> (checkpoint dir, transformers model)."""

    def make(arch: str, **kwargs):
        out = tmp_path / f"{arch}-ckpt"
        model = save_hf_model(out, arch, **kwargs)
        return out, model

    return make


# `moemesh up` as a real subprocess, ready once its ready line is read; stop() sends SIGINT and
# returns the processes that survived (should be none).
RunningMesh = UpProcess


@pytest.fixture(scope="module")
def mesh_factory():
    """Start meshes for a test module; every one is stopped (and checked) at the end."""
    started: list[RunningMesh] = []

    def start(model: Path, workers: int, *extra: str) -> RunningMesh:
        mesh = RunningMesh(model, workers, extra)
        started.append(mesh)
        return mesh

    yield start
    for mesh in started:
        if mesh.proc.poll() is None:
            assert mesh.stop() == []
