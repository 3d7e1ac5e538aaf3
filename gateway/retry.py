"""Backoff between retries, interruptible by the process's stop event."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator


def backoff(first_s: float = 0.2, cap_s: float = 5.0, factor: float = 2.0) -> Iterator[float]:
    """Delays first_s, first_s * factor, ... capped at cap_s, forever."""
    delay = first_s
    while True:
        yield delay
        delay = min(cap_s, delay * factor)


async def sleep_unless_stopped(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep up to `seconds`; True if `stop` was set meanwhile (the caller should give up)."""
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except asyncio.TimeoutError:
        return False
    return True
