"""The CPU data plane: torch.distributed's gloo backend (an existing collective engine).

One process group per world generation, rendezvous through the coordinator's TCPStore.
Uneven splits are never needed: the transport pads every (source, destination) block to the
step's capacity, so `all_to_all_single` runs with equal splits.

Overlap accounting: every all_to_all is timed from its posting to its completion (noted by a
callback on its future: no polling, no extra synchronisation). The posting call and the wait are
exposed; the flight before wait() is hidden except while the engine was blocked on another
collective (moemesh.mesh.overlap; GlooCollective.count_exchange).
"""

from __future__ import annotations

import contextlib
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from moemesh.mesh.overlap import hidden_seconds
from moemesh.model.moe import Done, Pending


class _GlooPending:
    """One all_to_all in flight. Times are time.perf_counter() seconds: `start` when the posting
    call began, `posted` when it returned, `done` when gloo completed the exchange (its future's
    callback, run by gloo's thread as it marks the work complete, before wait() can return; that
    thread needs the GIL for it, so `done` may be late by up to one GIL switch interval, or until
    wait() releases the GIL: never past wait()'s return)."""

    def __init__(self, owner: GlooCollective, work, result: torch.Tensor, start: float):
        self.owner, self.work, self.result = owner, work, result
        self.start, self.posted = start, time.perf_counter()
        self.done: float | None = None
        self.counted = False
        owner.posted(self)
        work.get_future().add_done_callback(self._on_done)  # runs at once if already complete

    def _on_done(self, _future) -> None:
        self.done = time.perf_counter()

    def wait(self) -> torch.Tensor:
        called = time.perf_counter()
        self.work.wait()
        returned = time.perf_counter()
        if not self.counted:
            self.counted = True
            done = min(self.done if self.done is not None else returned, returned)
            self.owner.count_exchange(self, done, called, returned)
        return self.result


class GlooCollective:
    """Collectives of one world; all ranks call them in the same order (cross-rank invariant)."""

    def __init__(self, rank: int, world_size: int):
        self.rank = rank
        self.world_size = world_size
        self.seconds = 0.0  # wall time blocked on collectives (waiting for peers included)
        # all_to_all exchanges only, summed over exchanges, seconds (see count_exchange):
        self.exchange_seconds = 0.0  # in flight: posted -> completed
        self.exposed_seconds = 0.0  # blocked in wait()
        self.hidden_seconds = 0.0  # in flight while this rank computed
        self._flying: dict[int, float] = {}  # id of each exchange posted, not yet counted -> posted
        self._blocked: list[tuple[float, float]] = []  # engine blocked since the oldest flying posting

    def posted(self, x: _GlooPending) -> None:
        """An exchange's posting call (start -> posted) returned: the engine was blocked in it."""
        self._flying[id(x)] = x.posted
        self._blocked.append((x.start, x.posted))

    def count_exchange(self, x: _GlooPending, done: float, called: float, returned: float) -> None:
        """Exchange `x` completed at `done` and was waited for from `called` until `returned`
        (perf_counter seconds; x.start <= x.posted <= called, done <= returned). Exposed: the
        posting call (torch's Python wrapper; on a busy machine the rank is often descheduled in
        it) plus the wait. Hidden: the flight between posting and wait(), [posted, min(done,
        called)], less the time the engine was blocked on other collectives meanwhile; so
        0 <= hidden <= exchange = done - start whatever the order of done and called."""
        assert x.start <= x.posted <= called and done <= returned, "exchange times out of order"
        exposed = (x.posted - x.start) + (returned - called)
        self.seconds += exposed
        self.exposed_seconds += exposed
        self.exchange_seconds += max(0.0, done - x.start)
        self.hidden_seconds += hidden_seconds(x.posted, min(done, called), self._blocked)
        self._blocked.append((called, returned))
        del self._flying[id(x)]
        oldest = min(self._flying.values(), default=float("inf"))
        self._blocked = [(a, b) for a, b in self._blocked if b > oldest]  # only what a flying one can overlap

    def all_to_all(self, send: torch.Tensor) -> Pending[torch.Tensor]:
        """Start send: (R * C, W) -> (R * C, W): block r goes to rank r, block r comes from rank r.
        Runs on gloo's own threads; only the time blocked in wait() counts as exposed. A world of
        one moves nothing and counts no exchange."""
        if self.world_size == 1:
            return Done(send)
        recv = torch.empty_like(send)  # (R * C, W)
        start = time.perf_counter()
        return _GlooPending(self, dist.all_to_all_single(recv, send, async_op=True), recv, start)

    def all_gather(self, values: torch.Tensor) -> torch.Tensor:
        """values: (n,) int64 -> (R, n): every rank's values, by rank."""
        if self.world_size == 1:
            return values.unsqueeze(0)
        start = time.perf_counter()
        out = [torch.empty_like(values) for _ in range(self.world_size)]
        dist.all_gather(out, values)
        end = time.perf_counter()
        self.seconds += end - start
        if self._flying:
            self._blocked.append((start, end))
        return torch.stack(out)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class StoreWaker:
    """Idle ranks sleep in a blocking store wait instead of polling with collectives.

    Idle round n (every rank counts the same idle headers, so n agrees) ends when any rank sets
    key n: it has a request, a loaded epoch, or wants to stop. Costs no CPU while idle.
    """

    def __init__(self, host: str, port: int, prefix: str, timeout_s: float):
        self._timeout = timeout_s
        # Two clients: the engine thread blocks in wait() while the server thread calls wake().
        self._waiting = dist.PrefixStore(prefix, dist.TCPStore(host, port, is_master=False))
        self._waking = dist.PrefixStore(prefix, dist.TCPStore(host, port, is_master=False))

    def wait(self, round_: int) -> None:
        with contextlib.suppress(dist.DistStoreError):  # nothing happened for a long while: look again
            self._waiting.wait([str(round_)], timedelta(seconds=self._timeout))

    def wake(self, round_: int) -> None:
        self._waking.set(str(round_), "1")


def init_gloo(
    store_host: str, store_port: int, prefix: str, rank: int, world_size: int, timeout_s: float
) -> GlooCollective:
    """Join the world: blocks until all `world_size` ranks have joined (or `timeout_s` passes)."""
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(store_host, store_port, is_master=False, timeout=timeout)
    dist.init_process_group(
        "gloo", store=dist.PrefixStore(prefix, store), rank=rank, world_size=world_size, timeout=timeout
    )
    return GlooCollective(rank, world_size)
