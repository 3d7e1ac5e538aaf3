"""Model configuration: one frozen dataclass built from a checkpoint's config.json.

Supports the MoE families whose Hugging Face implementations are our reference: Mixtral,
Qwen3-MoE, Qwen2-MoE, OLMoE, DeepSeek-V3, GLM-4.5 and GPT-OSS. Field names follow Hugging Face; the
family-specific spellings (``num_local_experts`` vs ``num_experts`` vs ``n_routed_experts``, old
``rope_theta``/``rope_scaling`` vs ``rope_parameters``) are normalised here so nothing downstream
branches on them: a family's differences are data (an `MLAShape`, a `GroupedRouting`, a shared
expert's size, a `Yarn`, a `ClampedSwiGLU`), never a family-name test outside the tensor-name tables.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from moemesh.errors import ConfigError

# The one table of supported families: family -> Hugging Face architecture name. Everything else
# (SUPPORTED_ARCHITECTURES, tiny.py's --arch choices, ModelSpec.architecture) is derived from it.
ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "glm4_moe": "Glm4MoeForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES.values())
_FAMILY_OF = {arch: family for family, arch in ARCHITECTURES.items()}
# else moe_intermediate_size
_EXPERT_SIZE_KEY = {"mixtral": "intermediate_size", "olmoe": "intermediate_size", "gpt_oss": "intermediate_size"}


@dataclass(frozen=True)
class MLAShape:
    """Multi-head latent attention (DeepSeek-V2/V3): queries through an optional low-rank
    bottleneck, keys and values from one compressed latent per token."""

    q_lora_rank: int | None  # None: a plain q_proj
    kv_lora_rank: int  # C: the latent the cache holds
    qk_nope_head_dim: int  # Dn: per-head query/key part without position
    qk_rope_head_dim: int  # Dr: the rope'd part, one key shared by every head
    v_head_dim: int  # Dv
    rope_interleave: bool  # rope over interleaved pairs (x0, x1), (x2, x3), ... (the reference's default)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_width(self) -> int:
        """Values cached per token per layer: the normed latent and the rope'd shared key."""
        return self.kv_lora_rank + self.qk_rope_head_dim


@dataclass(frozen=True)
class GroupedRouting:
    """DeepSeek-V3's router: sigmoid scores, a selection-only bias, group-limited top-k."""

    n_group: int
    topk_group: int
    routed_scaling_factor: float


@dataclass(frozen=True)
class ClampedSwiGLU:
    """GPT-OSS's expert activation: gate clamped above and up clamped both sides at `limit`, then
    gate * sigmoid(alpha * gate) * (up + 1)."""

    alpha: float
    limit: float


@dataclass(frozen=True)
class Yarn:
    """YaRN rope scaling as Hugging Face computes it (`_compute_yarn_parameters`)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class ModelConfig:
    """Everything the model core needs to build and run a checkpoint.

    `family` (a key of ARCHITECTURES) decides tensor names, nothing else: every difference in
    the computation is a field.
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
    o_bias: bool = False  # o_proj has a bias (attention_bias is q/k/v's)
    qk_norm_full: bool = False  # q/k RMSNorm over the whole projection (OLMoE), not per head
    shared_intermediate_size: int = 0  # Fs of the shared expert(s) every token uses; 0 = none
    shared_expert_gate: bool = False  # the shared expert's output is scaled by sigmoid(x @ g) (Qwen2-MoE)
    grouped_routing: GroupedRouting | None = None  # None: softmax top-k
    mla: MLAShape | None = None  # None: grouped-query attention
    yarn: Yarn | None = None  # None: plain RoPE
    rotary_dim: int = 0  # leading dims of each head that RoPE rotates; 0 = all of head_dim (GLM-4.5: half)
    full_attention_layers: tuple[int, ...] = ()  # layers that ignore sliding_window (GPT-OSS: every other one)
    attention_sinks: bool = False  # a learned per-head logit in each softmax's denominator (GPT-OSS)
    router_bias: bool = False  # the router's linear has a bias; softmax over the top-k biased logits (GPT-OSS)
    clamped_swiglu: ClampedSwiGLU | None = None  # None: the experts' plain SwiGLU; GPT-OSS: clamped, (up + 1)

    def window(self, layer: int) -> int | None:
        """The sliding window of `layer`'s attention; None = full causal attention."""
        return None if layer in self.full_attention_layers else self.sliding_window

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
    num_experts = get.int_any("num_local_experts", "num_experts", "n_routed_experts")
    top_k = get.int("num_experts_per_tok")
    if not 1 <= top_k <= num_experts:
        raise ConfigError(f"{source}: num_experts_per_tok={top_k} must be in 1..{num_experts}")
    kv_heads = raw.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise ConfigError(f"{source}: num_attention_heads={heads} not divisible by num_key_value_heads={kv_heads}")
    if raw.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: hidden_act={raw['hidden_act']!r} unsupported (only silu)")
    if raw.get("quantization_config"):
        raise ConfigError(f"{source}: quantized checkpoints (quantization_config) are unsupported; "
                          "dequantize to bf16 or fp32 first")
    if raw.get("clip_qkv") is not None:
        raise ConfigError(f"{source}: clip_qkv={raw['clip_qkv']!r} unsupported")
    yarn = _yarn(raw, source)
    bias = bool(raw.get("attention_bias", False))
    cfg = ModelConfig(
        family=family,
        vocab_size=get.int("vocab_size"),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(head_dim),
        expert_intermediate_size=get.int(_EXPERT_SIZE_KEY.get(family, "moe_intermediate_size")),
        dense_intermediate_size=get.int("intermediate_size"),
        num_experts=num_experts,
        top_k=top_k,
        norm_topk_prob=True if family == "mixtral" else bool(raw.get("norm_topk_prob", False)),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(raw, family),
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("qkv_bias", True)) if family == "qwen2_moe" else bias,
        qk_norm=family in ("qwen3_moe", "olmoe") or bool(raw.get("use_qk_norm")),
        sliding_window=_sliding_window(raw, family),
        moe_layers=_moe_layers(raw, family, num_layers, num_experts),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_eos_ids(raw.get("eos_token_id")),
        torch_dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "float32"),
        o_bias=bias if family != "qwen2_moe" else False,
        qk_norm_full=family == "olmoe",
        yarn=yarn,
    )
    if family == "qwen2_moe":
        return replace(cfg, shared_intermediate_size=int(raw.get("shared_expert_intermediate_size") or 0),
                       shared_expert_gate=True)
    if family == "deepseek_v3":
        return _deepseek(cfg, raw, get, source)
    if family == "glm4_moe":
        return _glm4_moe(cfg, raw, get, source)
    if family == "gpt_oss":
        return _gpt_oss(cfg, raw, source)
    return cfg


def _gpt_oss(cfg: ModelConfig, raw: dict[str, Any], source: str) -> ModelConfig:
    """GPT-OSS: attention sinks, sliding and full attention layers by `layer_types`, biased
    q/k/v/o, a biased router, biased experts with the clamped SwiGLU."""
    kinds = raw.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                       for i in range(cfg.num_layers)]
    if len(kinds) != cfg.num_layers or set(kinds) - {"sliding_attention", "full_attention"}:
        raise ConfigError(f"{source}: layer_types must name sliding_attention or full_attention for each layer")
    return replace(
        cfg,
        norm_topk_prob=True,  # softmax over the top-k logits: the chosen experts' weights sum to 1
        full_attention_layers=tuple(i for i, kind in enumerate(kinds) if kind == "full_attention"),
        attention_sinks=True,
        router_bias=True,
        clamped_swiglu=ClampedSwiGLU(float(raw.get("swiglu_alpha", 1.702)), float(raw.get("swiglu_limit", 7.0))),
    )


def _grouped_routing(cfg: ModelConfig, raw: dict[str, Any], get: _Getter, source: str) -> GroupedRouting:
    if raw.get("topk_method", "noaux_tc") != "noaux_tc" or raw.get("scoring_func", "sigmoid") != "sigmoid":
        raise ConfigError(f"{source}: only sigmoid scoring with noaux_tc top-k (DeepSeek-V3's router) is supported")
    n_group, topk_group = get.int("n_group"), get.int("topk_group")
    if cfg.num_experts % n_group or not 1 <= topk_group <= n_group:
        raise ConfigError(f"{source}: n_routed_experts={cfg.num_experts}, n_group={n_group}, "
                          f"topk_group={topk_group}: groups must split the experts and 1 <= topk_group <= n_group")
    if cfg.num_experts // n_group < 2 or cfg.top_k > topk_group * (cfg.num_experts // n_group):
        raise ConfigError(f"{source}: each group needs >= 2 experts and top-k must fit in topk_group groups")
    return GroupedRouting(n_group, topk_group, float(raw.get("routed_scaling_factor", 1.0)))


def _glm4_moe(cfg: ModelConfig, raw: dict[str, Any], get: _Getter, source: str) -> ModelConfig:
    """GLM-4.5: DeepSeek-V3's router and shared experts over grouped-query attention with partial rotary."""
    first_dense = int(raw.get("first_k_dense_replace", 0) or 0)
    return replace(
        cfg,
        o_bias=False,  # attention_bias is q/k/v's only
        norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
        moe_layers=tuple(i >= first_dense for i in range(cfg.num_layers)),
        shared_intermediate_size=cfg.expert_intermediate_size * int(raw.get("n_shared_experts") or 0),
        grouped_routing=_grouped_routing(cfg, raw, get, source),
        rotary_dim=int(cfg.head_dim * _partial_rotary(raw)),
    )


def _partial_rotary(raw: dict[str, Any]) -> float:
    params = raw.get("rope_parameters") or {}
    return float(params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 0.5)))


def _deepseek(cfg: ModelConfig, raw: dict[str, Any], get: _Getter, source: str) -> ModelConfig:
    if cfg.attention_bias:
        raise ConfigError(f"{source}: attention_bias=true unsupported for DeepSeek-V3")
    q_lora = raw.get("q_lora_rank")
    mla = MLAShape(
        q_lora_rank=int(q_lora) if q_lora else None,
        kv_lora_rank=get.int("kv_lora_rank"),
        qk_nope_head_dim=get.int("qk_nope_head_dim"),
        qk_rope_head_dim=get.int("qk_rope_head_dim"),
        v_head_dim=get.int("v_head_dim"),
        rope_interleave=bool(raw.get("rope_interleave", True)),
    )
    first_dense = int(raw.get("first_k_dense_replace", 0) or 0)
    return replace(
        cfg,
        head_dim=mla.qk_rope_head_dim,  # what the rope rotates (as the reference sets head_dim)
        num_kv_heads=cfg.num_heads,
        norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
        moe_layers=tuple(i >= first_dense for i in range(cfg.num_layers)),
        shared_intermediate_size=cfg.expert_intermediate_size * int(raw.get("n_shared_experts") or 0),
        grouped_routing=_grouped_routing(cfg, raw, get, source),
        mla=mla,
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
        theta = {"mixtral": 1e6, "gpt_oss": 1.5e5}.get(family, 1e4)
    return float(theta)


def _yarn(raw: dict[str, Any], source: str) -> Yarn | None:
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return None
    if kind != "yarn":
        raise ConfigError(f"{source}: rope_type={kind!r} unsupported (default RoPE or yarn)")
    if raw.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConfigError(f"{source}: partial_rotary_factor with yarn unsupported")

    def opt(key: str) -> float | None:
        return None if params.get(key) is None else float(params[key])

    original = params.get("original_max_position_embeddings") or raw.get("max_position_embeddings", 4096)
    factor = params.get("factor") or raw.get("max_position_embeddings", 4096) / original
    return Yarn(factor=float(factor), original_max_position_embeddings=int(original),
                beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
                mscale=opt("mscale"), mscale_all_dim=opt("mscale_all_dim"),
                attention_factor=opt("attention_factor"), truncate=bool(params.get("truncate", True)))


def _sliding_window(raw: dict[str, Any], family: str) -> int | None:
    if family in ("deepseek_v3", "olmoe", "glm4_moe"):
        return None
    if family not in ("mixtral", "gpt_oss") and not raw.get("use_sliding_window"):
        return None
    sliding = raw.get("sliding_window")
    return int(sliding) if sliding else None


def _moe_layers(raw: dict[str, Any], family: str, num_layers: int, num_experts: int) -> tuple[bool, ...]:
    """Per layer: sparse? Mixtral and OLMoE: all; Qwen: mlp_only_layers and decoder_sparse_step
    (first_k_dense_replace is applied in `_deepseek` and `_glm4_moe`)."""
    if family in ("mixtral", "olmoe", "deepseek_v3", "glm4_moe", "gpt_oss"):
        return (True,) * num_layers
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
