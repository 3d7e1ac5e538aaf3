"""Statistics of a router's load and of how a balancing policy changes a model's choices. Pure:
tensors and token lists in, numbers out (scripts/bench_trained.py measures; docs/balancing.md).

- `max_over_mean`, `gini`: how uneven a load is (per row: a layer's experts, or a mesh's devices);
- `windowed`: per-step counts summed over consecutive windows (how the load moves over a generation);
- `changed_copies`: which share of token copies two routings of the same tokens send to different
  experts (gated vs exact, per layer);
- `greedy_agreement`: how many greedy tokens two runs of the same prompts share.

Shape legend: N steps, W windows, L MoE layers, E experts, T tokens, K top-k.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def max_over_mean(counts: torch.Tensor) -> torch.Tensor:
    """counts: (..., E) -> (...) the largest load over the mean one (1.0 = perfectly even; 0 for
    an empty row)."""
    c = counts.double()
    return c.amax(dim=-1) / c.mean(dim=-1).clamp(min=1e-12)


def gini(counts: torch.Tensor) -> torch.Tensor:
    """counts: (..., E) non-negative -> (...) the Gini coefficient of each row: 0 when every entry
    is equal, (E - 1) / E when one entry holds everything (0 for an empty row).

    G = sum_i (2 i - E - 1) x_(i) / (E sum x), x_(i) sorted ascending, i = 1..E."""
    x = torch.sort(counts.double(), dim=-1).values  # (..., E) ascending
    E = x.shape[-1]
    rank = torch.arange(1, E + 1, dtype=torch.float64, device=x.device)  # (E,)
    weighted = ((2 * rank - E - 1) * x).sum(dim=-1)  # (...)
    return weighted / (E * x.sum(dim=-1)).clamp(min=1e-12)


def windowed(per_step: torch.Tensor, window: int) -> torch.Tensor:
    """per_step: (N, ...) counts of each step -> (N // window, ...) their sums over consecutive
    windows of `window` steps; a last partial window is left out (its load is not comparable)."""
    if window < 1:
        raise ValueError(f"a window holds at least one step, got {window}")
    W = per_step.shape[0] // window
    return per_step[: W * window].reshape(W, window, *per_step.shape[1:]).sum(dim=1)  # (W, ...)


def changed_copies(exact: torch.Tensor, other: torch.Tensor) -> float:
    """exact, other: (T, K) expert ids of the same tokens (-1 = dropped) -> the share of the
    T*K token copies that `other` sends to an expert `exact` did not choose for that token
    (order within a token's K choices does not matter; a dropped copy counts as changed)."""
    if exact.shape != other.shape:
        raise ValueError(f"routings of different shapes: {tuple(exact.shape)} and {tuple(other.shape)}")
    if exact.numel() == 0:
        return 0.0
    same = (other.unsqueeze(2) == exact.unsqueeze(1)) & (other.unsqueeze(2) >= 0)  # (T, K, K)
    kept = same.any(dim=2)  # (T, K) copies of `other` that `exact` also made
    return 1.0 - float(kept.double().mean())


@dataclass(frozen=True)
class Agreement:
    """Greedy tokens of one run against a reference run of the same prompts."""

    matching: int  # positions where both made the same token
    lengths: tuple[int, ...]  # per prompt: positions compared (the reference's length)
    first_divergence: tuple[int, ...]  # per prompt: the first differing position (its length if none)

    @property
    def total(self) -> int:
        return sum(self.lengths)

    @property
    def share(self) -> float:
        return self.matching / max(1, self.total)

    @property
    def identical(self) -> int:
        """Prompts whose whole continuation is the reference's."""
        return sum(1 for d, n in zip(self.first_divergence, self.lengths) if d == n)


def greedy_agreement(reference: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> Agreement:
    """Token by token, per prompt, over the reference's lengths (a missing token of `other` differs)."""
    if len(reference) != len(other):
        raise ValueError(f"{len(reference)} reference continuations, {len(other)} to compare")
    matching, firsts = 0, []
    for ref, out in zip(reference, other):
        same = [i < len(out) and out[i] == tok for i, tok in enumerate(ref)]
        matching += sum(same)
        firsts.append(same.index(False) if False in same else len(ref))
    return Agreement(matching, tuple(len(r) for r in reference), tuple(firsts))
