"""Expert capacity overflow: what happens to token copies beyond an expert's capacity in a step.

Pure routing policy (no communication). Shape legend: T tokens, K top-k, E experts,
C = T*K token copies in token-major order.
- "dropless" (default): nothing; every copy runs (what shipping systems do).
- "reroute": an overflowing copy goes to the token's next-best expert that still has room
  (its combine weight becomes that expert's own probability); if none has room it is dropped.
- "drop": an overflowing copy is dropped (expert id -1): it is never sent or computed, and
  contributes nothing to its token's output.
Capacity = ceil(capacity_factor x T x K / E) copies per expert (the paper: 1.2 x average).
Copies are admitted in token order, so earlier tokens of the step keep their experts.

No host syncs: every policy is device-side tensor ops whose shapes and loop bounds depend only on
(T, K, E), never on the routing, so the step path's one read-back stays the transport's.
"""

from __future__ import annotations

import math

import torch

OVERFLOW_POLICIES = ("dropless", "reroute", "drop")


def expert_capacity(tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    return max(1, math.ceil(capacity_factor * tokens * top_k / num_experts))


def enforce_capacity(expert_ids: torch.Tensor, probs: torch.Tensor, capacity: int, policy: str) -> torch.Tensor:
    """expert_ids: (T, K) chosen experts in [0, E), probs: (T, E) router probabilities -> (T, K)
    expert ids after the policy; -1 = dropped. No host sync."""
    assert policy in OVERFLOW_POLICIES, f"unknown overflow policy {policy!r}"
    if policy == "dropless" or expert_ids.numel() == 0:
        return expert_ids
    T, K = expert_ids.shape
    flat = expert_ids.reshape(-1)  # (C,) token-major order
    over = queue_positions(flat, probs.shape[1]) >= capacity  # (C,)
    if policy == "drop":
        return flat.masked_fill(over, -1).view(T, K)  # (T, K)
    return reroute(expert_ids, over.view(T, K), probs, capacity)  # (T, K)


def queue_positions(flat: torch.Tensor, num_experts: int) -> torch.Tensor:
    """flat: (C,) expert ids in [0, E) -> (C,) each copy's place in its expert's queue, copies
    queued in their order in `flat`."""
    # Step 1: sort the copies by expert, stably: within an expert they stay in token order.
    order = torch.argsort(flat, stable=True)  # (C,)
    # Step 2: where each expert's run starts in the sorted order.
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)  # (E,)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # (E,)
    starts = torch.cumsum(counts, 0) - counts  # (E,)
    # Step 3: a copy's place = its row in the sorted order minus its expert's start.
    ranked = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]  # (C,) in sorted order
    return torch.empty_like(flat).scatter_(0, order, ranked)  # (C,) scatter back to copy order


def reroute(expert_ids: torch.Tensor, over: torch.Tensor, probs: torch.Tensor, capacity: int) -> torch.Tensor:
    """expert_ids: (T, K), over: (T, K) bool copies beyond capacity, probs: (T, E) -> (T, K).

    The semantics are a greedy in token order: each token's overflowing copies, in order, take the
    best experts (by probs) with room that the token does not already hold; -1 when none has room.
    It runs here in rounds. A round lets every waiting token pick its best experts with room at the
    round's start, then keeps the picks of the tokens before the first one that picked an expert
    earlier tokens of the round filled: those equal the greedy's (their picks all still had room in
    their turn, and the best picks of a set are the best of any subset holding them). Every round
    but the last fills an expert that had room, and keeps at least one token, so min(E - 1, T - 1)
    rounds always suffice (token 0 never overflows; one expert overflowed, so at most E - 1 have
    room); a token still waiting after them finds every expert full, and gets -1.
    """
    T, E = probs.shape
    ranking = torch.argsort(probs, dim=1, descending=True)  # (T, E) each token's experts, best first
    # Step 1: the overflowing copies leave their experts; what room the admitted ones leave.
    kept = expert_ids.masked_fill(over, E)  # (T, K), E = no expert
    held = torch.zeros(T, E + 1, dtype=torch.bool, device=kept.device).scatter_(1, kept, True)[:, :E]  # (T, E)
    admitted = torch.zeros(E + 1, dtype=torch.int64, device=kept.device)  # (E + 1,)
    room = capacity - admitted.scatter_add_(0, kept.reshape(-1), torch.ones_like(kept).reshape(-1))[:E]  # (E,)
    # Step 2: what each token wants: how many experts, from which (in its ranking order).
    wanted = over.sum(1)  # (T,)
    allowed = ~torch.gather(held, 1, ranking)  # (T, E) rank order: experts the token lacks
    # Step 3: the rounds.
    chosen = torch.zeros(T, E, dtype=torch.bool, device=kept.device)  # (T, E) rank order
    waiting = wanted > 0  # (T,)
    for _ in range(min(E - 1, T - 1)):
        picks = best_with_room(allowed & waiting.unsqueeze(1) & (room[ranking] > 0), wanted)  # (T, E) rank order
        takes = torch.zeros_like(picks).scatter_(1, ranking, picks)  # (T, E) by expert
        keep = waiting & still_had_room(takes, room)  # (T,)
        chosen |= picks & keep.unsqueeze(1)  # (T, E)
        room = room - (takes & keep.unsqueeze(1)).sum(0)  # (E,)
        waiting = waiting & ~keep  # (T,)
    # Step 4: the chosen experts, best first, go to the token's overflowing copies in order.
    return assign(expert_ids, over, ranking, chosen)  # (T, K)


def best_with_room(open_: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """open_: (T, E) bool in rank order, wanted: (T,) -> (T, E) the first wanted[t] open ones."""
    return open_ & (torch.cumsum(open_, dim=1) <= wanted.unsqueeze(1))  # (T, E)


def still_had_room(takes: torch.Tensor, room: torch.Tensor) -> torch.Tensor:
    """takes: (T, E) bool this round's picks by expert, room: (E,) -> (T,) the tokens before the
    first whose pick finds its expert already filled by earlier tokens of the round."""
    T = takes.shape[0]
    beyond = (takes & (torch.cumsum(takes, dim=0) > room)).any(dim=1)  # (T,)
    token = torch.arange(T, device=takes.device)  # (T,)
    first = torch.where(beyond, token, T).amin()  # () T when every pick had room
    return token < first  # (T,)


def assign(expert_ids: torch.Tensor, over: torch.Tensor, ranking: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """chosen: (T, E) bool in rank order, at most over[t].sum() per token -> (T, K): the j-th
    overflowing copy of a token gets its j-th chosen expert, or -1 if it has fewer."""
    T, K = expert_ids.shape
    slot = torch.where(chosen, torch.cumsum(chosen, dim=1) - 1, K)  # (T, E) j, or K = not chosen
    nth = torch.full((T, K + 1), -1, dtype=expert_ids.dtype, device=expert_ids.device)  # (T, K + 1)
    nth.scatter_(1, slot, torch.where(chosen, ranking, -1))  # (T, K + 1) column K collects the rest
    copy = torch.cumsum(over, dim=1) - 1  # (T, K) j of each overflowing copy
    rerouted = torch.gather(nth, 1, copy.clamp(min=0))  # (T, K)
    return torch.where(over, rerouted, expert_ids)  # (T, K)
