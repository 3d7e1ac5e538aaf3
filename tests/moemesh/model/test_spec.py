"""moemesh.model.spec: the one ModelSpec builder, used by the coordinator and the gateway."""

from __future__ import annotations

from pathlib import Path

import pytest

from moemesh.model.config import ARCHITECTURES, SUPPORTED_ARCHITECTURES, load_config
from moemesh.model.spec import model_spec
from moemesh.model.tiny import TinySpec, write_tiny_model


@pytest.mark.parametrize("family", sorted(ARCHITECTURES))
def test_spec_names_the_architecture_of_each_family(tmp_path: Path, family: str) -> None:
    out = write_tiny_model(tmp_path / family, TinySpec(arch=family, layers=2, experts=4, hidden=32,
                                                       intermediate=32, heads=4, kv_heads=2, vocab=512))
    cfg = load_config(out)
    spec = model_spec(cfg, "m")
    assert cfg.family == family
    assert spec.architecture == ARCHITECTURES[family] in SUPPORTED_ARCHITECTURES
    assert (spec.name, spec.num_experts, spec.top_k) == ("m", 4, cfg.top_k)
    assert list(spec.moe_layer_ids) == list(cfg.moe_layer_ids)
    assert spec.max_context == cfg.max_position_embeddings
    assert model_spec(cfg, "m", max_context=64).max_context == 64
