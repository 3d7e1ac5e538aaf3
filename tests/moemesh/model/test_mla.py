"""Multi-head latent attention: the latent cache's size, and absorbed decode == the reference's unabsorbed one."""

from __future__ import annotations

import torch

from moemesh.model.decoder import RuntimeShape, build_model
from moemesh.model.layers import Segment, build_attention_plan
from moemesh.model.mla import LatentCache

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [100, 200, 250, 3, 4, 5, 6, 7, 8, 9, 10, 11, 290]]


def test_cache_holds_the_latent_and_the_rope_key_per_token_per_layer(hf_model):
    ckpt, ref = hf_model("deepseek_v3", layers=3, heads=4, kv_heads=4)
    model = build_model(ckpt, RuntimeShape(max_seqs=4, max_model_len=64))
    mla = model.cfg.mla
    assert mla is not None and isinstance(model.cache, LatentCache)
    per_token = ref.config.kv_lora_rank + ref.config.qk_rope_head_dim  # 16 + 8
    for layer in range(model.cfg.num_layers):
        assert model.cache.values_per_token(layer) == per_token == mla.cache_width
        assert model.cache.latent[layer].shape == (4, 64, per_token)  # (S, L, C + Dr)
    assert model.cache.nbytes == 3 * 4 * 64 * per_token * 4
    # What the expanded keys and values of every head would take per token (the unabsorbed form).
    expanded = model.cfg.num_heads * (mla.qk_head_dim + mla.v_head_dim)  # 4 * (24 + 12)
    assert per_token * 6 == expanded, "the latent cache is 6x smaller here"

    plan = build_attention_plan([], [], [Segment(slot=1, offset=0, length=3, start_pos=0)], None, "cpu")
    model.forward(torch.tensor([5, 6, 7]), plan, torch.tensor([2]))
    written = model.cache.latent[0][1, :3]  # (3, C + Dr) of slot 1
    assert written.abs().sum(dim=-1).min() > 0 and model.cache.latent[0][1, 3:].abs().sum() == 0


def _decode_logits(model, prompts, steps: int, slots: list[int]) -> list[torch.Tensor]:
    """Prefill `prompts` into `slots`, then `steps` greedy decode steps of all of them at once."""
    segments, offset = [], 0
    for slot, p in zip(slots, prompts):
        segments.append(Segment(slot=slot, offset=offset, length=len(p), start_pos=0))
        offset += len(p)
    plan = build_attention_plan([], [], segments, None, "cpu")
    ends = torch.tensor([s.offset + s.length - 1 for s in segments])
    logits = model.forward(torch.tensor([t for p in prompts for t in p]), plan, ends)  # (B, V)
    out, positions = [logits], [len(p) for p in prompts]
    for _ in range(steps):
        plan = build_attention_plan(slots, positions, [], None, "cpu")
        logits = model.forward(logits.argmax(-1), plan, torch.arange(len(slots)))  # (B, V)
        out.append(logits)
        positions = [p + 1 for p in positions]
    return out


def test_absorbed_decode_equals_the_unabsorbed_reference(hf_model):
    ckpt, ref = hf_model("deepseek_v3", layers=3, heads=4, kv_heads=4)
    absorbed = build_model(ckpt, RuntimeShape(max_seqs=4, max_model_len=64))
    unabsorbed = build_model(ckpt, RuntimeShape(max_seqs=4, max_model_len=64))
    unabsorbed.attention.absorb_decode = False
    assert absorbed.attention.absorb_decode
    for slots in ([0, 1, 2], [3, 0, 2]):  # consecutive slots (a view) and scattered ones (a gather)
        ours = _decode_logits(absorbed, PROMPTS, 6, slots)
        theirs = _decode_logits(unabsorbed, PROMPTS, 6, slots)
        for a, b in zip(ours, theirs):
            assert (a - b).abs().max() / b.abs().max() <= 1e-5
    # And both equal transformers' logits at the decoded positions.
    tokens = [list(p) for p in PROMPTS]
    for step in ours[:-1]:
        for seq, t in zip(tokens, step.argmax(-1).tolist()):
            seq.append(t)
    for i, seq in enumerate(tokens):
        with torch.no_grad():
            want = ref(torch.tensor([seq])).logits[0, -1]  # (V,)
        assert (ours[-1][i] - want).abs().max() / want.abs().max() <= 1e-4
