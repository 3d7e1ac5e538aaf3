"""What is being served and how hard: the model's shape and the workload. Pure.

Units are in the names: _bytes, _flops (floating-point operations, multiply-add = 2), _s.
Shape legend: T tokens, K top-k, E routed experts, D hidden, F expert hidden, H heads, G KV heads,
Dh head dim; MLA (DeepSeek's latent attention): C kv_lora_rank, Dn / Dr / Dv the per-head nope,
rope and value dims, Q q_lora_rank.

Presets (`preset(name)`, `moemesh simulate --model NAME`): "paper" (the paper's model) and
"deepseek-v3" (DeepSeek-V3's real sizes, read through moemesh.model.config like a checkpoint's
config.json, so the preset and `--model DIR` take the same path).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moemesh.errors import ConfigError
from moemesh.model.config import GroupedRouting, MLAShape, config_from_dict
from moemesh.planner.cost import DTYPE_BYTES, ExpertShape

# deepseek-ai/DeepSeek-V3's config.json (Hugging Face spelling; the same sizes as the repository's
# inference/configs/config_671B.json). Weights as bf16: moemesh serves dequantized checkpoints, so
# the FP8 quantization_config is left out. The multi-token-prediction layer is not served.
DEEPSEEK_V3_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "first_k_dense_replace": 3,
    "num_attention_heads": 128, "num_key_value_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
    "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True, "q_lora_rank": 1536,
    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "vocab_size": 129280, "max_position_embeddings": 163840, "rope_theta": 10000, "hidden_act": "silu",
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "torch_dtype": "bfloat16",
}


@dataclass(frozen=True)
class ModelShape:
    """The sizes the cost model needs. Attention is grouped-query (kv_heads <= heads) or, with
    `mla`, multi-head latent attention. `moe_layer_ids` are the sparse layers (the others run a
    dense MLP of `dense_ff`: DeepSeek-V3's first_k_dense_replace). Only the E routed experts are
    placed and dispatched; `shared_ff` is the shared experts' hidden size (all of them together),
    dense work every rank runs for its own tokens. `grouped`: group-limited routing (a token's
    experts lie in at most topk_group of n_group groups)."""

    name: str
    layers: int
    moe_layer_ids: tuple[int, ...]
    experts: int  # E routed experts per MoE layer
    top_k: int  # K experts per token
    d_model: int  # D
    heads: int  # H
    kv_heads: int  # G
    head_dim: int  # Dh
    expert_ff: int  # F, hidden size of one expert's MLP
    expert_matrices: int  # 3 for SwiGLU (gate, up, down), 2 for a plain MLP (the paper's)
    dense_ff: int  # hidden size of the dense MLP of non-MoE layers
    vocab: int  # V (0: no embedding / lm head counted)
    dtype_bytes: int  # bytes per weight / activation element
    mla: MLAShape | None = None  # None: grouped-query attention
    shared_ff: int = 0  # Fs: hidden size of the shared expert(s), summed; 0 = none
    grouped: GroupedRouting | None = None  # None: top-k over all experts

    @property
    def expert(self) -> ExpertShape:
        """The planner's view of one expert (wire bytes per token, weight bytes, FLOPs per token)."""
        return ExpertShape(hidden_size=self.d_model, intermediate_size=self.expert_ff,
                           dtype_bytes=self.dtype_bytes, matrices=self.expert_matrices)

    @property
    def attn_params(self) -> int:
        """Weights of one attention block: Q, K, V and O projections. MLA: q_a (D x Q) and q_b
        (Q x H(Dn + Dr)) or one q_proj, kv_a (D x (C + Dr)), kv_b (C x H(Dn + Dv)), o (H Dv x D)."""
        D, H = self.d_model, self.heads
        if self.mla is None:
            q, kv = H * self.head_dim, self.kv_heads * self.head_dim
            return D * (q + 2 * kv) + q * D
        m = self.mla
        q_out = H * m.qk_head_dim
        q = D * m.q_lora_rank + m.q_lora_rank * q_out if m.q_lora_rank else D * q_out
        return q + D * m.cache_width + m.kv_lora_rank * H * (m.qk_nope_head_dim + m.v_head_dim) + H * m.v_head_dim * D

    @property
    def attn_weight_bytes(self) -> int:
        return self.attn_params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """Cache bytes one token of context adds per layer: K and V, or MLA's latent and shared
        rope'd key (C + Dr values, what moemesh.model.mla caches)."""
        if self.mla is not None:
            return self.mla.cache_width * self.dtype_bytes
        return 2 * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def shared_params(self) -> int:
        """Weights of one MoE layer's shared expert(s), SwiGLU: 3 x D x Fs."""
        return 3 * self.d_model * self.shared_ff

    @property
    def router_params(self) -> int:
        return self.d_model * self.experts

    @property
    def dense_layers(self) -> int:
        return self.layers - len(self.moe_layer_ids)

    @property
    def head_params(self) -> int:
        """The lm head (the embedding is a gather, not a matmul)."""
        return self.vocab * self.d_model

    def attention_flops(self, tokens: float, context: float, absorbed: bool = True) -> float:
        """FLOPs of one attention block for `tokens` queries each attending to `context` keys.

        MLA, absorbed (decode, as the engine runs it): every projection once per token (W_UK folds
        the query into latent space, W_UV maps the latent mix out: kv_b's weights, once per token),
        then per head scores over the cache (C + Dr) and a mix of latents (C) per key.
        MLA, unabsorbed (prefill): the same projections (kv_b expands each token's own latent),
        then per head scores over Dn + Dr and a mix of Dv per key."""
        per_key = 4.0 * self.head_dim
        if self.mla is not None:
            m = self.mla
            per_key = (2.0 * (m.cache_width + m.kv_lora_rank) if absorbed
                       else 2.0 * (m.qk_head_dim + m.v_head_dim))
        return tokens * (2.0 * self.attn_params + self.heads * per_key * context)

    @staticmethod
    def paper(top_k: int = 1) -> ModelShape:
        """The paper's model (paper.md, Experimental Setup): 4 layers, 16 experts, d_model 8192,
        expert MLP hidden 32768 with two linears (the paper's TP split: column- then row-parallel),
        MHA 16 heads x 512, FP16. The paper gives no vocabulary (lm head not counted) and no K: its
        own byte count (1024 x 10000 x 8192 x 2 bytes per layer) sends each token once, so K = 1."""
        return ModelShape(name="paper (4L, 16E, d 8192, ff 32768, fp16)", layers=4, moe_layer_ids=(0, 1, 2, 3),
                          experts=16, top_k=top_k, d_model=8192, heads=16, kv_heads=16, head_dim=512,
                          expert_ff=32768, expert_matrices=2, dense_ff=0, vocab=0, dtype_bytes=2)

    @staticmethod
    def from_config(cfg: Any, name: str = "", dtype_bytes: int | None = None) -> ModelShape:
        """From a moemesh.model.config.ModelConfig, any family it reads (SwiGLU experts; MLA,
        shared experts, dense layers first and grouped routing are fields there and here); dtype
        from the checkpoint unless given (the CPU engine computes in fp32: 4)."""
        return ModelShape(
            name=name or f"{cfg.family} {cfg.num_layers}L {cfg.num_experts}E d{cfg.hidden_size}",
            layers=cfg.num_layers, moe_layer_ids=tuple(cfg.moe_layer_ids), experts=cfg.num_experts,
            top_k=cfg.top_k, d_model=cfg.hidden_size, heads=cfg.num_heads, kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim, expert_ff=cfg.expert_intermediate_size, expert_matrices=3,
            dense_ff=cfg.dense_intermediate_size, vocab=cfg.vocab_size,
            dtype_bytes=dtype_bytes or DTYPE_BYTES.get(cfg.torch_dtype, 2),
            mla=cfg.mla, shared_ff=cfg.shared_intermediate_size, grouped=cfg.grouped_routing,
        )

    @staticmethod
    def deepseek_v3() -> ModelShape:
        """DeepSeek-V3 (671B): 61 layers (3 dense first), D 7168, MLA with 128 heads, 256 routed
        experts of F 2048 plus 1 shared, top-8 in 4 of 8 groups, vocabulary 129280, bf16."""
        return ModelShape.from_config(config_from_dict(DEEPSEEK_V3_CONFIG, source="deepseek-v3 preset"),
                                      name="DeepSeek-V3 (61L, 256E + 1 shared, top-8 of 4/8 groups, MLA, bf16)")


PRESETS = {"paper": ModelShape.paper, "deepseek-v3": ModelShape.deepseek_v3}


def preset(name: str) -> ModelShape:
    """A named model shape (PRESETS); ConfigError for any other name."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]()


PHASES = ("decode", "prefill")


@dataclass(frozen=True)
class Workload:
    """One forward step over the whole deployment.

    decode: `batch` sequences each add one token, attending to `seq` tokens of context.
    prefill: `batch` sequences of `seq` prompt tokens run at once (causal attention).
    `micro_batches` splits the step so that one part's exchanges overlap another's compute
    (0 = let the simulator pick the faster of 1 and 2).
    """

    batch: int
    seq: int
    phase: str = "decode"
    micro_batches: int = 1

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ConfigError(f"phase must be one of {PHASES}, got {self.phase!r}")
        if self.batch < 1 or self.seq < 1 or self.micro_batches < 0:
            raise ConfigError(f"batch and seq must be >= 1 and micro_batches >= 0, got {self.batch}, {self.seq}, "
                              f"{self.micro_batches}")

    @property
    def tokens(self) -> int:
        """Tokens the step runs through the model, all devices."""
        return self.batch if self.phase == "decode" else self.batch * self.seq

    @property
    def context(self) -> float:
        """Keys each query attends to, on average (half the prompt for causal prefill)."""
        return float(self.seq) if self.phase == "decode" else (self.seq + 1) / 2
