"""What is being served and how hard: the model's shape and the workload. Pure.

Units are in the names: _bytes, _flops (floating-point operations, multiply-add = 2), _s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moemesh.errors import ConfigError
from moemesh.planner.cost import DTYPE_BYTES, ExpertShape


@dataclass(frozen=True)
class ModelShape:
    """The sizes the cost model needs; attention is grouped-query (kv_heads <= heads)."""

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

    @property
    def expert(self) -> ExpertShape:
        """The planner's view of one expert (wire bytes per token, weight bytes, FLOPs per token)."""
        return ExpertShape(hidden_size=self.d_model, intermediate_size=self.expert_ff,
                           dtype_bytes=self.dtype_bytes, matrices=self.expert_matrices)

    @property
    def attn_params(self) -> int:
        """Weights of one attention block: Q, K, V and O projections."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return self.d_model * (q + 2 * kv) + q * self.d_model

    @property
    def attn_weight_bytes(self) -> int:
        return self.attn_params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """Cache bytes one token of context adds per layer (K and V)."""
        return 2 * self.kv_heads * self.head_dim * self.dtype_bytes

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

    def attention_flops(self, tokens: float, context: float) -> float:
        """FLOPs of one attention block for `tokens` queries each attending to `context` keys."""
        return tokens * (2.0 * self.attn_params + 4.0 * self.heads * self.head_dim * context)

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
        """From a moemesh.model.config.ModelConfig (SwiGLU experts); dtype from the checkpoint
        unless given (the CPU engine computes in fp32: 4)."""
        return ModelShape(
            name=name or f"{cfg.family} {cfg.num_layers}L {cfg.num_experts}E d{cfg.hidden_size}",
            layers=cfg.num_layers, moe_layer_ids=tuple(cfg.moe_layer_ids), experts=cfg.num_experts,
            top_k=cfg.top_k, d_model=cfg.hidden_size, heads=cfg.num_heads, kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim, expert_ff=cfg.expert_intermediate_size, expert_matrices=3,
            dense_ff=cfg.dense_intermediate_size, vocab=cfg.vocab_size,
            dtype_bytes=dtype_bytes or DTYPE_BYTES.get(cfg.torch_dtype, 2),
        )


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
