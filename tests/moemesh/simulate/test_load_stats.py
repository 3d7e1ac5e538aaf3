"""Load statistics: imbalance, Gini, windows, changed routing and greedy agreement on hand-made cases."""

from __future__ import annotations

import pytest
import torch

from moemesh.simulate.load_stats import changed_copies, gini, greedy_agreement, max_over_mean, windowed


def test_max_over_mean_is_one_when_even_and_e_when_one_expert_takes_everything():
    counts = torch.tensor([[5, 5, 5, 5], [20, 0, 0, 0], [6, 2, 2, 2], [0, 0, 0, 0]])
    assert max_over_mean(counts).tolist() == pytest.approx([1.0, 4.0, 2.0, 0.0])


def test_gini_spans_zero_to_e_minus_one_over_e():
    counts = torch.tensor([[5, 5, 5, 5], [0, 0, 0, 20], [0, 0, 0, 0]])
    assert gini(counts).tolist() == pytest.approx([0.0, 0.75, 0.0])
    # The mean absolute difference over all ordered pairs / (2 mean): 1, 2, 3 -> (8 / 9) / (2 * 2) = 2 / 9.
    assert float(gini(torch.tensor([3, 1, 2]))) == pytest.approx(2 / 9)
    assert float(gini(torch.tensor([3, 1, 2]))) == pytest.approx(float(gini(torch.tensor([30, 10, 20]))))


def test_windows_sum_consecutive_steps_and_leave_out_a_partial_one():
    per_step = torch.arange(7 * 2 * 3).reshape(7, 2, 3)  # (N, L, E)
    w = windowed(per_step, 3)  # (2, L, E)
    assert w.shape == (2, 2, 3)
    assert torch.equal(w[0], per_step[0:3].sum(0)) and torch.equal(w[1], per_step[3:6].sum(0))
    with pytest.raises(ValueError):
        windowed(per_step, 0)


def test_changed_copies_ignores_order_and_counts_drops():
    exact = torch.tensor([[0, 1], [2, 3], [4, 5]])  # (T, K)
    assert changed_copies(exact, torch.tensor([[1, 0], [3, 2], [5, 4]])) == 0.0
    assert changed_copies(exact, torch.tensor([[0, 7], [2, 3], [4, 5]])) == pytest.approx(1 / 6)
    assert changed_copies(exact, torch.tensor([[0, -1], [-1, -1], [6, 7]])) == pytest.approx(5 / 6)
    with pytest.raises(ValueError):
        changed_copies(exact, exact[:2])


def test_greedy_agreement_counts_positions_and_first_divergence():
    ref = [[1, 2, 3, 4], [5, 6, 7, 8]]
    same = greedy_agreement(ref, ref)
    assert (same.matching, same.total, same.share, same.identical) == (8, 8, 1.0, 2)
    other = greedy_agreement(ref, [[1, 2, 9, 4], [5, 6]])  # diverges at 2; second one stops short
    assert (other.matching, other.total, other.first_divergence, other.identical) == (5, 8, (2, 2), 0)
    with pytest.raises(ValueError):
        greedy_agreement(ref, ref[:1])
