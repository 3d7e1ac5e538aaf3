"""The CPU data plane: torch.distributed's gloo backend (an existing collective engine).

One process group per world generation, rendezvous through the coordinator's TCPStore under the
generation's own key prefix. The group is a `ProcessGroupGloo` object owned by its
`GlooCollective`, never torch's process-global default group, so a rank can leave a broken world
and join the next generation in the same process (its weights, experts and KV caches stay).
Uneven splits are never needed: the transport pads every (source, destination) block to the
step's capacity, so `alltoall_base` runs with equal splits.

Every wait is bounded and typed: a peer that died breaks the wait at once (gloo sees its socket
close), a stuck one at the group's timeout; a wait is also given up, after WAIT_SLICE_S, once
`abandoned()` says a newer world generation exists (peers that already left never answer). All
three raise CollectiveError.

Overlap accounting: every all_to_all is timed from its posting to its completion (noted by a
callback on its future: no polling, no extra synchronisation). The posting call and the wait are
exposed; the flight before wait() is hidden except while the engine was blocked on another
collective (moemesh.mesh.overlap; GlooCollective.count_exchange).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from moemesh.errors import CollectiveError
from moemesh.mesh.overlap import hidden_seconds
from moemesh.model.moe import Done, Pending

STORE_DOWN_POLL_S = 0.1  # idle ranks poll this often while the coordinator's store is unreachable
STORE_PROBE_S = 0.25  # bound of the TCP connect that tells whether a lost store listens again
STORE_RECONNECT_S = 2.0  # bound of making a store client again once it listens
WAIT_SLICE_S = 1.0  # a healthy collective never waits this long; past it, look whether to give up


def _never() -> bool:
    return False


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
        self.owner.wait(self.work, "all_to_all")
        returned = time.perf_counter()
        if not self.counted:
            self.counted = True
            done = min(self.done if self.done is not None else returned, returned)
            self.owner.count_exchange(self, done, called, returned)
        return self.result


class GlooCollective:
    """Collectives of one world; all ranks call them in the same order (cross-rank invariant)."""

    def __init__(self, rank: int, world_size: int, group: dist.ProcessGroupGloo | None = None,
                 abandoned: Callable[[], bool] = _never):
        self.group = group  # None: a world of one, or accounting only (tests)
        self.rank = rank
        self.world_size = world_size
        self.abandoned = abandoned  # true once a newer world generation exists
        self.seconds = 0.0  # wall time blocked on collectives (waiting for peers included)
        # all_to_all exchanges only, summed over exchanges, seconds (see count_exchange):
        self.exchange_seconds = 0.0  # in flight: posted -> completed
        self.exposed_seconds = 0.0  # blocked in wait()
        self.hidden_seconds = 0.0  # in flight while this rank computed
        self._flying: dict[int, float] = {}  # id of each exchange posted, not yet counted -> posted
        self._works: list = []  # gloo works posted and not seen completed (an abandoned one stays)
        self._blocked: list[tuple[float, float]] = []  # engine blocked since the oldest flying posting
        # Bytes this rank's collectives handed gloo for each peer (index: destination rank): every
        # block of an all_to_all as sent, padding rows included (gloo's alltoall sends block r to
        # rank r), and the header's all_gather (gloo's ring: R - 1 blocks to rank + 1). Its own
        # block never leaves the process.
        self.bytes_to = [0] * world_size

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
        assert self.group is not None, "left this world"
        try:
            work = self.group.alltoall_base(recv, send, [], [])  # type: ignore[attr-defined]
        except RuntimeError as exc:
            raise CollectiveError(f"rank {self.rank}: all_to_all could not start: {exc}") from exc
        self._track(work)
        block = send.numel() // self.world_size * send.element_size()
        for peer in range(self.world_size):
            self.bytes_to[peer] += block if peer != self.rank else 0
        return _GlooPending(self, work, recv, start)

    def all_gather(self, values: torch.Tensor) -> torch.Tensor:
        """values: (n,) int64 -> (R, n): every rank's values, by rank."""
        if self.world_size == 1:
            return values.unsqueeze(0)
        start = time.perf_counter()
        out = [torch.empty_like(values) for _ in range(self.world_size)]
        assert self.group is not None, "left this world"
        try:
            work = self.group.allgather([out], [values])  # type: ignore[attr-defined]
        except RuntimeError as exc:
            raise CollectiveError(f"rank {self.rank}: step header could not start: {exc}") from exc
        self._track(work)
        ring_next = (self.rank + 1) % self.world_size  # gloo's allgather is a ring
        self.bytes_to[ring_next] += (self.world_size - 1) * values.numel() * values.element_size()
        self.wait(work, "step header")
        end = time.perf_counter()
        self.seconds += end - start
        if self._flying:
            self._blocked.append((start, end))
        return torch.stack(out)

    def wait(self, work, what: str) -> None:
        """Block until `work` completes, in slices of WAIT_SLICE_S; CollectiveError when it failed
        (a peer died: gloo saw its socket close; or the group's timeout passed) or when a newer
        world exists and the wait outlasted a slice."""
        waited = 0.0
        while True:
            try:
                work.wait(timedelta(seconds=WAIT_SLICE_S))
                return
            except RuntimeError as exc:
                if work.is_completed():  # it ended with an error, not our slice's timeout
                    raise CollectiveError(f"rank {self.rank}: {what} failed: {exc}") from exc
            waited += WAIT_SLICE_S
            if self.abandoned():
                raise CollectiveError(f"rank {self.rank}: {what} abandoned after {waited:.0f} s: a newer world exists")

    def _track(self, work) -> None:
        self._works = [w for w in self._works if not w.is_completed()]
        self._works.append(work)

    def close(self) -> None:
        """Leave the world: drop the group (its sockets close when gloo's threads let go).

        Dropping a group joins its threads, and a thread still running an exchange this rank
        gave up (abandoned: its peers left, or one is stopped) holds it until the group's own
        timeout, up to --collective-timeout. The rank must not wait for that before it enters
        the next world, so such a group is dropped on a thread of its own (a daemon: it never
        delays the process's exit)."""
        group, self.group = self.group, None
        in_flight = [w for w in self._works if not w.is_completed()]
        self._works = []
        if group is None or not in_flight:
            return
        held = [group, in_flight]  # the last references: cleared on the releasing thread
        del group, in_flight
        threading.Thread(target=held.clear, name=f"gloo-release-rank{self.rank}", daemon=True).start()


class StoreWaker:
    """Idle ranks sleep in a blocking store wait instead of polling with collectives.

    Idle round n (every rank counts the same idle headers, so n agrees) ends when any rank sets
    key n: it has a request, a loaded epoch, or wants to stop. Costs no CPU while idle. While the
    store is unreachable (the coordinator that hosts it is down) every rank's wait fails at once,
    so idle ranks poll every STORE_DOWN_POLL_S instead, together, until it is back.

    A store client whose call failed is made again (a restarted coordinator re-hosts the store on
    the same port, empty): `wait` tries once per call, after a cheap TCP probe, and sleeps the
    poll interval either way without waiting in that round (a wake set while the store was down
    is lost, so no rank may block on a round that began before it came back); `wake` tries once
    and sets its key again. Each attempt is bounded (STORE_PROBE_S, STORE_RECONNECT_S); no loop.
    """

    def __init__(self, host: str, port: int, prefix: str, timeout_s: float):
        self._timeout = timeout_s
        # Two clients: the engine thread blocks in wait() while the server thread calls wake().
        self._waiting = _StoreClient(host, port, prefix)
        self._waking = _StoreClient(host, port, prefix)
        self._wake_lock = threading.Lock()  # wake() runs on the server thread and the engine thread
        self.reconnects = 0  # store clients made again after a failure

    def wait(self, round_: int) -> None:
        store = self._waiting.store
        if store is None:  # lost: make it again, but do not wait on a round that may have lost its wake
            self.reconnects += self._waiting.reconnect()
            time.sleep(STORE_DOWN_POLL_S)
            return
        try:
            store.wait([str(round_)], timedelta(seconds=self._timeout))
        except dist.DistStoreError:  # nothing happened for a long while: look again
            return
        except dist.DistError:  # the store is gone (its coordinator is down): poll instead of sleeping
            self._waiting.lost()
            time.sleep(STORE_DOWN_POLL_S)

    def wake(self, round_: int) -> None:
        with self._wake_lock:
            for attempt in range(2):
                store = self._waking.store
                if store is None:
                    if attempt:
                        return
                    self.reconnects += self._waking.reconnect()
                    continue
                try:
                    store.set(str(round_), "1")
                    return
                except dist.DistError:  # the store is gone: every idle rank is polling
                    self._waking.lost()


class _StoreClient:
    """One TCPStore client under a key prefix, or None after a call through it failed."""

    def __init__(self, host: str, port: int, prefix: str):
        self.host, self.port, self.prefix = host, port, prefix
        self.store: dist.PrefixStore | None = self._connect()

    def lost(self) -> None:
        self.store = None

    def reconnect(self) -> bool:
        """Try once to make the client again (STORE_PROBE_S while it does not listen, at most
        STORE_RECONNECT_S more when it does); True on success."""
        try:
            with socket.create_connection((self.host, self.port), timeout=STORE_PROBE_S):
                pass  # the store listens: connecting now will not wait out TCPStore's retries
            self.store = self._connect(timedelta(seconds=STORE_RECONNECT_S))
        except (OSError, RuntimeError):  # refused, unreachable, or the store went away again (DistError)
            return False
        return True

    def _connect(self, timeout: timedelta | None = None) -> dist.PrefixStore:
        if timeout is None:  # the first connection, as the world is joined: TCPStore's own timeout
            return dist.PrefixStore(self.prefix, dist.TCPStore(self.host, self.port, is_master=False))
        return dist.PrefixStore(self.prefix, dist.TCPStore(self.host, self.port, is_master=False, timeout=timeout))


def init_gloo(
    store_host: str, store_port: int, prefix: str, rank: int, world_size: int, timeout_s: float,
    abandoned: Callable[[], bool] = _never, bind_host: str | None = None,
) -> GlooCollective:
    """Join one world generation: blocks until all `world_size` ranks have joined (CollectiveError
    if they do not within `timeout_s`). `prefix` is the generation's own key prefix. `bind_host`:
    the address gloo listens on and tells its peers (the worker's advertised host); None or a
    wildcard: gloo's default (the address this machine's name resolves to, or GLOO_SOCKET_IFNAME)."""
    if world_size == 1:
        return GlooCollective(rank, 1, None, abandoned)
    timeout = timedelta(seconds=timeout_s)
    try:
        store = dist.TCPStore(store_host, store_port, is_master=False, timeout=timeout)
        group = dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, world_size, _options(timeout, bind_host))
    except (RuntimeError, dist.DistStoreError) as exc:
        raise CollectiveError(f"rank {rank}: could not join the world at {prefix!r}: {exc}") from exc
    return GlooCollective(rank, world_size, group, abandoned)


def _options(timeout: timedelta, bind_host: str | None) -> Any:
    """Gloo's options (ProcessGroupGloo._Options, untyped in torch's stubs): `timeout`, and one
    device on `bind_host` when it names an interface."""
    options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
    options._timeout = timeout
    if bind_host and bind_host not in ("0.0.0.0", "::", "[::]"):
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=bind_host)]
    else:
        options._devices = [dist.ProcessGroupGloo.create_default_device()]
    return options
