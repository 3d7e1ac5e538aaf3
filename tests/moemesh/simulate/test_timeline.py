"""moemesh.simulate.timeline: shared experts overlap their own micro-batch's dispatch (times by hand)."""

from __future__ import annotations

import pytest

from moemesh.simulate.timeline import StageTimes, schedule


def test_shared_experts_run_while_the_dispatch_flies():
    """attention 1, dispatch 2, shared 1.5, experts 3, combine 4: the shared experts fit under the
    dispatch: 1 + max(2, 1.5) + 3 + 4 = 10; compute busy 5.5, so 4.5 of the 6 s of exchanges stay
    exposed (hidden 25%)."""
    tl = schedule([StageTimes(1.0, 2.0, 3.0, 4.0, shared_s=1.5)], 1)
    assert tl.makespan_s == pytest.approx(10.0)
    assert tl.compute_s == pytest.approx(5.5) and tl.hidden_share == pytest.approx(0.25)
    assert tl.stage_s(0, "shared") == pytest.approx(1.5)


def test_longer_shared_experts_hide_the_whole_dispatch():
    """shared 3 > dispatch 2: 1 + 3 + 3 + 4 = 11; only the combine (4 of 6 s) is exposed."""
    tl = schedule([StageTimes(1.0, 2.0, 3.0, 4.0, shared_s=3.0)], 1)
    assert tl.makespan_s == pytest.approx(11.0)
    assert tl.exposed_comm_s == pytest.approx(4.0) and tl.hidden_share == pytest.approx(1 / 3)


def test_without_shared_experts_a_layer_has_no_shared_stage():
    tl = schedule([StageTimes(1.0, 2.0, 3.0, 4.0)], 1)
    assert tl.makespan_s == pytest.approx(10.0)
    assert all(iv.stage != "shared" for iv in tl.intervals)
