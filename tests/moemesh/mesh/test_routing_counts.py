"""LoadRecorder: windows for the load reports, running totals for the metrics."""

from __future__ import annotations

import torch

from moemesh.mesh.routing_counts import LoadRecorder
from moemesh.model.moe import Routing


def routing(ids: list[list[int]]) -> Routing:
    expert_ids = torch.tensor(ids, dtype=torch.int64)  # (T, K)
    return Routing(expert_ids, torch.ones(expert_ids.shape))


def test_windows_reset_while_totals_keep_everything_until_a_new_world():
    r = LoadRecorder([1, 3], num_experts=4, world_size=2)
    r.routed(1, routing([[0, 1], [1, 2]]))
    r.routed(3, routing([[3, -1], [3, 0]]))  # a dropped copy is counted in neither
    r.sent(1, torch.tensor([0, 1, 1, -1]))
    first = r.take()
    assert first.tokens == 2 and first.expert_counts.tolist() == [[1, 2, 1, 0], [1, 0, 0, 2]]
    assert first.link_counts.tolist() == [[1, 2], [0, 0]]
    r.routed(1, routing([[2, 3]]))
    r.sent(3, torch.tensor([1]))
    r.reset()  # a placement switch: the window is dropped, the totals keep it
    r.routed(1, routing([[2, 2]]))
    totals = r.totals()
    assert r.take().expert_counts.tolist() == [[0, 0, 2, 0], [0, 0, 0, 0]]
    assert totals.tokens == 4
    assert totals.expert_counts.tolist() == [[1, 2, 4, 1], [1, 0, 0, 2]]
    assert totals.link_counts.tolist() == [[1, 2], [0, 1]]
    # A new world of 3 ranks: link totals restart (its ranks are other workers), expert totals go on.
    r.resize(3)
    r.sent(1, torch.tensor([2, 2]))
    after = r.totals()
    assert after.expert_counts.tolist() == totals.expert_counts.tolist()
    assert after.link_counts.tolist() == [[0, 0, 2], [0, 0, 0]]
