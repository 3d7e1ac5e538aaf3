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
    ids after the policy; -1 = dropped. Host syncs: one to learn whether anything overflows;
    "reroute" then brings its inputs to the host once and sends the result back once."""
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
    if policy == "drop":
        return flat.masked_fill(over, -1).view(T, K)  # (T, K)
    ranking = torch.argsort(probs, dim=1, descending=True)  # (T, E)
    host = to_host(torch.cat([flat, over.long(), ranking.reshape(-1)]))  # (2*T*K + T*E,) one copy
    ids, overflowing = host[: T * K], host[T * K : 2 * T * K]
    ranks = [host[2 * T * K + t * E : 2 * T * K + (t + 1) * E] for t in range(T)]  # T lists of E
    rerouted = reroute(ids, [bool(o) for o in overflowing], ranks, capacity, K, E)
    return to_device(rerouted, expert_ids.device).view(T, K)  # (T, K)


def reroute(ids: list[int], over: list[bool], ranking: list[list[int]], capacity: int, K: int, E: int) -> list[int]:
    """Host lists: ids (T*K) token-major expert ids, over (T*K) whether each copy overflowed,
    ranking (T lists of E) each token's experts best first -> new ids (T*K): each overflowing
    copy gets the best expert with room that its token lacks, or -1."""
    # Step 1: overflowing copies leave their expert; count what each expert admitted.
    out = [-1 if o else e for e, o in zip(ids, over)]
    load = [0] * E
    for e in out:
        if e >= 0:
            load[e] += 1
    # Step 2: in token order, each overflowing copy takes the next-best expert with room.
    for c in (c for c, o in enumerate(over) if o):
        t = c // K
        taken = set(out[t * K : (t + 1) * K])
        for e in ranking[t]:
            if e not in taken and load[e] < capacity:
                out[c] = e
                load[e] += 1
                break
    return out


def to_host(t: torch.Tensor) -> list[int]:
    """The one device -> host copy of a reroute."""
    return t.tolist()


def to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """The one host -> device copy of a reroute."""
    return torch.tensor(values, dtype=torch.int64, device=device)
