"""moemesh.model.weights: expert shards (tensor parallelism inside an expert) from a real checkpoint."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moemesh.model.checkpoint import CheckpointReader
from moemesh.model.config import load_config
from moemesh.model.shard import WHOLE, Shard
from moemesh.model.tiny import TinySpec, write_tiny_model
from moemesh.model.weights import LayerExperts, load_layer_experts, shard_weights

SPEC = TinySpec(layers=1, experts=4, hidden=32, intermediate=48, heads=4, kv_heads=2, vocab=300)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("weights") / "model", SPEC)


def _swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    gate, up = (x @ w13).chunk(2, dim=-1)  # (T, F_i) each
    return (F.silu(gate) * up) @ w2.t()  # (T, D)


@pytest.mark.parametrize("count", [2, 3, 4])
def test_shard_outputs_sum_to_the_whole_expert(ckpt, count):
    cfg = load_config(ckpt)
    whole = load_layer_experts(CheckpointReader(ckpt), cfg, 0, [1], torch.float64, "cpu")
    x = torch.randn(5, SPEC.hidden, dtype=torch.float64)  # (T, D)
    parts = [shard_weights(whole.w13[0], whole.w2[0], Shard(i, count)) for i in range(count)]
    assert {(a.shape, b.shape) for a, b in parts} == {((SPEC.hidden, 2 * SPEC.intermediate // count),
                                                        (SPEC.hidden, SPEC.intermediate // count))}
    total = sum(_swiglu(x, a, b) for a, b in parts)  # (T, D)
    torch.testing.assert_close(total, _swiglu(x, whole.w13[0], whole.w2[0]), rtol=1e-12, atol=1e-12)


def test_a_loaded_shard_equals_the_same_columns_cut_from_the_whole_expert(ckpt):
    cfg = load_config(ckpt)
    whole = load_layer_experts(CheckpointReader(ckpt), cfg, 0, [0, 3], torch.float32, "cpu")
    shards = (Shard(1, 2), Shard(2, 3))
    held = load_layer_experts(CheckpointReader(ckpt), cfg, 0, [0, 3], torch.float32, "cpu", shards)
    assert held.shards == shards and held.nbytes * 12 == whole.nbytes * 5  # (1/2 + 1/3) of two experts
    for i, shard in enumerate(shards):
        w13, w2 = shard_weights(whole.w13[i], whole.w2[i], shard)
        assert torch.equal(held.w13[i], w13) and torch.equal(held.w2[i], w2)


def test_piece_reuses_a_held_part_or_cuts_it_from_a_whole_expert(ckpt):
    cfg = load_config(ckpt)
    held = load_layer_experts(CheckpointReader(ckpt), cfg, 0, [0, 2], torch.float32, "cpu", (WHOLE, Shard(0, 2)))
    assert held.piece(2, Shard(0, 2))[0] is held.w13[1]  # the same tensor: nothing copied
    cut = held.piece(0, Shard(1, 4))
    assert torch.equal(cut[1], held.w2[0][:, 12:24])
    assert held.piece(2, Shard(1, 2)) is None and held.piece(1, WHOLE) is None  # needs the checkpoint


def test_stacked_whole_experts_are_views():
    w13, w2 = torch.randn(3, 4, 10), torch.randn(3, 4, 5)  # (E, D, 2F), (E, D, F)
    experts = LayerExperts.stacked((0, 1, 2), w13, w2)
    assert experts.shards == (WHOLE,) * 3 and experts.w13[1].data_ptr() == w13[1].data_ptr()


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen2_moe"])
def test_fused_gate_up_proj_layout_loads_like_per_expert_tensors(hf_model, tmp_path, arch):
    """A checkpoint saved in transformers' in-memory layout (experts stacked: gate_up_proj (E, 2F, D),
    down_proj (E, D, F)) loads into the same experts, whole and sharded, and the same logits."""
    import shutil

    from safetensors.torch import save_file

    from moemesh.model.decoder import RuntimeShape, build_model
    from moemesh.model.layers import Segment, build_attention_plan

    per_expert, ref = hf_model(arch, layers=2, heads=4, kv_heads=4)
    fused = tmp_path / "fused"
    fused.mkdir()
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    assert "model.layers.1.mlp.experts.gate_up_proj" in state
    save_file(state, str(fused / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(per_expert / "config.json", fused / "config.json")
    cfg = load_config(per_expert)
    for shard in (WHOLE, Shard(1, 2)):
        a = load_layer_experts(CheckpointReader(per_expert), cfg, 1, [5, 2], torch.float32, "cpu", [shard] * 2)
        b = load_layer_experts(CheckpointReader(fused), cfg, 1, [5, 2], torch.float32, "cpu", [shard] * 2)
        assert all(torch.equal(x, y) for x, y in zip(a.w13 + a.w2, b.w13 + b.w2))
    prompt = [5, 6, 7, 8]
    plan = build_attention_plan([], [], [Segment(0, 0, len(prompt), 0)], None, "cpu")
    logits = [build_model(d, RuntimeShape(max_seqs=1, max_model_len=16)).forward(
        torch.tensor(prompt), plan, torch.arange(len(prompt))) for d in (per_expert, fused)]
    # Equal experts (above); the logits within rounding (two models' buffers are aligned differently).
    assert (logits[0] - logits[1]).abs().max() / logits[1].abs().max() <= 1e-6
