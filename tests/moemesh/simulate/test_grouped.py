"""moemesh.simulate.grouped: DeepSeek-V3's group limit on 2 and 8 nodes, the bytes by hand."""

from __future__ import annotations

import math

import pytest

from moemesh.planner.topology import Topology
from moemesh.simulate.grouped import group_effect, group_table
from moemesh.simulate.shapes import ModelShape


def test_deepseek_v3_group_limit_on_two_and_eight_nodes():
    """8 nodes = 8 groups: without the limit a token reaches 8 x 7/8 x (1 - C(224, 8) / C(256, 8))
    = 4.63 remote nodes; aligned, at most 4 nodes. Bytes one device sends per step: 64 tokens x
    58 MoE layers x 2 exchanges x 7168 x 2 B per remote node. On 2 nodes the limit saves little."""
    rows = group_effect(ModelShape.deepseek_v3(), Topology.preset("paper-16xh100"), (16, 64), 64)
    two, eight = rows
    assert (two.nodes, eight.nodes, eight.bound) == (2, 8, 4)
    assert eight.remote_no_limit == pytest.approx(7 * (1 - math.comb(224, 8) / math.comb(256, 8)))
    assert eight.remote_aligned <= 4 * 7 / 8 + 1e-9 and eight.saved > 0.2
    assert eight.remote_spread >= eight.remote_no_limit - 0.1  # the limit alone, groups spread: no saving
    per_remote_node = 64 * 58 * 2 * 7168 * 2
    assert eight.ib_bytes_no_limit == pytest.approx(eight.remote_no_limit * per_remote_node)
    assert eight.ib_bytes_aligned == pytest.approx(eight.remote_aligned * per_remote_node)
    assert two.saved < 0.05 < eight.saved
    assert eight.comm_ours_s is None
    assert "saved" in group_table(rows).splitlines()[0] and len(group_table(rows).splitlines()) == 3
