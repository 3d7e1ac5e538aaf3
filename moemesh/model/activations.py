"""The experts' activation, chosen once at build time from the config (no family branches later).

Shape legend: n token copies an expert computes, F expert hidden (its held width).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from moemesh.model.config import ClampedSwiGLU

Activation = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (gate (n, F), up (n, F)) -> (n, F)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class ClampedSwiGLUActivation:
    """GPT-OSS's expert activation (the reference's `_apply_gate`, on de-interleaved gate and up)."""

    def __init__(self, shape: ClampedSwiGLU):
        self.alpha, self.limit = shape.alpha, shape.limit

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


def expert_activation(shape: ClampedSwiGLU | None) -> Activation:
    """The family's activation, chosen once at build time."""
    return swiglu if shape is None else ClampedSwiGLUActivation(shape)
