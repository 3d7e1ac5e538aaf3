"""The "gating" balancing policy: the paper's load-aware gating (../shared/paper.md, section 2).
Pure: no gRPC, no torch.distributed; inputs in, new values out.

Per MoE layer and expert a factor f_e multiplies the gate probability when experts are selected
(the combine weights stay the model's probabilities, so only *which* experts run changes: outputs
differ from the exact model, by how much is measured in tests/coordinator/test_gating.py). The
policies and how one is chosen: coordinator/policies.py.

Shape legend: L MoE layers, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moemesh.errors import ConfigError

GATING_RULES = ("ours", "paper")  # gating_update, paper_literal_update


@dataclass(frozen=True)
class GatingSettings:
    capacity_factor: float = 1.2  # capacity = 1.2 x mean load (the paper)
    threshold: float = 1.2  # adjust only while the most loaded expert exceeds 1.2 x mean
    slope: float = 0.5  # target factor = max(floor, 1 - slope * load)
    floor: float = 0.1
    max_step: float = 0.1  # at most +-10% per update cycle
    rule: str = "ours"  # "ours": gating_update; "paper": the literal rule (paper_literal_update), to compare

    def __post_init__(self) -> None:
        if self.rule not in GATING_RULES:
            raise ConfigError(f"--gating-rule must be one of {', '.join(GATING_RULES)}, got {self.rule!r}")


def update_factors(factors: torch.Tensor, counts: torch.Tensor, s: GatingSettings = GatingSettings()) -> torch.Tensor:
    """factors: (L, E), counts: (L, E) -> new factors (L, E) by the rule `s.rule` names."""
    if s.rule == "paper":
        return paper_literal_update(factors, counts, s)
    return gating_update(factors, counts, s)


def gating_update(factors: torch.Tensor, counts: torch.Tensor, s: GatingSettings = GatingSettings()) -> torch.Tensor:
    """factors: (L, E) float, counts: (L, E) int64 tokens per expert in the recent window ->
    new factors (L, E): one update cycle, per layer.

    The paper's parameters with integral action. The paper sets f_e to a target
    max(0.1, 1 - 0.5 load_e) (moved +-10% per cycle); that target depends on the load alone, so
    once the factors balance the load they drift back and the load with them: the literal rule
    has no balanced fixed point (measured on the same skewed router: it hovers at max/mean ~1.5
    where this one settles under 1.2 within 11 cycles; tests/coordinator/test_gating.py). Here the
    same target is read as a correction relative to a balanced expert's and *multiplies* f_e, so a
    correction persists.
    """
    counts = counts.double()
    mean = counts.mean(dim=1, keepdim=True).clamp(min=1e-9)  # (L, 1)
    # Step 1: load relative to capacity (1.2 x mean), as the paper defines it.
    load = counts / (s.capacity_factor * mean)  # (L, E)
    # Step 2: the paper's target, relative to the target of an expert at exactly the mean load.
    target = (1.0 - s.slope * load).clamp(min=s.floor)  # (L, E)
    at_mean = 1.0 - s.slope / s.capacity_factor
    correction = (target / at_mean).clamp(1.0 - s.max_step, 1.0 + s.max_step)  # +-10% per cycle
    # Step 3: only layers whose most loaded expert exceeds the threshold are corrected.
    imbalanced = counts.max(dim=1, keepdim=True).values > s.threshold * mean  # (L, 1)
    new = torch.where(imbalanced, factors.double() * correction, factors.double())
    # Step 4: factors are relative: the largest is 1, none below the floor.
    new = (new / new.max(dim=1, keepdim=True).values).clamp(min=s.floor)
    return new.float()


def paper_literal_update(
    factors: torch.Tensor, counts: torch.Tensor, s: GatingSettings = GatingSettings()
) -> torch.Tensor:
    """The paper's rule as written (for comparison): f_e moves <= 0.1 toward
    max(0.1, 1 - 0.5 load_e) while imbalanced, else toward 1."""
    counts = counts.double()
    mean = counts.mean(dim=1, keepdim=True).clamp(min=1e-9)
    target = (1.0 - s.slope * counts / (s.capacity_factor * mean)).clamp(min=s.floor)
    imbalanced = counts.max(dim=1, keepdim=True).values > s.threshold * mean
    goal = torch.where(imbalanced, target, torch.ones_like(target))
    return (factors.double() + (goal - factors.double()).clamp(-s.max_step, s.max_step)).float()


def imbalance(counts: torch.Tensor) -> torch.Tensor:
    """counts: (L, E) -> (L,) max / mean expert load per layer (1.0 = perfectly even)."""
    c = counts.double()
    return c.max(dim=1).values / c.mean(dim=1).clamp(min=1e-9)
