"""expert_worker.epochs: preparing an epoch reuses held experts, cuts shards from whole experts it
holds and reads from the checkpoint only what it cannot derive."""

from __future__ import annotations

import dataclasses

import torch

from expert_worker.epochs import prepare_epoch
from moemesh.mesh.placement import split_placement, whole_replicas
from moemesh.model.checkpoint import CheckpointReader
from moemesh.model.config import load_config
from moemesh.model.shard import Shard
from moemesh.model.tiny import TinySpec, write_tiny_model
from moemesh.model.weights import load_layer_experts, shard_weights

SPEC = TinySpec(layers=2, experts=4, hidden=32, intermediate=48, heads=4, kv_heads=2, vocab=300)


def test_splitting_held_experts_reads_nothing_and_unsplitting_reads_them(tmp_path):
    ckpt = write_tiny_model(tmp_path / "model", SPEC)
    cfg = load_config(ckpt)
    layers = cfg.moe_layer_ids
    whole = whole_replicas(epoch=1, world_size=2, holders={layer: ((0,), (0,), (1,), (1,)) for layer in layers})
    reader = CheckpointReader(ckpt)
    held = {layer: load_layer_experts(reader, cfg, layer, [0, 1], torch.float32, "cpu") for layer in layers}
    reader.reads.clear()

    # Rank 0 held experts 0 and 1 whole; split over 2 ranks it keeps shard 0 of experts 0 and 1.
    split = split_placement(4, layers, world_size=2, shards=2)
    assert split.pieces_on(0, layers[0]) == (Shard(0, 2),) * 4
    prepared = prepare_epoch(split, 0, held, reader, cfg, torch.float32, "cpu")
    got = prepared.layers[layers[0]]
    assert got.expert_ids == (0, 1, 2, 3) and got.shards == (Shard(0, 2),) * 4
    assert all(".experts.0." not in n and ".experts.1." not in n for n in reader.reads)  # cut, not read
    assert {n.split(".experts.")[1].split(".")[0] for n in reader.reads} == {"2", "3"}
    w13, w2 = shard_weights(held[layers[0]].w13[1], held[layers[0]].w2[1], Shard(0, 2))
    assert torch.equal(got.w13[1], w13) and torch.equal(got.w2[1], w2)

    # Back to whole experts: a shard cannot give the whole, so the checkpoint is read again;
    # an unchanged layer is reused as it is.
    reader.reads.clear()
    back = prepare_epoch(whole, 0, prepared.layers, reader, cfg, torch.float32, "cpu")
    assert back.layers[layers[0]].shards == (Shard(0, 1),) * 2
    assert torch.equal(back.layers[layers[0]].w13[0], held[layers[0]].w13[0])
    assert len(reader.reads) == 3 * 2 * len(layers)
    again = prepare_epoch(whole, 0, back.layers, reader, cfg, torch.float32, "cpu")
    assert all(again.layers[layer] is back.layers[layer] for layer in layers)


def test_biased_experts_move_with_their_biases(tmp_path):
    """GPT-OSS's expert biases are part of what an epoch loads, cuts and reuses: after a switch to
    split experts the two ranks' pieces (the down bias on shard 0 only) compute the whole biased
    expert, whether a piece was cut from a held expert or read from the checkpoint."""
    from moemesh.model.activations import expert_activation
    from moemesh.model.moe import ExpertBatch, GroupedExperts

    ckpt = write_tiny_model(tmp_path / "model", dataclasses.replace(SPEC, arch="gpt_oss"))
    cfg = load_config(ckpt)
    layer = cfg.moe_layer_ids[0]
    reader = CheckpointReader(ckpt)
    everything = load_layer_experts(reader, cfg, layer, range(4), torch.float32, "cpu")
    held = {0: {layer: load_layer_experts(reader, cfg, layer, [0, 1], torch.float32, "cpu")},
            1: {layer: load_layer_experts(reader, cfg, layer, [2, 3], torch.float32, "cpu")}}
    split = split_placement(4, [layer], world_size=2, shards=2)
    pieces = {r: prepare_epoch(split, r, held[r], reader, cfg, torch.float32, "cpu").layers[layer] for r in (0, 1)}
    assert pieces[0].biased and all(b is not None for b in pieces[0].b2)  # shard 0 adds the down bias
    assert pieces[1].biased and all(b is None for b in pieces[1].b2)
    act = expert_activation(cfg.clamped_swiglu)
    x = torch.randn(5, cfg.hidden_size)  # (T, D)
    for e in range(4):
        counts = [5 if i == e else 0 for i in range(4)]
        whole = GroupedExperts({layer: everything}, act)(layer, ExpertBatch(x, counts))  # (T, D)
        split_out = sum(GroupedExperts({layer: pieces[r]}, act)(layer, ExpertBatch(x, counts)) for r in (0, 1))
        torch.testing.assert_close(split_out, whole, rtol=1e-5, atol=1e-5)
