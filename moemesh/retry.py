"""Retry with exponential backoff: the one helper behind every "not up yet" loop in moemesh.

    reply = await retry(lambda: stub.WaitForWorld(req, timeout=t), is_not_yet, stop=stop,
                        backoff=Backoff(first_s=0.1, cap_s=2.0))

`retryable(exc)` decides which exceptions mean "try again"; any other propagates at once. Between
attempts the helper waits first_s, first_s * factor, ... capped at cap_s, and wakes as soon as `stop`
is set. It returns None once `stop` is set (the caller gives up quietly) and re-raises the last
retryable exception when the overall deadline (`Backoff.deadline_s`, None = none) has passed.
`retry` is for coroutines on an event loop, `retry_sync` for blocking code (threads, launchers).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar, overload

T = TypeVar("T")
Retryable = Callable[[Exception], bool]  # True: the exception means "not yet", try again
OnRetry = Callable[[int, Exception], None]  # (attempt number from 1, the exception) before each wait


@dataclass(frozen=True)
class Backoff:
    """Waits between attempts: first_s, first_s * factor, ... at most cap_s; deadline_s bounds the
    whole retry (None = until stopped or successful)."""

    first_s: float = 0.1
    cap_s: float = 2.0
    factor: float = 2.0
    deadline_s: float | None = None

    def __post_init__(self) -> None:
        if self.first_s <= 0 or self.cap_s < self.first_s or self.factor < 1:
            raise ValueError(f"need 0 < first_s <= cap_s and factor >= 1, got {self}")
        if self.deadline_s is not None and self.deadline_s < 0:
            raise ValueError(f"deadline_s must not be negative, got {self.deadline_s}")

    def delays(self) -> Iterator[float]:
        """The waits, forever (the deadline is applied by the caller of the attempts)."""
        delay = self.first_s
        while True:
            yield delay
            delay = min(self.cap_s, delay * self.factor)


class _Schedule:
    """The waits of one retry: the next one, shortened to the deadline; None once it has passed."""

    def __init__(self, backoff: Backoff):
        self._delays = backoff.delays()
        self._deadline = None if backoff.deadline_s is None else time.monotonic() + backoff.deadline_s

    def next_wait(self) -> float | None:
        delay = next(self._delays)
        if self._deadline is None:
            return delay
        left = self._deadline - time.monotonic()
        return None if left <= 0 else min(delay, left)


@overload
async def retry(call: Callable[[], Awaitable[T]], retryable: Retryable, *, stop: None = None,
                backoff: Backoff = ..., on_retry: OnRetry | None = None) -> T: ...
@overload
async def retry(call: Callable[[], Awaitable[T]], retryable: Retryable, *, stop: asyncio.Event,
                backoff: Backoff = ..., on_retry: OnRetry | None = None) -> T | None: ...
async def retry(call: Callable[[], Awaitable[T]], retryable: Retryable, *, stop: asyncio.Event | None = None,
                backoff: Backoff = Backoff(), on_retry: OnRetry | None = None) -> T | None:
    """`await call()` until it succeeds (its result), `stop` is set (None), a non-retryable
    exception (raised) or the deadline (the last exception, raised)."""
    schedule = _Schedule(backoff)
    attempt = 0
    while stop is None or not stop.is_set():
        attempt += 1
        try:
            return await call()
        except Exception as exc:
            wait = _next_wait(exc, attempt, schedule, retryable, on_retry)
        if stop is None:
            await asyncio.sleep(wait)
            continue
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=wait)
    return None


@overload
def retry_sync(call: Callable[[], T], retryable: Retryable, *, stop: None = None,
               backoff: Backoff = ..., on_retry: OnRetry | None = None) -> T: ...
@overload
def retry_sync(call: Callable[[], T], retryable: Retryable, *, stop: threading.Event,
               backoff: Backoff = ..., on_retry: OnRetry | None = None) -> T | None: ...
def retry_sync(call: Callable[[], T], retryable: Retryable, *, stop: threading.Event | None = None,
               backoff: Backoff = Backoff(), on_retry: OnRetry | None = None) -> T | None:
    """Blocking `retry`: `call()` until it succeeds, `stop` is set (None), or an exception is final."""
    schedule = _Schedule(backoff)
    attempt = 0
    while stop is None or not stop.is_set():
        attempt += 1
        try:
            return call()
        except Exception as exc:
            wait = _next_wait(exc, attempt, schedule, retryable, on_retry)
        if stop is None:
            time.sleep(wait)
        else:
            stop.wait(wait)
    return None


def _next_wait(exc: Exception, attempt: int, schedule: _Schedule, retryable: Retryable,
               on_retry: OnRetry | None) -> float:
    """The wait before the next attempt; re-raises `exc` if it is final or the deadline passed."""
    if not retryable(exc):
        raise exc
    wait = schedule.next_wait()
    if wait is None:
        raise exc
    if on_retry is not None:
        on_retry(attempt, exc)
    return wait
