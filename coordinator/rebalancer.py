"""Turning load reports into new placement epochs, per balancing policy. Pure: no gRPC.

The coordinator calls `observe` for every load report; a returned placement is published as the
next epoch (workers prepare it in the background and switch at one step). Policy "gating"
updates the gating factors every `update_every_tokens` routed tokens (100, the paper's period)
from the last `window_cycles` updates' counts.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace

import torch

from coordinator.balancing import POLICIES, GatingSettings, gating_update
from moemesh.errors import ConfigError
from moemesh.mesh.placement import Placement


@dataclass(frozen=True)
class RebalanceSettings:
    policy: str = "none"
    update_every_tokens: int = 100
    window_cycles: int = 3
    gating: GatingSettings = GatingSettings()

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"--policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.update_every_tokens < 1:
            raise ConfigError(f"--rebalance-every must be >= 1 token, got {self.update_every_tokens}")


class Rebalancer:
    def __init__(self, settings: RebalanceSettings, moe_layer_ids: tuple[int, ...], num_experts: int):
        self.s = settings
        self.layers = moe_layer_ids
        self.num_experts = num_experts
        self._pending = torch.zeros(len(moe_layer_ids), num_experts, dtype=torch.int64)  # (L, E)
        self._pending_tokens = 0
        self._recent: deque[torch.Tensor] = deque(maxlen=settings.window_cycles)

    def observe(self, window_tokens: int, counts: torch.Tensor, current: Placement) -> Placement | None:
        """counts: (L, E) one worker's report. Returns the next placement (epoch unassigned) or None."""
        if self.s.policy != "gating":
            return None
        self._pending += counts
        self._pending_tokens += window_tokens
        if self._pending_tokens < self.s.update_every_tokens:
            return None
        self._recent.append(self._pending)
        self._pending = torch.zeros_like(self._pending)
        self._pending_tokens = 0
        factors = torch.tensor([current.gating.get(layer, (1.0,) * self.num_experts) for layer in self.layers])
        new = gating_update(factors, sum(self._recent), self.s.gating)  # (L, E)
        if torch.allclose(new, factors):
            return None
        gating = {layer: tuple(float(f) for f in new[i]) for i, layer in enumerate(self.layers)}
        return replace(current, gating=gating, origin="gating")
