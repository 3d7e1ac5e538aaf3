"""Routing statistics: per-(MoE layer, expert) token counts over a sliding window of reports.

Each worker's last `window` reports are kept; the totals are their sum over all workers. The
balancing policies (coordinator/policies.py) read them, and `moemesh placement show|trace` prints them.
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
    link_counts: torch.Tensor | None = None  # [moe_layers, R, R] source rank x destination rank
    source_expert_counts: torch.Tensor | None = None  # [R, moe_layers, experts]


class LoadWindow:
    """Sliding window of load reports, `window` per worker."""

    def __init__(self, num_moe_layers: int, num_experts: int, window: int):
        if window < 1:
            raise InvalidRequestError(f"load window must be at least 1 report, got {window}")
        self.shape = (num_moe_layers, num_experts)
        self.window = window
        self._reports: dict[str, deque[tuple[int, torch.Tensor, torch.Tensor | None]]] = {}
        self._ranks: dict[str, int] = {}

    def add(self, worker_id: str, window_tokens: int, counts: torch.Tensor, rank: int = -1,
            links: torch.Tensor | None = None) -> None:
        """Record one report; InvalidRequestError on a wrong shape, dtype or a negative count.
        `links` (moe_layers, R): copies the worker sent to each destination rank."""
        check_counts(counts, self.shape)
        if links is not None and links.numel():
            check_counts(links, (self.shape[0], links.shape[-1]))
        else:
            links = None
        reports = self._reports.setdefault(worker_id, deque(maxlen=self.window))
        reports.append((int(window_tokens), counts.clone(), None if links is None else links.clone()))
        self._ranks[worker_id] = rank

    def snapshot(self, world_size: int = 0) -> LoadSnapshot:
        """Sum of every kept report; with `world_size`, also split by source rank and per link."""
        total = torch.zeros(self.shape, dtype=torch.int64)
        tokens = 0
        by_source = torch.zeros(max(world_size, 1), *self.shape, dtype=torch.int64)  # (R, L, E)
        links = torch.zeros(self.shape[0], max(world_size, 1), max(world_size, 1), dtype=torch.int64)  # (L, R, R)
        for worker, reports in self._reports.items():
            rank = self._ranks.get(worker, -1)
            for window_tokens, counts, sent in reports:
                total += counts
                tokens += window_tokens
                if 0 <= rank < world_size:
                    by_source[rank] += counts
                    if sent is not None and sent.shape[-1] == world_size:
                        links[:, rank, :] += sent
        if world_size <= 0:
            return LoadSnapshot(window_tokens=tokens, expert_counts=total)
        return LoadSnapshot(tokens, total, link_counts=links, source_expert_counts=by_source)

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
