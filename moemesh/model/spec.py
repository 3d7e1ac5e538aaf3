"""The ModelSpec message (moemesh.v1.common) built from a checkpoint's ModelConfig, in one place.

The coordinator sends it to every worker (max_context = the checkpoint's
max_position_embeddings); the gateway reports it in ModelInfo (max_context = the context it
enforces). Architecture names come from moemesh.model.config.ARCHITECTURES.
"""

from __future__ import annotations

from moemesh.model.config import ARCHITECTURES, ModelConfig
from moemesh.v1 import common_pb2


def model_spec(cfg: ModelConfig, name: str, max_context: int | None = None) -> common_pb2.ModelSpec:
    """ModelSpec for `cfg`; `max_context` defaults to the checkpoint's max_position_embeddings."""
    return common_pb2.ModelSpec(
        architecture=ARCHITECTURES[cfg.family],
        name=name,
        num_layers=cfg.num_layers,
        moe_layer_ids=list(cfg.moe_layer_ids),
        num_experts=cfg.num_experts,
        top_k=cfg.top_k,
        hidden_size=cfg.hidden_size,
        vocab_size=cfg.vocab_size,
        max_context=cfg.max_position_embeddings if max_context is None else max_context,
        dtype=cfg.torch_dtype,
    )
