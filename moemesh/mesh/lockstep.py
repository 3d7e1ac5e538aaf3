"""The lockstep step protocol every rank of a mesh follows (design.md, "A step across the mesh").

Cross-rank invariants (a rank that breaks one hangs its peers in a collective):
1. Every rank exchanges one step header per step, in the same order: (tokens it will run,
   newest placement epoch it has fully loaded, whether it leaves this world).
2. If every rank has zero tokens, no rank runs a forward pass (all idle together).
3. Otherwise every rank runs one forward pass, even with zero tokens of its own, so it joins
   every MoE layer's dispatch and combine; all use the same T_max for the buffers' capacity.
4. Every rank switches to epoch min(newest loaded) at the same step, so routing tables agree.
5. If any rank leaves (it is stopping, or it knows of a newer world generation), every rank
   leaves this world after that header (no half-finished step); ranks that are not stopping go
   on to the next generation with their requests and KV caches.
Pure bookkeeping here; the collective is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class HeaderCollective(Protocol):
    def all_gather(self, values: torch.Tensor) -> torch.Tensor: ...


MAX_MICRO_BATCHES = 4


@dataclass(frozen=True)
class StepHeader:
    """What all ranks agreed on for this step."""

    tokens: tuple[tuple[int, ...], ...]  # (R, M) tokens each rank runs in each micro-batch
    epoch: int  # placement epoch every rank uses from this step on
    leave: bool  # some rank leaves this world: every rank does, after this header

    @property
    def idle(self) -> bool:
        return not any(any(row) for row in self.tokens)

    @property
    def max_tokens(self) -> tuple[int, ...]:
        """(M,) the most tokens any rank runs in each micro-batch: sizes the exchange buffers."""
        return tuple(max(col) for col in zip(*self.tokens))


def exchange_header(
    collective: HeaderCollective, tokens: tuple[int, ...], loaded_epoch: int, leave: bool
) -> StepHeader:
    """tokens: (M,) this rank's tokens per micro-batch. Every rank must use the same M."""
    assert 1 <= len(tokens) <= MAX_MICRO_BATCHES, "unsupported micro-batch count"
    padded = list(tokens) + [0] * (MAX_MICRO_BATCHES - len(tokens))
    mine = torch.tensor([len(tokens), *padded, loaded_epoch, int(leave)], dtype=torch.int64)  # (M_max + 3,)
    every = collective.all_gather(mine)  # (R, M_max + 3)
    counts = every[:, 0]
    if bool((counts != counts[0]).any()):
        raise RuntimeError(f"ranks disagree on micro-batches per step: {counts.tolist()} (a worker setting)")
    M = int(counts[0])
    return StepHeader(
        tokens=tuple(tuple(row) for row in every[:, 1 : 1 + M].tolist()),
        epoch=int(every[:, -2].min()),
        leave=bool(every[:, -1].any()),
    )


class Waker(Protocol):
    """Ends idle round n on every rank as soon as one rank calls wake(n)."""

    def wait(self, round_: int) -> None: ...

    def wake(self, round_: int) -> None: ...
