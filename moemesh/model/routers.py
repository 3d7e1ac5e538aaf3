"""The routers: the first seam of the MoE layer (moemesh.model.moe), one per family's rule.

Shape legend: T tokens, K experts per token (top-k), E experts per layer, G expert groups.

`SoftmaxTopKRouter` (Mixtral, Qwen, OLMoE), `TopKSoftmaxRouter` (GPT-OSS: biased logits, softmax
over the top-k) and `GroupedSigmoidRouter` (DeepSeek-V3, GLM-4.5). Each takes a layer's hidden
states and router weight and returns a `Routing`; each applies the load-aware gating factors of the
placement in force (`factors`, selection only) and the capacity overflow policy of its worker.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from moemesh.model.config import GroupedRouting
from moemesh.model.moe import Routing
from moemesh.model.overflow import OVERFLOW_POLICIES, enforce_capacity, expert_capacity


class SoftmaxTopKRouter:
    """softmax over all experts in fp32, top-k, optional renormalisation (Mixtral always does).

    `factors[layer]` (E,) is the paper's load-aware gating (policy "gating"): experts are
    *selected* by probability x factor, but combined with the model's own probabilities. With no
    factors for a layer the routing is exactly the model's. Set between steps only.
    """

    def __init__(self, top_k: int, normalize: bool, overflow: str = "dropless", capacity_factor: float = 1.2):
        assert overflow in OVERFLOW_POLICIES, f"unknown overflow policy {overflow!r}"
        self.top_k = top_k
        self.normalize = normalize
        self.overflow = overflow
        self.capacity_factor = capacity_factor
        self.factors: dict[int, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, layer: int) -> Routing:
        logits = F.linear(x, weight)  # (T, E)
        probs = torch.softmax(logits.float(), dim=-1)  # (T, E)
        factors = self.factors.get(layer)
        if factors is None:
            top_p, top_i = torch.topk(probs, self.top_k, dim=-1)  # (T, K)
        else:
            top_i = torch.topk(probs * factors, self.top_k, dim=-1).indices  # (T, K) adjusted choice
            top_p = torch.gather(probs, 1, top_i)  # (T, K) the model's own probabilities
        if self.overflow != "dropless":
            top_i, top_p = _apply_overflow(top_i, probs, self.top_k, self.overflow, self.capacity_factor)
        if self.normalize:  # (a token whose every copy was dropped keeps zero weights)
            top_p = top_p / top_p.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(top_p.dtype).tiny)
        return Routing(expert_ids=top_i, weights=top_p.to(x.dtype))


class TopKSoftmaxRouter(SoftmaxTopKRouter):
    """GPT-OSS's router: logits from a biased linear, the top-k logits, a softmax over those k
    (the reference's operations, so its weights to the last bit). `biases[layer]` (E,) is the
    router's bias. With gating factors or an overflow policy, experts are chosen like
    `SoftmaxTopKRouter` (by probability, x factor) and weighted by the softmax over the chosen
    experts' logits, which is the same value computed the same way in the default case."""

    def __init__(self, top_k: int, biases: Mapping[int, torch.Tensor], overflow: str = "dropless",
                 capacity_factor: float = 1.2):
        super().__init__(top_k, True, overflow, capacity_factor)
        self.biases = dict(biases)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, layer: int) -> Routing:
        logits = F.linear(x, weight, self.biases.get(layer)).float()  # (T, E)
        factors = self.factors.get(layer)
        if factors is None:
            top_logits, top_i = torch.topk(logits, self.top_k, dim=-1)  # (T, K)
        else:
            top_i = torch.topk(torch.softmax(logits, dim=-1) * factors, self.top_k, dim=-1).indices  # (T, K)
            top_logits = torch.gather(logits, 1, top_i)  # (T, K)
        top_w = torch.softmax(top_logits, dim=-1)  # (T, K)
        if self.overflow != "dropless":  # like SoftmaxTopKRouter: renormalised over the copies kept
            top_i, top_p = _apply_overflow(top_i, torch.softmax(logits, dim=-1), self.top_k, self.overflow,
                                           self.capacity_factor)  # (T, K), a dropped copy (-1) at zero
            top_w = top_p / top_p.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(top_p.dtype).tiny)  # (T, K)
        return Routing(expert_ids=top_i, weights=top_w.to(x.dtype))


def _apply_overflow(top_i: torch.Tensor, probs: torch.Tensor, top_k: int, policy: str, capacity_factor: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """top_i (T, K), probs (T, E) -> (T, K) ids after the overflow policy (-1 = dropped), (T, K) their probs."""
    T, E = probs.shape
    top_i = enforce_capacity(top_i, probs, expert_capacity(T, top_k, E, capacity_factor), policy)  # (T, K)
    return top_i, torch.gather(probs, 1, top_i.clamp(min=0)) * (top_i >= 0)  # (T, K)


class GroupedSigmoidRouter:
    """DeepSeek-V3's router: sigmoid scores, a selection-only bias, group-limited top-k.

    The same torch operations as the reference (`DeepseekV3TopkRouter`), in the same order, so ties
    break exactly as torch.topk breaks them there. `biases[layer]` (E,) is the layer's
    e_score_correction_bias; `factors[layer]` (E,) the load-aware gating factors, which scale the
    selection scores only, like the bias.
    """

    def __init__(self, top_k: int, grouping: GroupedRouting, normalize: bool, biases: Mapping[int, torch.Tensor],
                 overflow: str = "dropless", capacity_factor: float = 1.2):
        assert overflow in OVERFLOW_POLICIES, f"unknown overflow policy {overflow!r}"
        self.top_k = top_k
        self.grouping = grouping
        self.normalize = normalize
        self.biases = dict(biases)
        self.overflow = overflow
        self.capacity_factor = capacity_factor
        self.factors: dict[int, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, layer: int) -> Routing:
        G, kept = self.grouping.n_group, self.grouping.topk_group
        # Step 1: sigmoid scores in fp32.
        scores = F.linear(x.float(), weight.float()).sigmoid()  # (T, E)
        T, E = scores.shape
        # Step 2: the selection score adds the correction bias (and any gating factors).
        choice = scores + self.biases[layer].float() if layer in self.biases else scores  # (T, E)
        if layer in self.factors:
            choice = choice * self.factors[layer]
        # Step 3: a group's score is the sum of its two best selection scores; keep topk_group groups.
        group_scores = choice.view(T, G, E // G).topk(2, dim=-1)[0].sum(dim=-1)  # (T, G)
        group_idx = torch.topk(group_scores, k=kept, dim=-1, sorted=False)[1]  # (T, topk_group)
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)  # (T, G)
        expert_mask = group_mask.unsqueeze(-1).expand(-1, G, E // G).reshape(T, E)  # (T, E)
        choice = choice.masked_fill(~expert_mask.bool(), float("-inf"))  # (T, E)
        # Step 4: top-k experts among the kept groups.
        top_i = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]  # (T, K)
        # Step 5: weights from the unbiased scores, normalised, times routed_scaling_factor.
        top_w = scores.gather(1, top_i)  # (T, K)
        if self.overflow != "dropless":
            top_i, top_w = _apply_overflow(top_i, scores, self.top_k, self.overflow, self.capacity_factor)
        if self.normalize:
            top_w = top_w / (top_w.sum(dim=-1, keepdim=True) + 1e-20)
        top_w = top_w * self.grouping.routed_scaling_factor
        return Routing(expert_ids=top_i, weights=top_w.to(x.dtype))
