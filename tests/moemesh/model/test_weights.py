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


class _SliceRecorder(CheckpointReader):
    """A real reader that also notes which slice of each tensor it was asked for."""

    def __init__(self, model_dir):
        super().__init__(model_dir)
        self.asked: list[tuple[str, tuple[slice, ...] | None]] = []

    def read(self, expected, dtype=torch.float32, device="cpu", slices=None):
        self.asked += [(name, (slices or {}).get(name)) for name in expected]
        return super().read(expected, dtype, device, slices)


def test_gpt_oss_experts_load_only_their_slices_with_biases_and_compute_like_the_reference(hf_model):
    """GPT-OSS's stacked layout (gate_up_proj (E, D, 2F) with gate/up columns interleaved,
    down_proj (E, F, D), both biased): a worker reads only its experts' slices (a shard: only its
    columns), de-interleaved into w13; the biases travel in LayerExperts (the down bias on shard 0
    only); the pieces' outputs sum to the reference expert's output."""
    from moemesh.model.activations import expert_activation
    from moemesh.model.config import ClampedSwiGLU
    from moemesh.model.moe import ExpertBatch, GroupedExperts

    ckpt, ref = hf_model("gpt_oss", layers=2, experts=8, intermediate=96, swiglu_limit=1.0)
    cfg = load_config(ckpt)
    assert cfg.clamped_swiglu == ClampedSwiGLU(alpha=1.702, limit=1.0)
    reader = _SliceRecorder(ckpt)
    whole = load_layer_experts(reader, cfg, 1, [5, 2], torch.float32, "cpu")
    p = "model.layers.1.mlp.experts"
    assert {name for name, _ in reader.asked} == {f"{p}.gate_up_proj", f"{p}.gate_up_proj_bias", f"{p}.down_proj",
                                                  f"{p}.down_proj_bias"}
    assert all(s is not None and s[0] in (slice(5, 6), slice(2, 3)) for _, s in reader.asked)  # one expert each
    experts = ref.model.layers[1].mlp.experts
    for i, e in enumerate((5, 2)):
        gate_up, bias = experts.gate_up_proj[e].detach(), experts.gate_up_proj_bias[e].detach()  # (D, 2F), (2F,)
        assert torch.equal(whole.w13[i], torch.cat([gate_up[:, 0::2], gate_up[:, 1::2]], dim=1))
        assert torch.equal(whole.b13[i], torch.cat([bias[0::2], bias[1::2]]))
        assert torch.equal(whole.w2[i], experts.down_proj[e].detach().t())
        assert torch.equal(whole.b2[i], experts.down_proj_bias[e].detach())

    shards = (Shard(0, 2), Shard(1, 2))
    halves = [load_layer_experts(reader, cfg, 1, [5], torch.float32, "cpu", [s]) for s in shards]
    assert reader.asked[-4][1] == (slice(5, 6), slice(None), slice(96, 192))  # shard 1: gate/up pairs 48..95
    assert halves[0].b2[0] is not None and halves[1].b2[0] is None  # the down bias is added once
    for half, shard in zip(halves, shards):
        cut = whole.piece(5, shard)
        assert cut is not None and torch.equal(cut.w13, half.w13[0]) and torch.equal(cut.b13, half.b13[0])
        assert (cut.b2 is None) == (half.b2[0] is None)

    x = torch.randn(6, cfg.hidden_size)  # (T, D)
    act = expert_activation(cfg.clamped_swiglu)
    ours = GroupedExperts({1: whole}, act)(1, ExpertBatch(x=x, counts=[6, 0]))  # (T, D) all through expert 5
    split = sum(GroupedExperts({1: h}, act)(1, ExpertBatch(x=x, counts=[6])) for h in halves)  # (T, D)
    with torch.no_grad():
        h = x @ experts.gate_up_proj[5] + experts.gate_up_proj_bias[5]  # (T, 2F) interleaved
        theirs = experts._apply_gate(h) @ experts.down_proj[5] + experts.down_proj_bias[5]  # (T, D)
    assert (h[:, 0::2] > 1.0).any(), "the clamp is exercised"
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split, theirs, rtol=1e-5, atol=1e-5)
