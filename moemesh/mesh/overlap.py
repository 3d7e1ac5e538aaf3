"""How much of an exchange's flight was hidden behind compute. Pure: no torch.

An exchange is in flight from its posting until it completes. The part of that flight before the
engine waits for it is hidden only where the engine was computing: time the engine spent blocked
on something else (posting another exchange, waiting for another micro-batch's exchange, a step
header) hides nothing. With two micro-batches round robin that is the usual case: micro-batch 1's
dispatch flies while the engine is blocked in micro-batch 0's wait.
"""

from __future__ import annotations

from collections.abc import Iterable


def hidden_seconds(start: float, end: float, blocked: Iterable[tuple[float, float]]) -> float:
    """Length of [start, end] not covered by the `blocked` intervals (disjoint: one engine thread
    blocks on one thing at a time); 0 when end <= start. Any consistent time unit."""
    if end <= start:
        return 0.0
    covered = sum(max(0.0, min(end, b) - max(start, a)) for a, b in blocked)
    return max(0.0, (end - start) - covered)
