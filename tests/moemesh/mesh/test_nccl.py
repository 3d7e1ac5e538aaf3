"""The parts of the NCCL data plane that run without a GPU: the receive-buffer ring, the deadline."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from moemesh.errors import ConfigError, UnavailableError
from moemesh.mesh.nccl import CollectiveError, RecvRing, await_done, device_index


def test_exchanges_in_flight_get_distinct_buffers_and_slots_come_round():
    ring = RecvRing(in_flight=4)  # 2 micro-batches
    send = torch.zeros(6, 9)  # (R*C, W)
    first = [ring.take(send).data_ptr() for _ in range(4)]
    assert len(set(first)) == 4, "two micro-batches in flight must not share a receive buffer"
    assert [ring.take(send).data_ptr() for _ in range(4)] == first  # steady state: no allocation


def test_keys_are_separate_and_a_slot_grows_when_the_step_needs_more_rows():
    ring = RecvRing(in_flight=2)
    dispatch, combine = torch.zeros(4, 9), torch.zeros(4, 8)  # (R*C, D+1), (R*C, D)
    a, b = ring.take(dispatch), ring.take(combine)
    assert a.shape == (4, 9) and b.shape == (4, 8) and a.data_ptr() != b.data_ptr()
    ring.take(dispatch)  # slot 1 of the dispatch key
    bigger = ring.take(torch.zeros(10, 9))  # slot 0 again, too small: replaced
    assert bigger.shape == (10, 9)
    assert ring.take(torch.zeros(2, 9)).shape == (2, 9)  # slot 1: a prefix of its buffer
    assert ring.take(torch.zeros(4, 9, dtype=torch.bfloat16)).dtype == torch.bfloat16  # dtype is part of the key


def test_a_ring_needs_at_least_one_buffer():
    with pytest.raises(ConfigError, match="in_flight"):
        RecvRing(in_flight=0)


# ---- deadlines: the polling that keeps a dead peer from hanging the survivors ----------------
# The CuPy parts (events, ncclCommGetAsyncError, ncclCommAbort) need a GPU; here the same
# waiting logic runs with a real thread finishing the "exchange", or never finishing it.


class _Aborts:
    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1


def test_a_wait_returns_when_the_work_completes():
    done = threading.Event()
    abort = _Aborts()
    threading.Timer(0.05, done.set).start()
    await_done(done.is_set, lambda: None, abort, timeout_s=30.0, what="all_to_all")
    assert done.is_set() and abort.calls == 0


def test_a_wait_past_its_deadline_aborts_once_and_raises_an_unavailable_error():
    abort = _Aborts()
    start = time.monotonic()
    with pytest.raises(CollectiveError, match=r"all_to_all: not done after 0.2 s .*communicator aborted"):
        await_done(lambda: False, lambda: None, abort, timeout_s=0.2, what="all_to_all")
    assert time.monotonic() - start < 30  # hang bound
    assert abort.calls == 1
    assert issubclass(CollectiveError, UnavailableError)  # the interceptor maps it to UNAVAILABLE


def test_an_asynchronous_nccl_error_aborts_at_once_without_waiting_for_the_deadline():
    abort = _Aborts()

    def peer_gone():
        raise RuntimeError("NCCL_ERROR_REMOTE_ERROR: remote process exited")

    with pytest.raises(CollectiveError, match="asynchronous error: NCCL_ERROR_REMOTE_ERROR") as caught:
        await_done(lambda: False, peer_gone, abort, timeout_s=3600.0, what="header all_gather")
    assert abort.calls == 1 and isinstance(caught.value.__cause__, RuntimeError)


def test_the_collective_device_is_its_own_ordinal_not_the_threads_current_one():
    assert device_index(torch.device("cuda", 1)) == 1
    assert device_index(torch.device("cuda:3")) == 3
