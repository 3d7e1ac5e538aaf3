"""The GPU data plane: NCCL through CuPy, on dedicated send and receive streams.

Shape legend: R ranks, C rows per (source, destination) block, W payload width.

CuPy's NCCL binding has no all-to-all, so one exchange is a group of point-to-point calls:
groupStart; for every peer, in the same order on every rank (NVIDIA/nccl#584: differing orders
can deadlock), send block `peer` on the send stream and receive block `peer` on the receive
stream; groupEnd. Both streams first wait on an event recorded on the compute stream (the
payload is ready) and record their own events when done; `wait()` makes the compute stream wait
on those events. The host never synchronises in the middle of a layer.

Device: every CuPy stream and event is made, recorded and waited on with the collective's own
device current (`with cupy.cuda.Device(i)`), and the compute stream is that device's current
stream, whatever device the calling thread has current: a worker on cuda:N, N >= 1, works.

Deadlines (a dead peer must not hang the survivors): NCCL kernels wait for a peer forever, so
the host never blocks on NCCL work without a deadline. Where the host must know an exchange is
done (wait(), and the header all_gather it synchronises with), it polls the exchange's events
against `timeout_s` and the communicator's asynchronous error; on either failure it aborts the
communicator (ncclCommAbort ends its kernels) and raises CollectiveError, an UnavailableError.
The price: wait() returns once the exchange is complete (as gloo's does), so the host enqueues
no further work meanwhile; the device still runs what was enqueued before wait().

torch tensors are handed to NCCL by device pointer (the DLPack-compatible view of the same
memory: zero copy). 16-bit payloads travel as raw 16-bit words (NCCL_FLOAT16 is only a width to
point-to-point calls, which never do arithmetic): bf16 needs no NCCL type of its own.

Overlap accounting (the same quantities as GlooCollective's, from CUDA timing events, never a
host sync of their own): an exchange is in flight from the receive stream passing its `ready`
wait to the later of its sent / received events; it is exposed from the compute stream reaching
wait() until the compute stream may go on; hidden = the part of the flight before the compute
stream reached wait(), less the compute stream's stalls on other exchanges meanwhile. The
events are read lazily, at the next step header's all_gather (which synchronises the host with
the compute stream anyway), so the counters lag by up to one step.

NOT YET RUN ON A GPU: see docs/gpu-check.md for what scripts/gpu_check.py verifies (a world of
one, the deadline on one GPU) and what stays unverified (cuda:N with N >= 1, a real dead peer,
the overlap accounting, the receive-buffer ring).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from moemesh.errors import CollectiveError, ConfigError
from moemesh.mesh.overlap import hidden_seconds

ABANDON_AFTER_S = 1.0  # a wait this long, while a newer world exists, gives the world up

_WORD_TYPE = {1: "NCCL_INT8", 2: "NCCL_FLOAT16", 4: "NCCL_FLOAT32", 8: "NCCL_FLOAT64"}


def await_done(done: Callable[[], bool], check: Callable[[], None], abort: Callable[[], None], timeout_s: float,
               what: str, clock: Callable[[], float] = time.monotonic,
               abandoned: Callable[[], bool] = lambda: False) -> None:
    """Poll `done()` until it is true. `check()` raises on an asynchronous error. On that error,
    or when `timeout_s` passes first, or when `abandoned()` says a newer world exists and the wait
    has lasted ABANDON_AFTER_S (a healthy exchange never waits that long), call `abort()` once and
    raise CollectiveError. Polls by
    yielding the GIL for the first millisecond (a healthy exchange is usually done by then),
    then sleeps up to 1 ms between polls."""
    start = clock()
    pause = 0.0
    while not done():
        try:
            check()
        except Exception as exc:  # CuPy's NcclError, or whatever the binding raises
            abort()
            raise CollectiveError(f"{what}: NCCL reported an asynchronous error: {exc}") from exc
        waited = clock() - start
        if waited > ABANDON_AFTER_S and abandoned():
            abort()
            raise CollectiveError(f"{what}: abandoned after {waited:.1f} s: a newer world exists")
        if waited > timeout_s:
            abort()
            raise CollectiveError(f"{what}: not done after {timeout_s:g} s (a peer is gone or stuck); "
                                  "communicator aborted")
        if waited > 1e-3:
            pause = min(1e-3, max(5e-5, 2 * pause))
        time.sleep(pause)


def device_index(device: torch.device) -> int:
    """The CUDA ordinal of `device`; a bare "cuda" means the device current now."""
    assert device.type == "cuda", f"NCCL needs a CUDA device, got {device}"
    return device.index if device.index is not None else torch.cuda.current_device()


def raw_words(t: torch.Tensor) -> torch.Tensor:
    """The same bytes as integers of the element's width: how a payload crosses the wire.
    bf16 -> int16 -> bf16 is bit-exact (tests check it on CPU)."""
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@dataclass
class _Timing:
    """CUDA timing events of one exchange (cupy.cuda.Event, timing enabled)."""

    begin: Any  # receive stream, after its wait on `ready`: the exchange starts
    sent: Any  # send stream: every send done
    received: Any  # receive stream: every receive done
    called: Any = None  # compute stream, where wait() was called
    resumed: Any = None  # compute stream, after it waited for sent and received


class RecvRing:
    """Receive buffers for the exchanges: per (width, dtype) key a ring of `in_flight` grow-only
    buffers, handed out in turn (steady state allocates nothing).

    Why a ring of `in_flight` >= m is safe (m micro-batches, run round robin): a micro-batch
    posts its next exchange only after wait() on its previous one, and wait() enqueues the
    result's consumption (the transport's gather out of the buffer) on the compute stream. So
    when an exchange is posted, the only ones not yet consumed are the latest of each other
    micro-batch: at most the m - 1 exchanges posted just before it. A slot comes round again
    `in_flight` >= m exchanges of its key later; its previous user was consumed on the compute
    stream before this exchange's `ready` event is recorded there, and the receive stream waits
    on `ready` before writing into the slot. (One buffer per key let micro-batch 1's dispatch
    overwrite the buffer micro-batch 0 had not consumed yet.) A replaced, smaller buffer is freed
    only after its consumption was enqueued, so the caching allocator reuses it safely.
    """

    def __init__(self, in_flight: int):
        if in_flight < 1:
            raise ConfigError(f"in_flight (receive buffers per key) must be >= 1, got {in_flight}")
        self.in_flight = in_flight
        self._rings: dict[tuple, list[torch.Tensor | None]] = {}
        self._next: dict[tuple, int] = {}

    def take(self, send: torch.Tensor) -> torch.Tensor:
        """send: (R*C, W) -> a buffer of the same shape and dtype, the key's next slot."""
        key = (send.shape[1], send.dtype)
        ring = self._rings.setdefault(key, [None] * self.in_flight)
        slot = self._next.get(key, 0)
        self._next[key] = (slot + 1) % self.in_flight
        buf = ring[slot]
        if buf is None or buf.shape[0] < send.shape[0]:
            buf = torch.empty_like(send)  # (R*C, W)
            ring[slot] = buf
        return buf[: send.shape[0]]  # (R*C, W)


class _NcclPending:
    """One exchange posted on the send / receive streams; wait() orders the compute stream after it."""

    def __init__(self, owner: NcclCollective, timing: _Timing, result: torch.Tensor, send: torch.Tensor):
        # `send` is held until wait(): freed earlier, torch's caching allocator could hand its
        # memory to a compute-stream op while the send stream still reads it.
        self.owner, self.timing, self.result = owner, timing, result
        self._send: torch.Tensor | None = send

    def wait(self) -> torch.Tensor:
        """Order the compute stream after the exchange, then return once it is complete (or
        raise CollectiveError at the deadline: the caller reads the result on the host soon)."""
        import cupy

        owner = self.owner
        if self.timing.called is None:
            with cupy.cuda.Device(owner.device_index):
                compute = owner.compute_stream()
                self.timing.called = cupy.cuda.Event()
                self.timing.called.record(compute)
                compute.wait_event(self.timing.sent)  # device-side ordering first: the accounting
                compute.wait_event(self.timing.received)  # sees the compute stream's own timeline
                self.timing.resumed = cupy.cuda.Event()
                self.timing.resumed.record(compute)
            owner._waited.append(self.timing)
            start = time.perf_counter()
            owner.await_events([self.timing.sent, self.timing.received], "all_to_all")
            owner.seconds += time.perf_counter() - start
            self._send = None  # the compute stream now follows the send: its memory may be reused
        return self.result


class NcclCollective:
    """Collective of one world generation over NCCL (one communicator per generation).

    `in_flight`: receive buffers per (width, dtype), used as a ring (see RecvRing); must be at
    least the worker's micro-batches per step; workers pass 2 * micro-batches.
    """

    def __init__(self, rank: int, world_size: int, unique_id: tuple[int, ...], device: torch.device,
                 in_flight: int = 2, timeout_s: float = 60.0, abandoned: Callable[[], bool] = lambda: False):
        import cupy
        from cupy.cuda import nccl

        self.rank, self.world_size = rank, world_size
        self.device_index = device_index(device)
        self.device = torch.device("cuda", self.device_index)
        self.timeout_s = timeout_s
        self.abandoned = abandoned  # true once a newer world generation exists (see await_done)
        self.aborted = False
        self.closed = False
        self._nccl = nccl
        with cupy.cuda.Device(self.device_index):
            self.comm = nccl.NcclCommunicator(world_size, unique_id, rank)
            self.send_stream = cupy.cuda.Stream(non_blocking=True)
            self.recv_stream = cupy.cuda.Stream(non_blocking=True)
        self._recv = RecvRing(in_flight)
        self._waited: list[_Timing] = []  # exchanges waited for, not yet read into the counters
        self.seconds = 0.0  # host time blocked on collectives: headers, and wait() until an exchange is done
        # all_to_all exchanges only, summed, seconds of device time (read at the next header):
        self.exchange_seconds = 0.0  # in flight on the send / receive streams
        self.exposed_seconds = 0.0  # the compute stream stalled in wait()
        self.hidden_seconds = 0.0  # in flight before the compute stream reached wait()
        # bytes handed NCCL per destination rank: all_to_all blocks (padding included), the header's
        # ring all_gather (R - 1 blocks to the next rank of NCCL's ring, counted as rank + 1)
        self.bytes_to = [0] * world_size

    def compute_stream(self):
        """This device's current torch stream (the engine's compute stream) as a CuPy stream."""
        import cupy

        return cupy.cuda.ExternalStream(torch.cuda.current_stream(self.device).cuda_stream, self.device_index)

    def await_events(self, events: list, what: str) -> None:
        """Return when every CuPy event is done; abort and raise CollectiveError at the deadline
        or on NCCL's asynchronous error (see await_done)."""
        self._usable(what)
        await_done(lambda: all(e.done for e in events), self.comm.check_async_error, self.abort, self.timeout_s,
                   f"rank {self.rank}: {what}", abandoned=self.abandoned)

    def all_to_all(self, send: torch.Tensor) -> _NcclPending:
        """Start the exchange of send: (R*C, W) on the send/receive streams; returns at once."""
        import cupy

        self._usable("all_to_all")
        assert send.is_contiguous() and send.shape[0] % self.world_size == 0, "blocks must tile the buffer"
        assert send.device == self.device, f"payload on {send.device}, collective on {self.device}"
        recv = self._recv.take(send)  # (R*C, W)
        words = raw_words(send)
        block = words.numel() // self.world_size
        kind = getattr(self._nccl, _WORD_TYPE[send.element_size()])
        step = block * send.element_size()
        with cupy.cuda.Device(self.device_index):  # events belong to the streams' device
            ready, begin = cupy.cuda.Event(disable_timing=True), cupy.cuda.Event()
            ready.record(self.compute_stream())
            self.send_stream.wait_event(ready)
            self.recv_stream.wait_event(ready)
            begin.record(self.recv_stream)
            self._nccl.groupStart()
            for peer in range(self.world_size):  # the same peer order on every rank
                self.comm.send(send.data_ptr() + peer * step, block, kind, peer, self.send_stream.ptr)
                self.comm.recv(recv.data_ptr() + peer * step, block, kind, peer, self.recv_stream.ptr)
            self._nccl.groupEnd()
            self.bytes_to = [n + (step if peer != self.rank else 0) for peer, n in enumerate(self.bytes_to)]
            sent, received = cupy.cuda.Event(), cupy.cuda.Event()
            sent.record(self.send_stream)
            received.record(self.recv_stream)
        return _NcclPending(self, _Timing(begin, sent, received), recv, send)

    def all_gather(self, values: torch.Tensor) -> torch.Tensor:
        """values: (n,) int64 on CPU -> (R, n); a small host-synchronous header exchange."""
        import cupy

        self._usable("all_gather")
        start = time.perf_counter()
        dev = values.to(self.device, torch.float64)  # (n,) NCCL allGather on 8-byte words
        out = torch.empty(self.world_size * dev.numel(), dtype=torch.float64, device=self.device)  # (R*n,)
        with cupy.cuda.Device(self.device_index):
            stream = self.compute_stream()
            self.comm.allGather(dev.data_ptr(), out.data_ptr(), dev.numel(), self._nccl.NCCL_FLOAT64, stream.ptr)
            self.bytes_to[(self.rank + 1) % self.world_size] += (self.world_size - 1) * dev.numel() * 8
            gathered = cupy.cuda.Event(disable_timing=True)
            gathered.record(stream)
        self.await_events([gathered], "header all_gather")  # the host sync below cannot hang now
        result = out.view(self.world_size, -1).to("cpu", torch.int64)  # (R, n)
        self.seconds += time.perf_counter() - start
        with cupy.cuda.Device(self.device_index):
            self._read_timings()
        return result

    def _read_timings(self) -> None:
        """Add the exchanges waited for so far to the counters. Called right after a host sync
        with the compute stream; an exchange whose `resumed` event is not complete yet (it
        cannot be, after that sync, but reading an incomplete event raises) waits for the next.
        Times are ms since the first ready exchange's `begin` (cudaEventElapsedTime is signed);
        the compute stream's stalls in wait() hide nothing (moemesh.mesh.overlap)."""
        import cupy

        ready = [t for t in self._waited if t.resumed.done]  # `resumed` done => all of t's events are
        self._waited = [t for t in self._waited if not t.resumed.done]
        if not ready:
            return
        at = lambda event: cupy.cuda.get_elapsed_time(ready[0].begin, event)
        stalled = [(at(t.called), at(t.resumed)) for t in ready]
        for t in ready:
            begin, end = at(t.begin), max(at(t.sent), at(t.received))
            self.exchange_seconds += max(0.0, end - begin) / 1e3
            self.hidden_seconds += hidden_seconds(begin, min(end, at(t.called)), stalled) / 1e3
            self.exposed_seconds += max(0.0, at(t.resumed) - at(t.called)) / 1e3

    def _usable(self, what: str) -> None:
        if self.aborted:
            raise CollectiveError(f"rank {self.rank}: {what} on an aborted communicator")

    def abort(self) -> None:
        """End the communicator's kernels and free it without waiting for peers (idempotent)."""
        if not self.aborted:
            self.aborted = True
            self.comm.abort()

    def close(self) -> None:
        """Idempotent: the engine thread closes a world's collective when it leaves it, and the
        worker closes the last one again at shutdown."""
        if not self.aborted and not self.closed:  # destroy would wait for work an aborted world never finishes
            self.comm.destroy()
        self.closed = True


def make_unique_id() -> tuple[int, ...]:
    from cupy.cuda import nccl

    return tuple(nccl.get_unique_id())
