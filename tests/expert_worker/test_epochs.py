"""expert_worker.epochs: preparing an epoch reuses held experts, cuts shards from whole experts it
holds and reads from the checkpoint only what it cannot derive."""

from __future__ import annotations

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
