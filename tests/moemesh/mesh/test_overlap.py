"""moemesh.mesh.overlap: the hidden part of a flight is what no blocked interval covers."""

from __future__ import annotations

import pytest

from moemesh.mesh.overlap import hidden_seconds


@pytest.mark.parametrize("start, end, blocked, expected", [
    (0.0, 1.0, [], 1.0),
    (0.0, 1.0, [(0.2, 0.5)], 0.7),
    (0.0, 1.0, [(-1.0, 0.25), (0.75, 2.0)], 0.5),  # intervals reaching outside the window count inside it only
    (0.0, 1.0, [(2.0, 3.0)], 1.0),
    (0.0, 1.0, [(-1.0, 2.0)], 0.0),
    (1.0, 0.5, [], 0.0),  # waited for before the flight began (NCCL streams started late)
])
def test_hidden_seconds(start, end, blocked, expected):
    assert hidden_seconds(start, end, blocked) == pytest.approx(expected)
