"""Model configuration: one frozen dataclass built from a checkpoint's config.json.

Supports the two MoE families whose Hugging Face implementations are our reference:
MixtralForCausalLM and Qwen3MoeForCausalLM. Field names follow Hugging Face; the
family-specific spellings (``num_local_experts`` vs ``num_experts``, old ``rope_theta`` vs
``rope_parameters``) are normalised here so nothing downstream branches on them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from moemesh.errors import ConfigError

# The one table of supported families: family -> Hugging Face architecture name. Everything else
# (SUPPORTED_ARCHITECTURES, tiny.py's --arch choices, ModelSpec.architecture) is derived from it.
ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES.values())
_FAMILY_OF = {arch: family for family, arch in ARCHITECTURES.items()}


@dataclass(frozen=True)
class ModelConfig:
    """Everything the model core needs to build and run a checkpoint.

    `family` is "mixtral" or "qwen3_moe"; it decides tensor names and the router's
    normalisation, nothing else.
    """

    family: str
    vocab_size: int
    hidden_size: int  # D
    num_layers: int
    num_heads: int  # H
    num_kv_heads: int  # G (grouped-query attention when G < H)
    head_dim: int
    expert_intermediate_size: int  # F
    dense_intermediate_size: int  # F of dense MLP layers (Qwen3 mlp_only_layers)
    num_experts: int  # E
    top_k: int  # K
    norm_topk_prob: bool
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    sliding_window: int | None
    moe_layers: tuple[bool, ...]  # per layer: True = sparse MoE block, False = dense MLP
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str  # dtype the checkpoint was saved in ("float32", "bfloat16", ...)

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        return tuple(i for i, sparse in enumerate(self.moe_layers) if sparse)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read `model_dir/config.json` into a ModelConfig; raises ConfigError on anything unusable."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config.json in {model_dir}: not a Hugging Face checkpoint folder")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    return config_from_dict(raw, source=str(path))


def config_from_dict(raw: dict[str, Any], source: str = "config") -> ModelConfig:
    arch = _architecture(raw, source)
    family = _FAMILY_OF[arch]
    get = _Getter(raw, source)
    hidden = get.int("hidden_size")
    heads = get.int("num_attention_heads")
    head_dim = raw.get("head_dim") or hidden // heads
    num_layers = get.int("num_hidden_layers")
    num_experts = get.int_any("num_local_experts", "num_experts")
    top_k = get.int("num_experts_per_tok")
    if not 1 <= top_k <= num_experts:
        raise ConfigError(f"{source}: num_experts_per_tok={top_k} must be in 1..{num_experts}")
    kv_heads = raw.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise ConfigError(f"{source}: num_attention_heads={heads} not divisible by num_key_value_heads={kv_heads}")
    if raw.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: hidden_act={raw['hidden_act']!r} unsupported (only silu)")
    _check_rope_scaling(raw, source)
    if family == "mixtral":
        expert_f = dense_f = get.int("intermediate_size")
        moe_layers = (True,) * num_layers
        sliding = raw.get("sliding_window")
    else:
        expert_f = get.int("moe_intermediate_size")
        dense_f = get.int("intermediate_size")
        moe_layers = _qwen3_moe_layers(raw, num_layers, num_experts)
        sliding = raw.get("sliding_window") if raw.get("use_sliding_window") else None
    return ModelConfig(
        family=family,
        vocab_size=get.int("vocab_size"),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(head_dim),
        expert_intermediate_size=expert_f,
        dense_intermediate_size=dense_f,
        num_experts=num_experts,
        top_k=top_k,
        norm_topk_prob=True if family == "mixtral" else bool(raw.get("norm_topk_prob", False)),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(raw, family),
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", False)),
        qk_norm=family == "qwen3_moe",
        sliding_window=int(sliding) if sliding else None,
        moe_layers=moe_layers,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_eos_ids(raw.get("eos_token_id")),
        torch_dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "float32"),
    )


def _architecture(raw: dict[str, Any], source: str) -> str:
    archs = raw.get("architectures") or []
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return arch
    seen = ", ".join(archs) if archs else f"model_type={raw.get('model_type')!r}"
    raise ConfigError(
        f"{source}: unsupported architecture {seen}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


class _Getter:
    def __init__(self, raw: dict[str, Any], source: str):
        self.raw, self.source = raw, source

    def int_any(self, *keys: str) -> int:
        for key in keys:
            value = self.raw.get(key)
            if value is not None:
                if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                    raise ConfigError(f"{self.source}: {key}={value!r} must be a positive integer")
                return value
        raise ConfigError(f"{self.source}: missing field {' or '.join(keys)}")

    # Last: in the class body below this line `int` names this method, not the type.
    def int(self, key: str) -> int:
        return self.int_any(key)


def _rope_theta(raw: dict[str, Any], family: str) -> float:
    params = raw.get("rope_parameters") or {}
    theta = params.get("rope_theta", raw.get("rope_theta"))
    if theta is None:
        theta = 1e6 if family == "mixtral" else 1e4
    return float(theta)


def _check_rope_scaling(raw: dict[str, Any], source: str) -> None:
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise ConfigError(f"{source}: rope_type={kind!r} unsupported (only default RoPE)")


def _qwen3_moe_layers(raw: dict[str, Any], num_layers: int, num_experts: int) -> tuple[bool, ...]:
    dense_only = set(raw.get("mlp_only_layers") or [])
    step = int(raw.get("decoder_sparse_step", 1) or 1)
    return tuple(
        (i not in dense_only) and num_experts > 0 and (i + 1) % step == 0 for i in range(num_layers)
    )


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)
