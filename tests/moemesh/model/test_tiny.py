"""Tiny random checkpoints: Hugging Face layout, loadable by transformers, sharding, dtypes."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moemesh.errors import ConfigError
from moemesh.model.checkpoint import CheckpointReader
from moemesh.model.config import load_config
from moemesh.model.tiny import (
    TinyModelSettings,
    TinySpec,
    tensor_shapes,
    write_tiny_model,
)
from moemesh.model.tokenizer import load_tokenizer
from moemesh.settings import add_options, settings_from

transformers = pytest.importorskip("transformers")

SMALL = dict(layers=2, experts=4, top_k=2, hidden=64, intermediate=96, heads=4, kv_heads=2, vocab=300)


def _read_all(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            out.update({name: handle.get_tensor(name) for name in handle.keys()})  # noqa: SIM118 - safe_open is no mapping
    return out


def _load_hf(model_dir: Path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), f"loading info not clean: {info}"
    return model.eval()


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_loads_in_transformers_with_same_weights(tmp_path: Path, arch: str, tie: bool) -> None:
    spec = TinySpec(arch=arch, tie_word_embeddings=tie, **SMALL)
    out = write_tiny_model(tmp_path / arch, spec)
    written = _read_all(out)
    assert ("lm_head.weight" in written) is not tie
    model = _load_hf(out)
    state = model.state_dict()
    assert torch.equal(state["model.embed_tokens.weight"], written["model.embed_tokens.weight"])
    head = written["model.embed_tokens.weight" if tie else "lm_head.weight"]
    assert torch.equal(state["lm_head.weight"], head)
    moe = "block_sparse_moe" if arch == "mixtral" else "mlp"
    gate, up, down = ("w1", "w3", "w2") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    p = f"model.layers.1.{moe}.experts.3"
    fused_gate_up = state["model.layers.1.mlp.experts.gate_up_proj"][3]
    assert torch.equal(fused_gate_up, torch.cat([written[f"{p}.{gate}.weight"], written[f"{p}.{up}.weight"]]))
    assert torch.equal(state["model.layers.1.mlp.experts.down_proj"][3], written[f"{p}.{down}.weight"])
    assert torch.equal(state["model.layers.0.mlp.gate.weight"], written[f"model.layers.0.{moe}.gate.weight"])


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_config_json(tmp_path: Path, arch: str) -> None:
    out = write_tiny_model(tmp_path, TinySpec(arch=arch, **SMALL))
    raw = json.loads((out / "config.json").read_text())
    assert raw["architectures"] == ["MixtralForCausalLM" if arch == "mixtral" else "Qwen3MoeForCausalLM"]
    assert raw["model_type"] == arch and raw["dtype"] == "float32"
    assert raw["rope_parameters"]["rope_type"] == "default" and raw["rope_parameters"]["rope_theta"] > 0
    assert (raw["bos_token_id"], raw["eos_token_id"]) == (0, 1)
    if arch == "qwen3_moe":
        assert raw["moe_intermediate_size"] == 96 and raw["intermediate_size"] == 192
        assert raw["num_experts"] == 4 and raw["mlp_only_layers"] == [] and raw["decoder_sparse_step"] == 1
        assert raw["norm_topk_prob"] is True and raw["attention_bias"] is False
        assert raw["use_sliding_window"] is False
    cfg = load_config(out)
    assert (cfg.num_experts, cfg.top_k, cfg.expert_intermediate_size, cfg.vocab_size) == (4, 2, 96, 300)
    hf_cfg = transformers.AutoConfig.from_pretrained(str(out))
    assert hf_cfg.num_local_experts == 4 and hf_cfg.num_experts_per_tok == 2
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (0, 1)
    assert load_tokenizer(out).get_vocab_size() == 259


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_sharded_index_covers_every_tensor(tmp_path: Path, arch: str) -> None:
    spec = TinySpec(arch=arch, shards=3, **SMALL)
    out = write_tiny_model(tmp_path, spec)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    reader = CheckpointReader(out)
    names = set(tensor_shapes(load_config(out)))
    assert set(index["weight_map"]) == names == set(reader.name_to_file)
    tensors = _read_all(out)
    assert set(tensors) == names
    for name, file in index["weight_map"].items():
        with safe_open(str(out / file), framework="pt") as handle:
            assert name in handle.keys()  # noqa: SIM118 - safe_open is no mapping
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    _load_hf(out)


def test_rewrite_replaces_old_shards(tmp_path: Path) -> None:
    write_tiny_model(tmp_path, TinySpec(shards=4, **SMALL))
    write_tiny_model(tmp_path, TinySpec(shards=1, **SMALL))
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_dtypes(tmp_path: Path, dtype: str) -> None:
    out = write_tiny_model(tmp_path, TinySpec(dtype=dtype, **SMALL))
    tensors = _read_all(out)
    assert {t.dtype for t in tensors.values()} == {getattr(torch, dtype)}
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype
    assert load_config(out).torch_dtype == dtype
    _load_hf(out)


def test_deterministic_in_seed(tmp_path: Path) -> None:
    a = _read_all(write_tiny_model(tmp_path / "a", TinySpec(seed=7, **SMALL)))
    b = _read_all(write_tiny_model(tmp_path / "b", TinySpec(seed=7, **SMALL)))
    c = _read_all(write_tiny_model(tmp_path / "c", TinySpec(seed=8, **SMALL)))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_logits_and_routing_not_degenerate(tmp_path: Path, arch: str, tie: bool) -> None:
    spec = TinySpec(arch=arch, tie_word_embeddings=tie, layers=2, experts=8, hidden=128, intermediate=128)
    model = _load_hf(write_tiny_model(tmp_path, spec))
    ids = torch.randint(3, 259, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, output_router_logits=True)
    logp = out.logits.float().log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    assert entropy.mean() < math.log(spec.vocab) - 1.5, "logits are close to uniform"
    assert (out.logits.argmax(-1) == ids).float().mean() < 0.5, "the model just echoes its input"
    assert out.logits.argmax(-1).unique().numel() > 10
    for router_logits in out.router_logits:
        chosen = router_logits.topk(spec.top_k, dim=-1).indices
        counts = torch.bincount(chosen.flatten(), minlength=spec.experts)
        assert (counts > 0).all(), f"some experts never chosen: {counts.tolist()}"
        assert counts.max() < 0.5 * chosen.numel(), f"routing collapses onto one expert: {counts.tolist()}"


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(vocab=258), "vocab=258 is too small"),
        (dict(arch="llama"), "arch="),
        (dict(dtype="int8"), "dtype="),
        (dict(top_k=5, experts=4), "top_k=5"),
        (dict(heads=3), "hidden=256"),
        (dict(kv_heads=3), "kv_heads=3"),
        (dict(shards=0), "shards=0"),
    ],
)
def test_invalid_spec_raises(bad: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TinySpec(**bad)


def test_too_many_shards_raises(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="shards=10000"):
        write_tiny_model(tmp_path, TinySpec(shards=10_000, **SMALL))


def tiny_model_settings(argv: list[str]) -> TinyModelSettings:
    """`moemesh tiny-model ARGV`'s settings, parsed as the command does."""
    parser = argparse.ArgumentParser()
    add_options(parser, TinyModelSettings)
    return settings_from(TinyModelSettings, parser.parse_args(argv), {})


def test_cli_args_round_trip() -> None:
    assert tiny_model_settings(["out"]).spec() == TinySpec()
    s = tiny_model_settings(
        ["d", "--arch", "qwen3_moe", "--layers", "3", "--experts", "8", "--top-k", "4", "--hidden", "128",
         "--intermediate", "64", "--heads", "4", "--kv-heads", "1", "--vocab", "300", "--seed", "5",
         "--dtype", "bfloat16", "--shards", "2", "--tie-embeddings"]
    )
    assert s.out == Path("d")
    assert s.spec() == TinySpec(
        arch="qwen3_moe", layers=3, experts=8, top_k=4, hidden=128, intermediate=64, heads=4, kv_heads=1,
        vocab=300, seed=5, dtype="bfloat16", shards=2, tie_word_embeddings=True,
    )


def test_cli_flags_are_checked_like_a_spec() -> None:
    with pytest.raises(ConfigError, match="top_k=5 must be <= experts=4"):
        tiny_model_settings(["d", "--experts", "4", "--top-k", "5"])
    parser = argparse.ArgumentParser()
    add_options(parser, TinyModelSettings)
    with pytest.raises(SystemExit):
        parser.parse_args(["d", "--dtype", "int8"])


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen2_moe", "olmoe", "glm4_moe", "gpt_oss"])
def test_new_families_load_in_transformers_and_compute_the_same(tmp_path: Path, arch: str) -> None:
    """Every name and shape is the reference's (a strict load), the router bias and shared experts
    included (GPT-OSS: sinks, router bias, stacked biased experts); our forward pass on the written
    file equals transformers' on it."""
    from moemesh.model.decoder import RuntimeShape, build_model
    from moemesh.model.layers import Segment, build_attention_plan

    spec = TinySpec(arch=arch, **{**SMALL, "layers": 3, "experts": 8})
    out = write_tiny_model(tmp_path / arch, spec)
    written = _read_all(out)
    model = _load_hf(out)
    cfg = load_config(out)
    if arch == "glm4_moe":
        assert cfg.rotary_dim == cfg.head_dim // 2 and cfg.attention_bias and cfg.qk_norm
    if arch in ("deepseek_v3", "glm4_moe"):
        assert cfg.moe_layers == (False, True, True) and cfg.grouped_routing is not None
        assert (cfg.grouped_routing.n_group, cfg.grouped_routing.topk_group) == (4, 2)
        bias = written["model.layers.1.mlp.gate.e_score_correction_bias"]
        assert torch.equal(model.state_dict()["model.layers.1.mlp.gate.e_score_correction_bias"], bias)
        assert bias.abs().min() > 0
    if arch not in ("olmoe", "gpt_oss"):
        assert cfg.shared_intermediate_size == 96
    if arch == "gpt_oss":
        assert model.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
        assert cfg.full_attention_layers == (1,) and cfg.sliding_window == model.config.sliding_window == 8
        assert cfg.attention_sinks and cfg.router_bias and cfg.clamped_swiglu is not None
        assert torch.equal(model.state_dict()["model.layers.2.mlp.experts.gate_up_proj_bias"],
                           written["model.layers.2.mlp.experts.gate_up_proj_bias"])
        assert written["model.layers.0.self_attn.sinks"].abs().min() > 0
    ours_model = build_model(out, RuntimeShape(max_seqs=1, max_model_len=32))
    prompt = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]  # longer than the GPT-OSS window
    plan = build_attention_plan([], [], [Segment(0, 0, len(prompt), 0)], None, "cpu")
    ours = ours_model.forward(torch.tensor(prompt), plan, torch.arange(len(prompt)))  # (n, V)
    with torch.no_grad():
        theirs = model(torch.tensor([prompt])).logits[0]  # (n, V)
    assert (ours - theirs).abs().max() / theirs.abs().max() <= 1e-4
