"""Checkpoint reading: partial loading reads only what was asked; bad files are clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moemesh.errors import CheckpointError, ConfigError
from moemesh.model.checkpoint import CheckpointReader
from moemesh.model.config import load_config
from moemesh.model.decoder import RuntimeShape, build_model
from moemesh.model.tiny import TinySpec, write_tiny_model
from moemesh.model.weights import dense_tensor_shapes, expert_tensor_shapes

SPEC = TinySpec(arch="mixtral", layers=2, experts=16, top_k=2, hidden=32, intermediate=48, heads=4, kv_heads=2,
                vocab=300, shards=3)


@pytest.fixture
def ckpt(tmp_path):
    return write_tiny_model(tmp_path / "model", SPEC)


def test_partial_load_reads_only_the_dense_part_and_the_asked_expert(ckpt):
    cfg = load_config(ckpt)
    reader = CheckpointReader(ckpt)
    model = build_model(ckpt, RuntimeShape(max_seqs=1, max_model_len=16), assignment={0: [3], 1: [3]}, reader=reader)
    expected = set(dense_tensor_shapes(cfg))
    for layer in (0, 1):
        expected |= set(expert_tensor_shapes(cfg, layer, 3))
    assert set(reader.reads) == expected
    assert len(reader.reads) == len(expected)  # nothing read twice
    assert not any(".experts.2." in name or ".experts.4." in name for name in reader.reads)
    held = model.moe.experts.layers[0]
    assert held.expert_ids == (3,)
    assert [t.shape for t in held.w13] == [(SPEC.hidden, 2 * SPEC.intermediate)]  # E_loc x (D, 2F)
    assert [t.shape for t in held.w2] == [(SPEC.hidden, SPEC.intermediate)]  # E_loc x (D, F)


def test_unknown_architecture_names_the_supported_ones(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"LlamaForCausalLM.*supported: MixtralForCausalLM, Qwen3MoeForCausalLM"):
        load_config(ckpt)


def _rewrite_shard_without(ckpt, name: str, replacement: torch.Tensor | None = None) -> str:
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    file = index["weight_map"][name]
    tensors = load_file(ckpt / file)
    if replacement is None:
        del tensors[name]
    else:
        tensors[name] = replacement
    save_file(tensors, ckpt / file)
    return file


def test_missing_tensor_names_tensor_and_file(ckpt):
    name = "model.layers.1.block_sparse_moe.experts.5.w2.weight"
    file = _rewrite_shard_without(ckpt, name)
    build_model(ckpt, RuntimeShape(max_seqs=1, max_model_len=16), assignment={0: [5], 1: [4]})  # not asked: fine
    with pytest.raises(CheckpointError, match=f"{name}.*{file}"):
        build_model(ckpt, RuntimeShape(max_seqs=1, max_model_len=16))


def test_wrong_shape_names_tensor_file_and_shapes(ckpt):
    name = "model.layers.0.self_attn.q_proj.weight"
    file = _rewrite_shard_without(ckpt, name, torch.zeros(7, 32))
    with pytest.raises(CheckpointError, match=rf"{name} in {file} has shape \(7, 32\), expected \(32, 32\)"):
        build_model(ckpt, RuntimeShape(max_seqs=1, max_model_len=16))


def test_folder_without_weights(tmp_path):
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        CheckpointReader(tmp_path)
