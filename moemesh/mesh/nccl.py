"""The GPU data plane: NCCL through CuPy, on dedicated send and receive streams.

Shape legend: R ranks, C rows per (source, destination) block, W payload width.

CuPy's NCCL binding has no all-to-all, so one exchange is a group of point-to-point calls:
groupStart; for every peer, in the same order on every rank (NVIDIA/nccl#584: differing orders
can deadlock), send block `peer` on the send stream and receive block `peer` on the receive
stream; groupEnd. Both streams first wait on an event recorded on the compute stream (the
payload is ready) and record their own events when done; `wait()` makes the compute stream wait
on those events. The host never synchronises in the middle of a layer.

torch tensors are handed to NCCL by device pointer (the DLPack-compatible view of the same
memory: zero copy). 16-bit payloads travel as raw 16-bit words (NCCL_FLOAT16 is only a width to
point-to-point calls, which never do arithmetic): bf16 needs no NCCL type of its own.

NOT YET RUN ON A GPU: see docs/gpu-check.md for what `make gpu-check` verifies.
"""

from __future__ import annotations

import torch

_WORD_TYPE = {1: "NCCL_INT8", 2: "NCCL_FLOAT16", 4: "NCCL_FLOAT32", 8: "NCCL_FLOAT64"}


def raw_words(t: torch.Tensor) -> torch.Tensor:
    """The same bytes as integers of the element's width: how a payload crosses the wire.
    bf16 -> int16 -> bf16 is bit-exact (tests check it on CPU)."""
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


class _NcclPending:
    def __init__(self, done_events, result: torch.Tensor):
        self.done_events, self.result = done_events, result

    def wait(self) -> torch.Tensor:
        import cupy

        compute = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
        for event in self.done_events:
            compute.wait_event(event)  # device-side ordering only: no host sync
        return self.result


class NcclCollective:
    """Collective of one world generation over NCCL (one communicator per generation)."""

    def __init__(self, rank: int, world_size: int, unique_id: tuple[int, ...], device: torch.device):
        import cupy
        from cupy.cuda import nccl

        self.rank, self.world_size, self.device = rank, world_size, device
        self._nccl = nccl
        with cupy.cuda.Device(device.index):
            self.comm = nccl.NcclCommunicator(world_size, unique_id, rank)
            self.send_stream = cupy.cuda.Stream(non_blocking=True)
            self.recv_stream = cupy.cuda.Stream(non_blocking=True)
        self._recv_buffers: dict[tuple, torch.Tensor] = {}
        self.seconds = 0.0  # host time blocked on collectives (headers only: exchanges are async)

    def all_to_all(self, send: torch.Tensor) -> _NcclPending:
        """Start the exchange of send: (R*C, W) on the send/receive streams; returns at once."""
        import cupy

        assert send.is_contiguous() and send.shape[0] % self.world_size == 0, "blocks must tile the buffer"
        recv = self._recv_buffer(send)
        words = raw_words(send)
        block = words.numel() // self.world_size
        kind = getattr(self._nccl, _WORD_TYPE[send.element_size()])
        ready = cupy.cuda.Event()
        ready.record(cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream))
        self.send_stream.wait_event(ready)
        self.recv_stream.wait_event(ready)
        step = block * send.element_size()
        self._nccl.groupStart()
        for peer in range(self.world_size):  # the same peer order on every rank
            self.comm.send(send.data_ptr() + peer * step, block, kind, peer, self.send_stream.ptr)
            self.comm.recv(recv.data_ptr() + peer * step, block, kind, peer, self.recv_stream.ptr)
        self._nccl.groupEnd()
        sent, received = cupy.cuda.Event(), cupy.cuda.Event()
        sent.record(self.send_stream)
        received.record(self.recv_stream)
        return _NcclPending((sent, received), recv)

    def _recv_buffer(self, send: torch.Tensor) -> torch.Tensor:
        """Grow-only receive buffers per (width, dtype): steady state allocates nothing."""
        key = (send.shape[1], send.dtype)
        buf = self._recv_buffers.get(key)
        if buf is None or buf.shape[0] < send.shape[0]:
            buf = torch.empty_like(send)
            self._recv_buffers[key] = buf
        return buf[: send.shape[0]]

    def all_gather(self, values: torch.Tensor) -> torch.Tensor:
        """values: (n,) int64 on CPU -> (R, n); a small host-synchronous header exchange."""
        import time

        start = time.perf_counter()
        dev = values.to(self.device, torch.float64)  # NCCL allGather on 8-byte words
        out = torch.empty(self.world_size * dev.numel(), dtype=torch.float64, device=self.device)
        stream = torch.cuda.current_stream().cuda_stream
        self.comm.allGather(dev.data_ptr(), out.data_ptr(), dev.numel(), self._nccl.NCCL_FLOAT64, stream)
        result = out.view(self.world_size, -1).to("cpu", torch.int64)  # host sync: the header is needed now
        self.seconds += time.perf_counter() - start
        return result

    def close(self) -> None:
        self.comm.destroy()


def make_unique_id() -> tuple[int, ...]:
    from cupy.cuda import nccl

    return tuple(nccl.get_unique_id())
