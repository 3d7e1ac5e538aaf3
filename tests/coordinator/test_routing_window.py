"""The load window: totals, the split by source rank, and the per-link (source -> destination) load."""

from __future__ import annotations

import pytest
import torch

from coordinator.routing_window import LoadWindow
from moemesh.errors import InvalidRequestError


def test_snapshot_splits_by_source_rank_and_link():
    window = LoadWindow(num_moe_layers=2, num_experts=3, window=4)
    window.add("w0", 10, torch.tensor([[5, 5, 10], [20, 0, 0]]), rank=0, links=torch.tensor([[12, 8], [20, 0]]))
    window.add("w1", 10, torch.tensor([[0, 20, 0], [1, 1, 18]]), rank=1, links=torch.tensor([[4, 16], [0, 20]]))
    snap = window.snapshot(world_size=2)
    assert snap.window_tokens == 20
    assert snap.expert_counts.tolist() == [[5, 25, 10], [21, 1, 18]]
    assert snap.source_expert_counts.shape == (2, 2, 3)  # (R, L, E)
    assert snap.source_expert_counts[1].tolist() == [[0, 20, 0], [1, 1, 18]]
    assert snap.link_counts.shape == (2, 2, 2)  # (L, R source, R destination)
    assert snap.link_counts[0].tolist() == [[12, 8], [4, 16]]


def test_a_report_with_a_wrong_link_shape_is_rejected():
    window = LoadWindow(num_moe_layers=2, num_experts=3, window=4)
    with pytest.raises(InvalidRequestError):
        window.add("w0", 10, torch.zeros(2, 3, dtype=torch.int64), rank=0, links=torch.zeros(3, 2, dtype=torch.int64))
