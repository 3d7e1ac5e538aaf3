"""Load statistics of one rank: token copies per (MoE layer, expert) and per destination rank.

Shape legend: L MoE layers, E experts per layer, R ranks, T tokens, K top-k, P pieces sent.

Kept apart from dispatch (as vLLM keeps expert-load capture apart from prepare/finalize): the
MoE layer feeds `routed` with the router's output, the all-to-all transport feeds `sent` with
its destinations. Both count on the device with scatter-add (no host sync); `take` reads the
window back once, when the worker reports it. Every window is also folded into running totals
(`totals`: expert counts since the recorder was made, link counts since its world began) that
the worker's metrics read once per step.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from moemesh.mesh.placement import Placement
from moemesh.model.moe import Routing


@dataclass(frozen=True)
class LoadSample:
    """Load statistics of one rank over a window of routed tokens."""

    expert_counts: torch.Tensor  # (L, E) int64 token copies per (MoE layer, expert)
    link_counts: torch.Tensor  # (L, R) int64 token copies sent to each destination rank
    tokens: int  # tokens routed in the window
    generation: int = 0  # world generation, placement epoch and rank the window was counted in
    epoch: int = 0  # (stamped by the engine thread; a report is labelled with them, not with
    rank: int = 0  # what is current when it is sent)


@dataclass(frozen=True)
class LoadTotals:
    """Running totals of one rank (host tensors): what the metrics export as counters."""

    expert_counts: torch.Tensor  # (L, E) int64 token copies per (MoE layer, expert) since the recorder was made
    link_counts: torch.Tensor  # (L, R) int64 token copies sent to each destination rank in the current world
    tokens: int  # tokens routed since the recorder was made
    generation: int = 0  # world generation and rank the link counts were counted in (stamped by the
    rank: int = 0  # engine thread, like LoadSample's)


class LoadRecorder:
    """Counts since the last `take()`; rows follow `layer_order` (MoE layers ascending)."""

    def __init__(self, moe_layers: Iterable[int], num_experts: int, world_size: int,
                 device: str | torch.device = "cpu"):
        self.layer_order = sorted(moe_layers)
        self._row = {layer: i for i, layer in enumerate(self.layer_order)}  # MoE layer -> row
        self.num_experts, self.world_size = num_experts, world_size
        self.device = torch.device(device)
        L = len(self.layer_order)
        self._experts_total = torch.zeros(L, num_experts + 1, dtype=torch.int64, device=self.device)  # (L, E + 1)
        self._links_total = torch.zeros(L, world_size + 1, dtype=torch.int64, device=self.device)  # (L, R + 1)
        self._tokens_total = 0
        self._clear()

    @classmethod
    def for_placement(cls, placement: Placement, device: str | torch.device = "cpu") -> LoadRecorder:
        """Its layers, experts and ranks (the same under every epoch of one world)."""
        E = len(next(iter(placement.layers.values())))
        return cls(placement.layers, E, placement.world_size, device)

    def resize(self, world_size: int) -> None:
        """A new world generation with `world_size` ranks: link counts change shape and their totals
        restart (ranks mean other workers now); the window restarts."""
        self.reset()
        self.world_size = world_size
        self._links_total = torch.zeros(len(self.layer_order), world_size + 1, dtype=torch.int64,
                                        device=self.device)  # (L, R + 1)
        self._clear()

    def reset(self) -> None:
        """Start a new window; what the old one counted stays in the totals."""
        self._experts_total += self._experts
        self._links_total += self._links
        self._tokens_total += self.tokens
        self._clear()

    def _clear(self) -> None:
        L = len(self.layer_order)
        self._experts = torch.zeros(L, self.num_experts + 1, dtype=torch.int64, device=self.device)  # (L, E + 1)
        self._links = torch.zeros(L, self.world_size + 1, dtype=torch.int64, device=self.device)  # (L, R + 1)
        self.tokens = 0  # tokens routed since the last reset (counted at the first MoE layer)

    def routed(self, layer: int, routing: Routing) -> None:
        """routing.expert_ids: (T, K), -1 = dropped (counted in a spare column, never reported)."""
        row = self._row[layer]
        flat = routing.expert_ids.reshape(-1)  # (T*K,)
        key = torch.where(flat >= 0, flat, self.num_experts)  # (T*K,)
        self._experts[row].scatter_add_(0, key, torch.ones_like(key))  # scatter (T*K,) -> (E + 1,)
        if row == 0:
            self.tokens += routing.expert_ids.shape[0]

    def sent(self, layer: int, dest: torch.Tensor) -> None:
        """dest: (P,) destination rank of each piece, -1 = not sent."""
        key = torch.where(dest >= 0, dest, self.world_size)  # (P,)
        self._links[self._row[layer]].scatter_add_(0, key, torch.ones_like(key))  # scatter (P,) -> (R + 1,)

    def take(self) -> LoadSample:
        """What this rank routed since the last call; resets the window."""
        sample = LoadSample(self._experts[:, : self.num_experts].cpu(), self._links[:, : self.world_size].cpu(),
                            self.tokens)
        self.reset()
        return sample

    def totals(self) -> LoadTotals:
        """The running totals, the current window included (one read-back to the host)."""
        E, R = self.num_experts, self.world_size
        both = torch.cat([(self._experts_total + self._experts)[:, :E],
                          (self._links_total + self._links)[:, :R]], dim=1).cpu()  # (L, E + R)
        return LoadTotals(both[:, :E], both[:, E:], self._tokens_total + self.tokens)
