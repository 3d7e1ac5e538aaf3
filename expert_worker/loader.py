"""Preparing a placement epoch: load the experts newly assigned to this rank, keep the rest.

Runs off the engine thread (a placement arrives while the mesh keeps serving); the engine
thread switches to the result at a step all ranks agree on (moemesh.mesh.lockstep).
Shape legend: E_loc experts held, F expert hidden, D hidden.
"""

from __future__ import annotations

import torch

from expert_worker.runner import PreparedEpoch
from moemesh.mesh.placement import Placement
from moemesh.model.checkpoint import CheckpointReader
from moemesh.model.config import ModelConfig
from moemesh.model.weights import LayerExperts, load_layer_experts


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
    for layer, wanted in placement.assignment(rank).items():
        held = current.get(layer)
        if held is not None and list(held.expert_ids) == wanted:
            layers[layer] = held
            continue
        layers[layer] = _restack(layer, wanted, held, reader, cfg, dtype, device)
    return PreparedEpoch(placement=placement, layers=layers)


def _restack(layer: int, wanted: list[int], held: LayerExperts | None, reader: CheckpointReader,
             cfg: ModelConfig, dtype: torch.dtype, device: str) -> LayerExperts:
    have = {e: i for i, e in enumerate(held.expert_ids)} if held is not None else {}
    missing = [e for e in wanted if e not in have]
    fresh = load_layer_experts(reader, cfg, layer, missing, dtype, device)
    fresh_index = {e: i for i, e in enumerate(fresh.expert_ids)}
    w13, w2 = [], []
    for e in wanted:
        if e in have:
            w13.append(held.w13[have[e]])  # (D, 2F)
            w2.append(held.w2[have[e]])  # (D, F)
        else:
            w13.append(fresh.w13[fresh_index[e]])
            w2.append(fresh.w2[fresh_index[e]])
    D, F = cfg.hidden_size, cfg.expert_intermediate_size
    return LayerExperts(
        expert_ids=tuple(wanted),
        w13=torch.stack(w13) if wanted else torch.empty(0, D, 2 * F, dtype=dtype, device=device),
        w2=torch.stack(w2) if wanted else torch.empty(0, D, F, dtype=dtype, device=device),
    )
