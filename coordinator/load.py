"""Load statistics: per-(MoE layer, expert) token counts over a sliding window of reports.

Each worker's last `window` reports are kept; the totals are their sum over all workers. This is
the input a later balancer (policies "gating" / "replicate") reads; nothing acts on it yet.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from moemesh.errors import InvalidRequestError


@dataclass(frozen=True)
class LoadSnapshot:
    """Totals over the current window: tokens routed, and counts [moe_layers, experts] (int64)."""

    window_tokens: int
    expert_counts: torch.Tensor


class LoadWindow:
    """Sliding window of load reports, `window` per worker."""

    def __init__(self, num_moe_layers: int, num_experts: int, window: int):
        if window < 1:
            raise InvalidRequestError(f"load window must be at least 1 report, got {window}")
        self.shape = (num_moe_layers, num_experts)
        self.window = window
        self._reports: dict[str, deque[tuple[int, torch.Tensor]]] = {}

    def add(self, worker_id: str, window_tokens: int, counts: torch.Tensor) -> None:
        """Record one report; InvalidRequestError on a wrong shape, dtype or a negative count."""
        check_counts(counts, self.shape)
        reports = self._reports.setdefault(worker_id, deque(maxlen=self.window))
        reports.append((int(window_tokens), counts.clone()))

    def snapshot(self) -> LoadSnapshot:
        """Sum of every kept report."""
        total = torch.zeros(self.shape, dtype=torch.int64)
        tokens = 0
        for reports in self._reports.values():
            for window_tokens, counts in reports:
                total += counts
                tokens += window_tokens
        return LoadSnapshot(window_tokens=tokens, expert_counts=total)

    def clear(self) -> None:
        """Forget every report (a new world: old ranks' counts no longer apply)."""
        self._reports.clear()


def check_counts(counts: torch.Tensor, shape: tuple[int, int]) -> None:
    """Raise InvalidRequestError unless `counts` is int64 of `shape` with no negative entry."""
    if counts.dtype != torch.int64:
        raise InvalidRequestError(f"expert_counts must be int64, got {str(counts.dtype).removeprefix('torch.')}")
    if tuple(counts.shape) != shape:
        raise InvalidRequestError(
            f"expert_counts has shape {list(counts.shape)}, expected {list(shape)} "
            f"(MoE layers x experts)"
        )
    if counts.numel() and int(counts.min()) < 0:
        raise InvalidRequestError("expert_counts has a negative count")
