"""The parts of the NCCL data plane that run without a GPU: the receive-buffer ring."""

from __future__ import annotations

import pytest
import torch

from moemesh.errors import ConfigError
from moemesh.mesh.nccl import RecvRing


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
