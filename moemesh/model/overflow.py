"""Expert capacity overflow: what happens to token copies beyond an expert's capacity in a step.

Pure routing policy (no communication). Shape legend: T tokens, K top-k, E experts.
- "dropless" (default): nothing; every copy runs (what shipping systems do).
- "reroute": an overflowing copy goes to the token's next-best expert that still has room
  (its combine weight becomes that expert's own probability); if none has room it is dropped.
- "drop": an overflowing copy is dropped (expert id -1): it is never sent or computed, and
  contributes nothing to its token's output.
Capacity = ceil(capacity_factor x T x K / E) copies per expert (the paper: 1.2 x average).
Copies are admitted in token order, so earlier tokens of the step keep their experts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

OVERFLOW_POLICIES = ("dropless", "reroute", "drop")


def expert_capacity(tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    return max(1, math.ceil(capacity_factor * tokens * top_k / num_experts))


def enforce_capacity(expert_ids: torch.Tensor, probs: torch.Tensor, capacity: int, policy: str) -> torch.Tensor:
    """expert_ids: (T, K) chosen experts, probs: (T, E) router probabilities -> (T, K) expert
    ids after the policy; -1 = dropped."""
    assert policy in OVERFLOW_POLICIES, f"unknown overflow policy {policy!r}"
    if policy == "dropless" or expert_ids.numel() == 0:
        return expert_ids
    T, K = expert_ids.shape
    E = probs.shape[1]
    flat = expert_ids.reshape(-1)  # (T*K,) token-major order
    onehot = F.one_hot(flat, E)  # (T*K, E)
    position = (onehot.cumsum(0) * onehot).sum(dim=1) - 1  # (T*K,) place in its expert's queue
    over = position >= capacity  # (T*K,)
    if not bool(over.any()):
        return expert_ids
    out = flat.clone()
    out[over] = -1
    if policy == "reroute":
        _reroute(out, over, probs, capacity, K)
    return out.view(T, K)


def _reroute(out: torch.Tensor, over: torch.Tensor, probs: torch.Tensor, capacity: int, K: int) -> None:
    """In place: give each overflowing copy the best expert with room that its token lacks."""
    E = probs.shape[1]
    load = torch.bincount(out[out >= 0], minlength=E).tolist()  # (E,) admitted copies
    ranking = torch.argsort(probs, dim=1, descending=True).tolist()  # (T, E)
    for c in torch.nonzero(over).squeeze(1).tolist():
        t = c // K
        taken = set(out[t * K : (t + 1) * K].tolist())
        for e in ranking[t]:
            if e not in taken and load[e] < capacity:
                out[c] = e
                load[e] += 1
                break
