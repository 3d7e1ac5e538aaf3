"""Write small random-initialised MoE checkpoints (every family of ARCHITECTURES) in the Hugging
Face layout.

The output folder is what `save_pretrained` would produce (config.json, generation_config.json,
model.safetensors or shards + model.safetensors.index.json, tokenizer files) and loads with
`AutoModelForCausalLM.from_pretrained`, but is written without importing transformers.

Initialisation is not Hugging Face's N(0, 0.02) everywhere: with that, a tiny model's logits are
almost uniform and every router gives near-equal scores, so tests could not tell a correct
forward pass from a wrong one. Instead each matrix is N(0, gain / sqrt(fan_in)) (activations keep
a useful scale), norm weights are 1 + 0.1 * N(0, 1), and the lm head gives logits of std ~3.
Routers get gain 2, so top-k choices differ across tokens and have clear score gaps.
Everything comes from one torch.Generator seeded by `TinySpec.seed`, so output is deterministic.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import save_file

from moemesh.errors import ConfigError
from moemesh.model.checkpoint import INDEX_FILE
from moemesh.model.config import ARCHITECTURES, ModelConfig, config_from_dict
from moemesh.model.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    TOKENIZER_VOCAB_SIZE,
    save_tokenizer,
)
from moemesh.model.weights import dense_tensor_shapes, layer_expert_tensor_shapes
from moemesh.settings import option, parse_bool

ARCHS = ARCHITECTURES  # family -> architecture name (moemesh.model.config)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TRANSFORMERS_VERSION = "5.23.0"  # the version whose save_pretrained output these files mirror
_ROPE_THETA = {"mixtral": 1e6, "qwen3_moe": 1e4, "qwen2_moe": 1e6, "olmoe": 1e4, "deepseek_v3": 1e4,
               "glm4_moe": 1e4, "gpt_oss": 1.5e5}  # Hugging Face's per-family defaults
_RMS_EPS = {"mixtral": 1e-5, "qwen3_moe": 1e-6, "qwen2_moe": 1e-6, "olmoe": 1e-5, "deepseek_v3": 1e-6, "glm4_moe": 1e-5,
            "gpt_oss": 1e-5}
_GPT_OSS_WINDOW = 8  # the tiny GPT-OSS's sliding window: short prompts and their outputs cross it
_GROUPED = ("deepseek_v3", "glm4_moe")  # families with DeepSeek-V3's grouped sigmoid router
_LOGIT_STD = 3.0  # std of the logits for a unit-RMS final hidden state
# gain per tensor-name suffix: N(0, gain / sqrt(fan_in)); output RMS ~ gain * input RMS
_GAINS = {
    "q_proj.weight": 1.0,
    "k_proj.weight": 1.0,
    "v_proj.weight": 1.0,
    "o_proj.weight": 0.5,
    "gate.weight": 2.0,  # router: score std ~2 over experts, clear top-k gaps
    "w1.weight": 1.0,
    "w3.weight": 1.0,
    "gate_proj.weight": 1.0,
    "up_proj.weight": 1.0,
    "w2.weight": 0.5,
    "down_proj.weight": 0.5,
    "q_a_proj.weight": 1.0,  # MLA (DeepSeek-V3)
    "q_b_proj.weight": 1.0,
    "kv_a_proj_with_mqa.weight": 1.0,
    "kv_b_proj.weight": 1.0,
    "shared_expert_gate.weight": 1.0,  # Qwen2-MoE
    "router.weight": 2.0,  # GPT-OSS's router, like "gate.weight"
    "experts.gate_up_proj": 1.0,  # GPT-OSS's stacked experts (E, D, 2F): fan-in D
    "experts.down_proj": 0.5,  # (E, F, D): fan-in F
}
_SINK_STD = 1.0  # GPT-OSS's attention sinks: logits of the size of a row's scores, so they take a real share
_VECTOR_STD = 0.1  # biases and DeepSeek's e_score_correction_bias: a bias that changes some selections
# With tied embeddings the embedding rows are small (they double as the lm head), so the
# residual branches need a larger gain; else the head mostly echoes the input token.
_TIED_BRANCH_GAIN = 2.0
_BRANCH_OUTPUTS = ("o_proj.weight", "w2.weight", "down_proj.weight", "experts.down_proj")


@dataclass(frozen=True)
class TinySpec:
    """Shape and format of a tiny checkpoint; invalid combinations raise ConfigError."""

    arch: str = "mixtral"  # "mixtral" | "qwen3_moe"
    layers: int = 4
    experts: int = 16
    top_k: int = 2
    hidden: int = 256
    intermediate: int = 512  # per-expert hidden size (Qwen3's dense MLP gets 2x)
    heads: int = 8
    kv_heads: int = 4
    vocab: int = 512
    seed: int = 0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    dtype: str = "float32"  # "float32" | "bfloat16" | "float16"
    shards: int = 1  # safetensors files; > 1 also writes model.safetensors.index.json
    norm_topk_prob: bool = True  # Qwen and OLMoE (Mixtral always renormalises; DeepSeek-V3's default is True)
    groups: int = 0  # DeepSeek-V3 / GLM-4.5 n_group; 0 = min(4, experts // 2)
    topk_group: int = 0  # DeepSeek-V3 / GLM-4.5 groups kept per token; 0 = half the groups (at least 1)
    shared_experts: int = 1  # DeepSeek-V3 / GLM-4.5 n_shared_experts (Qwen2-MoE: one shared expert of this many x F)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(f"arch={self.arch!r} unsupported; choose one of {', '.join(ARCHS)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} unsupported; choose one of {', '.join(DTYPES)}")
        for name in ("layers", "experts", "top_k", "hidden", "intermediate", "heads", "kv_heads", "shards"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.vocab < TOKENIZER_VOCAB_SIZE:
            raise ConfigError(
                f"vocab={self.vocab} is too small: the byte tokenizer needs {TOKENIZER_VOCAB_SIZE} ids "
                "(3 specials + 256 bytes)"
            )
        if self.top_k > self.experts:
            raise ConfigError(f"top_k={self.top_k} must be <= experts={self.experts}")
        if self.hidden % self.heads or (self.hidden // self.heads) % 2:
            raise ConfigError(f"hidden={self.hidden} must split into heads={self.heads} of even size (RoPE)")
        if self.heads % self.kv_heads:
            raise ConfigError(f"heads={self.heads} must be a multiple of kv_heads={self.kv_heads}")
        if self.arch in _GROUPED:
            self._check_grouped()

    def _check_grouped(self) -> None:
        groups, kept, a = self.n_group, self.kept_groups, self.arch
        if self.head_dim % 4 or self.hidden % 4:
            raise ConfigError(f"{a}: hidden={self.hidden} / heads={self.heads} must be a multiple of 4 (half rope)")
        if groups < 1 or self.experts % groups or self.experts // groups < 2 or not 1 <= kept <= groups:
            raise ConfigError(f"{a}: experts={self.experts} must split into groups={groups} of >= 2, "
                              f"topk_group={kept} in 1..groups")
        if self.top_k > kept * (self.experts // groups):
            raise ConfigError(f"{a}: top_k={self.top_k} exceeds the experts of {kept} groups")

    @property
    def n_group(self) -> int:
        return self.groups or max(1, min(4, self.experts // 2))

    @property
    def kept_groups(self) -> int:
        return self.topk_group or max(1, self.n_group // 2)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def hf_config(spec: TinySpec) -> dict[str, Any]:
    """The config.json dict Hugging Face's MixtralConfig / Qwen3MoeConfig would save for `spec`."""
    common: dict[str, Any] = {
        "architectures": [ARCHS[spec.arch]],
        "attention_dropout": 0.0,
        "bos_token_id": BOS_ID,
        "dtype": spec.dtype,
        "eos_token_id": EOS_ID,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "hidden_size": spec.hidden,
        "initializer_range": 0.02,
        "max_position_embeddings": spec.max_position_embeddings,
        "model_type": spec.arch,
        "num_attention_heads": spec.heads,
        "num_experts_per_tok": spec.top_k,
        "num_hidden_layers": spec.layers,
        "num_key_value_heads": spec.kv_heads,
        "output_router_logits": False,
        "pad_token_id": PAD_ID,
        "rms_norm_eps": _RMS_EPS[spec.arch],
        "rope_parameters": {"rope_theta": _ROPE_THETA[spec.arch], "rope_type": "default"},
        "router_aux_loss_coef": 0.001,
        "sliding_window": None,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "transformers_version": TRANSFORMERS_VERSION,
        "use_cache": True,
        "vocab_size": spec.vocab,
    }
    family = _family_config(spec)
    return dict(sorted({**common, **family}.items()))


def _family_config(spec: TinySpec) -> dict[str, Any]:
    F = spec.intermediate
    if spec.arch == "mixtral":
        return {"intermediate_size": F, "num_local_experts": spec.experts, "router_jitter_noise": 0.0}
    if spec.arch == "olmoe":
        return {"attention_bias": False, "clip_qkv": None, "intermediate_size": F,
                "norm_topk_prob": spec.norm_topk_prob, "num_experts": spec.experts}
    if spec.arch == "deepseek_v3":
        return _deepseek_config(spec)
    if spec.arch == "glm4_moe":
        return _glm4_moe_config(spec)
    if spec.arch == "gpt_oss":
        return _gpt_oss_config(spec)
    family = {
        "attention_bias": False,
        "decoder_sparse_step": 1,
        "intermediate_size": 2 * F,  # dense MLP, used only by mlp_only_layers
        "mlp_only_layers": [],
        "moe_intermediate_size": F,
        "norm_topk_prob": spec.norm_topk_prob,
        "num_experts": spec.experts,  # the spelling of Qwen checkpoints on the Hub
        "use_sliding_window": False,
    }
    if spec.arch == "qwen2_moe":
        family.update(qkv_bias=True, shared_expert_intermediate_size=spec.shared_experts * F,
                      max_window_layers=spec.layers)
    return family


def _deepseek_config(spec: TinySpec) -> dict[str, Any]:
    """MLA ranks derived from the head size: rope half a head, latent a quarter of the hidden size."""
    Dh = spec.head_dim
    return {
        "attention_bias": False, "first_k_dense_replace": 1 if spec.layers > 1 else 0,
        "intermediate_size": 2 * spec.intermediate, "kv_lora_rank": spec.hidden // 4, "moe_intermediate_size":
        spec.intermediate, "n_group": spec.n_group, "n_routed_experts": spec.experts, "n_shared_experts":
        spec.shared_experts, "norm_topk_prob": spec.norm_topk_prob, "q_lora_rank": spec.hidden // 2,
        "qk_nope_head_dim": Dh, "qk_rope_head_dim": Dh // 2, "rope_interleave": True, "routed_scaling_factor": 2.5,
        "topk_group": spec.kept_groups, "v_head_dim": Dh, "head_dim": Dh // 2,
        "num_key_value_heads": spec.heads,  # MLA expands the latent into every head
    }


def _glm4_moe_config(spec: TinySpec) -> dict[str, Any]:
    """GLM-4.5's layout: q/k/v biases, per-head q/k norms, rope over half of each head."""
    return {
        "attention_bias": True, "first_k_dense_replace": 1 if spec.layers > 1 else 0,
        "intermediate_size": 2 * spec.intermediate, "moe_intermediate_size": spec.intermediate,
        "n_group": spec.n_group, "n_routed_experts": spec.experts, "n_shared_experts": spec.shared_experts,
        "norm_topk_prob": spec.norm_topk_prob, "routed_scaling_factor": 1.5, "topk_group": spec.kept_groups,
        "use_qk_norm": True, "rope_parameters": {"partial_rotary_factor": 0.5, "rope_theta": _ROPE_THETA["glm4_moe"],
                                                 "rope_type": "default"},
    }


def _gpt_oss_config(spec: TinySpec) -> dict[str, Any]:
    """GPT-OSS's layout: sliding and full attention layers alternating, yarn rope as the reference
    configures it (factor 32 over 4096 positions, no truncation), biased attention and experts."""
    return {
        "attention_bias": True, "intermediate_size": spec.intermediate, "num_local_experts": spec.experts,
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(spec.layers)],
        "sliding_window": _GPT_OSS_WINDOW, "swiglu_alpha": 1.702, "swiglu_limit": 7.0,
        "rope_parameters": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                            "original_max_position_embeddings": 4096, "rope_theta": _ROPE_THETA["gpt_oss"],
                            "rope_type": "yarn", "truncate": False},
    }


def generation_config(spec: TinySpec) -> dict[str, Any]:
    """The generation_config.json Hugging Face derives from the model config."""
    return {
        "_from_model_config": True,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "transformers_version": TRANSFORMERS_VERSION,
        "use_cache": True,
    }


def write_tiny_model(out_dir: str | Path, spec: TinySpec) -> Path:
    """Write a random checkpoint for `spec` into `out_dir` (created if needed); return the folder.

    Old weight files (model.safetensors, model-*-of-*.safetensors, the index) are removed first
    so a rewrite with a different `shards` never leaves a stale index behind.
    """
    return write_checkpoint(out_dir, spec, init_weights(spec_config(spec), spec))


def spec_config(spec: TinySpec) -> ModelConfig:
    """The engine's ModelConfig for `spec`, read back from the config.json it writes (and checked)."""
    cfg = config_from_dict(json.loads(json.dumps(hf_config(spec))), source=f"tiny {spec.arch} config")
    _check_config(cfg, spec)
    return cfg


def write_checkpoint(out_dir: str | Path, spec: TinySpec, tensors: dict[str, torch.Tensor],
                     metadata: dict[str, str] | None = None) -> Path:
    """Write `tensors` (exactly the names of `tensor_shapes`, in `spec.dtype`) as the checkpoint of
    `spec`: weights, config.json, generation_config.json, tokenizer; `metadata` goes into the
    safetensors header. Return the folder."""
    cfg = spec_config(spec)
    shapes = tensor_shapes(cfg)
    assert {n: tuple(t.shape) for n, t in tensors.items()} == shapes, "tensors do not match the spec's names"
    assert all(t.dtype == DTYPES[spec.dtype] for t in tensors.values()), "tensors not in the spec's dtype"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _remove_old_weights(out)
    _write_safetensors(out, {n: tensors[n] for n in shapes}, spec.shards, metadata or {})
    (out / "config.json").write_text(json.dumps(hf_config(spec), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(generation_config(spec), indent=2) + "\n")
    save_tokenizer(out)
    return out


def tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint, in Hugging Face's order: embeddings, layer 0..L-1, norm, head."""
    shapes = dict(dense_tensor_shapes(cfg))
    for layer in cfg.moe_layer_ids:
        shapes.update(layer_expert_tensor_shapes(cfg, layer))

    def position(name: str) -> int:
        if name.startswith("model.layers."):
            return int(name.split(".")[2])
        return -1 if name.startswith("model.embed_tokens") else cfg.num_layers

    return {name: shapes[name] for name in sorted(shapes, key=position)}  # sorted() is stable


def init_weights(cfg: ModelConfig, spec: TinySpec) -> dict[str, torch.Tensor]:
    """Random tensors for every checkpoint name, deterministic in `spec.seed`, in `spec.dtype`."""
    gen = torch.Generator().manual_seed(spec.seed)
    dtype = DTYPES[spec.dtype]
    out: dict[str, torch.Tensor] = {}
    for name, shape in tensor_shapes(cfg).items():
        std = _init_std(name, shape, cfg)
        noise = torch.randn(shape, generator=gen, dtype=torch.float32)
        tensor = 1.0 + 0.1 * noise if std is None else std * noise
        out[name] = tensor.to(dtype).contiguous()
    return out


def _init_std(name: str, shape: tuple[int, ...], cfg: ModelConfig) -> float | None:
    """Std of N(0, std) for `name`; None for norm weights (1 + 0.1 * N(0, 1))."""
    head_std = _LOGIT_STD / math.sqrt(cfg.hidden_size)
    if name.endswith("norm.weight"):
        return None
    if name.endswith((".bias", "_bias", "e_score_correction_bias")):
        return _VECTOR_STD
    if name.endswith(".sinks"):
        return _SINK_STD
    if name == "lm_head.weight":
        return head_std
    if name == "model.embed_tokens.weight":
        return head_std if cfg.tie_word_embeddings else 1.0
    suffix = ".".join(name.split(".")[-2:])
    if suffix not in _GAINS or len(shape) not in (2, 3):
        raise AssertionError(f"no initialisation rule for tensor {name} {shape}")
    gain = _TIED_BRANCH_GAIN if cfg.tie_word_embeddings and suffix in _BRANCH_OUTPUTS else _GAINS[suffix]
    fan_in = shape[1] if len(shape) == 3 else shape[-1]  # stacked (E, in, out) experts, else (out, in)
    return gain / math.sqrt(fan_in)


def _check_config(cfg: ModelConfig, spec: TinySpec) -> None:
    """Assert that config_from_dict reads back exactly what `spec` asked for."""
    got = (cfg.family, cfg.num_layers, cfg.num_experts, cfg.top_k, cfg.hidden_size,
           cfg.expert_intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size,
           cfg.tie_word_embeddings, cfg.torch_dtype, cfg.moe_layers[-1])
    kv_heads = spec.heads if spec.arch == "deepseek_v3" else spec.kv_heads  # MLA: one latent, H heads
    want = (spec.arch, spec.layers, spec.experts, spec.top_k, spec.hidden, spec.intermediate,
            spec.heads, kv_heads, spec.vocab, spec.tie_word_embeddings, spec.dtype, True)
    assert got == want, f"config round-trip mismatch: {got} != {want}"


def _remove_old_weights(out: Path) -> None:
    for path in [out / "model.safetensors", out / INDEX_FILE, *out.glob("model-*-of-*.safetensors")]:
        path.unlink(missing_ok=True)


def _write_safetensors(out: Path, tensors: dict[str, torch.Tensor], shards: int, extra: dict[str, str]) -> None:
    """One model.safetensors, or `shards` files plus an index like Hugging Face's."""
    metadata = {"format": "pt", **extra}
    if shards == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata=metadata)
        return
    groups = _split(tensors, shards)
    weight_map: dict[str, str] = {}
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(out / file), metadata=metadata)
        weight_map.update(dict.fromkeys(names, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _split(tensors: dict[str, torch.Tensor], shards: int) -> list[list[str]]:
    """Contiguous groups of names of roughly equal bytes; every group non-empty."""
    names = list(tensors)
    if shards > len(names):
        raise ConfigError(f"shards={shards} exceeds the number of tensors ({len(names)})")
    sizes = [tensors[n].numel() * tensors[n].element_size() for n in names]
    total, done = sum(sizes), 0
    groups: list[list[str]] = [[] for _ in range(shards)]
    current = 0
    for i, (name, size) in enumerate(zip(names, sizes)):
        want = min(done * shards // total, shards - 1)
        must = shards - (len(names) - i)  # so that every later group still gets a tensor
        if groups[current]:
            current = max(current, min(want, current + 1), must)
        groups[current].append(name)
        done += size
    return groups


_D = TinySpec()  # the defaults of `moemesh tiny-model`'s flags


@dataclass(frozen=True)
class TinyModelSettings:
    """`moemesh tiny-model OUT`: the folder, and a flag for each TinySpec field it sets (same names;
    --tie-embeddings sets tie_word_embeddings). A one-shot tool: flags only, no MOEMESH_* variables."""

    ENV_PREFIX: ClassVar[str | None] = None

    out: Path = option("out", "folder to write the checkpoint into", Path, metavar="OUT")
    arch: str = option("--arch", "model family", default=_D.arch, choices=sorted(ARCHS))
    layers: int = option("--layers", "decoder layers", int, default=_D.layers)
    experts: int = option("--experts", "experts per MoE layer", int, default=_D.experts)
    top_k: int = option("--top-k", "experts per token", int, default=_D.top_k)
    hidden: int = option("--hidden", "hidden size", int, default=_D.hidden)
    intermediate: int = option("--intermediate", "expert intermediate size", int, default=_D.intermediate)
    heads: int = option("--heads", "attention heads", int, default=_D.heads)
    kv_heads: int = option("--kv-heads", "key/value heads", int, default=_D.kv_heads)
    vocab: int = option("--vocab", "vocabulary size, at least 259", int, default=_D.vocab)
    seed: int = option("--seed", "random seed", int, default=_D.seed)
    shards: int = option("--shards", "number of safetensors files", int, default=_D.shards)
    dtype: str = option("--dtype", "weight dtype", default=_D.dtype, choices=sorted(DTYPES))
    tie_word_embeddings: bool = option("--tie-embeddings", "share embedding and lm head", parse_bool,
                                       default=_D.tie_word_embeddings)
    groups: int = option("--groups", "deepseek_v3 / glm4_moe expert groups (0: min(4, experts/2))", int,
                         default=_D.groups)
    topk_group: int = option("--topk-group", "deepseek_v3 / glm4_moe groups kept per token (0: half)", int,
                             default=_D.topk_group)
    shared_experts: int = option("--shared-experts", "deepseek_v3 / glm4_moe / qwen2_moe shared experts", int,
                                 default=_D.shared_experts)

    def __post_init__(self) -> None:
        self.spec()  # a bad combination (top-k > experts, ...) is a ConfigError here, before any work

    def spec(self) -> TinySpec:
        """The TinySpec these flags describe (its other fields keep their defaults)."""
        return TinySpec(**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "out"})
