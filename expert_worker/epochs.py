"""Preparing a placement epoch: load the experts newly assigned to this rank, keep the rest.

Runs off the engine thread (a placement arrives while the mesh keeps serving); the engine
thread switches to the result at a step all ranks agree on (moemesh.mesh.lockstep).
A piece already held is reused as it is; a shard of an expert held whole is cut from it; only
what remains is read from the checkpoint (a shard reads only its own columns).
Shape legend: D hidden, F_i hidden width of the piece held (F, or F / shards).
"""

from __future__ import annotations

import torch

from expert_worker.runner import PreparedEpoch
from moemesh.mesh.placement import Placement
from moemesh.model.checkpoint import CheckpointReader
from moemesh.model.config import ModelConfig
from moemesh.model.weights import ExpertPiece, LayerExperts, load_layer_experts


def prepare_epoch(
    placement: Placement,
    rank: int,
    current: dict[int, LayerExperts],
    reader: CheckpointReader,
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: str,
) -> PreparedEpoch:
    """Experts this rank holds under `placement`: reused from `current` when already held,
    read from the checkpoint otherwise. `current` is only read, never changed."""
    layers = {}
    for layer in placement.layers:
        wanted = placement.experts_on(rank, layer)
        pieces = placement.pieces_on(rank, layer)
        held = current.get(layer)
        if held is not None and held.expert_ids == wanted and held.shards == pieces:
            layers[layer] = held
            continue
        layers[layer] = _assemble(layer, wanted, pieces, held, reader, cfg, dtype, device)
    return PreparedEpoch(placement=placement, layers=layers)


def _assemble(layer: int, wanted: tuple[int, ...], pieces: tuple, held: LayerExperts | None,
              reader: CheckpointReader, cfg: ModelConfig, dtype: torch.dtype, device: str) -> LayerExperts:
    """The pieces `wanted`/`pieces` of one layer, from `held` where possible."""
    reused: dict[int, ExpertPiece] = {}
    for e, shard in zip(wanted, pieces):
        found = held.piece(e, shard) if held is not None else None
        if found is not None:
            reused[e] = found  # (D, 2F_i), (D, F_i) and the expert's biases, if it has any
    missing = [(e, s) for e, s in zip(wanted, pieces) if e not in reused]
    fresh = load_layer_experts(reader, cfg, layer, [e for e, _ in missing], dtype, device, [s for _, s in missing])
    for e, shard in missing:
        found = fresh.piece(e, shard)
        assert found is not None, "just loaded"
        reused[e] = found
    return LayerExperts.of_pieces(wanted, [reused[e] for e in wanted], pieces)
