"""The step protocol's cross-rank invariants (moemesh.mesh.lockstep), on the loopback collective.

The engine-thread side of them (idle rounds, epoch switch, stop) runs for real in
tests/expert_worker/test_runner.py; here, what the header exchange itself guarantees."""

from __future__ import annotations

import pytest

from moemesh.mesh.lockstep import MAX_MICRO_BATCHES, exchange_header
from moemesh.mesh.loopback import LoopbackWorld, run_world


def _headers(mine: dict[int, tuple[tuple[int, ...], int, bool]]):
    """rank -> (tokens per micro-batch, newest loaded epoch, stop) -> every rank's StepHeader."""
    return run_world(LoopbackWorld(len(mine)), lambda c: exchange_header(c, *mine[c.rank]))


def test_every_rank_agrees_on_tokens_t_max_epoch_and_stop():
    headers = _headers({0: ((3, 1), 4, False), 1: ((0, 0), 2, False), 2: ((1, 5), 3, True)})
    assert headers[0] == headers[1] == headers[2]
    h = headers[0]
    assert h.tokens == ((3, 1), (0, 0), (1, 5))
    assert h.max_tokens == (3, 5)  # sizes each micro-batch's exchanges
    assert h.epoch == 2  # min(newest loaded): every rank has it
    assert h.leave  # any rank leaves
    assert not h.idle  # rank 1 has nothing of its own but still joins the forward pass


def test_all_idle_is_idle_on_every_rank():
    headers = _headers({r: ((0,), 1, False) for r in range(3)})
    assert all(h.idle and not h.leave and h.epoch == 1 for h in headers)


def test_mismatched_micro_batch_counts_raise_on_every_rank_instead_of_hanging():
    world = LoopbackWorld(2)

    def rank_main(collective):
        tokens = (1,) if collective.rank == 0 else (1, 1)  # a worker setting differs
        with pytest.raises(RuntimeError, match="disagree on micro-batches"):
            exchange_header(collective, tokens, 1, False)
        return True

    assert run_world(world, rank_main) == [True, True]


def test_too_many_micro_batches_is_refused_before_any_exchange():
    world = LoopbackWorld(1)
    with pytest.raises(AssertionError):
        exchange_header(world.collective(0), (1,) * (MAX_MICRO_BATCHES + 1), 1, False)
