"""The loopback collective: N ranks as threads, the same semantics as gloo's."""

from __future__ import annotations

import threading

import pytest
import torch

from moemesh.mesh.loopback import LoopbackError, LoopbackWaker, LoopbackWorld, run_world


def test_all_to_all_sends_block_r_to_rank_r_and_all_gather_stacks_by_rank():
    R, C = 3, 2

    def rank_main(collective):
        send = torch.arange(R * C) + 100 * collective.rank  # (R*C,) block r for rank r
        pending = collective.all_to_all(send.view(R * C, 1))
        gathered = collective.all_gather(torch.tensor([collective.rank, 7]))  # posted while the exchange flies
        return pending.wait().view(-1).tolist(), gathered.tolist()

    results = run_world(LoopbackWorld(R), rank_main)
    for rank, (received, gathered) in enumerate(results):
        assert received == [100 * src + rank * C + i for src in range(R) for i in range(C)]
        assert gathered == [[r, 7] for r in range(R)]


def test_mismatched_collectives_raise_on_every_rank_instead_of_hanging():
    def rank_main(collective):
        if collective.rank == 0:
            return collective.all_gather(torch.zeros(2))
        return collective.all_to_all(torch.zeros(2, 1)).wait()

    with pytest.raises(LoopbackError, match="all_"):
        run_world(LoopbackWorld(2), rank_main)


def test_a_missing_peer_is_an_error_after_the_hang_bound():
    world = LoopbackWorld(2, timeout_s=0.2)  # only a hang bound: the peer never comes
    with pytest.raises(LoopbackError, match="waited"):
        world.collective(0).all_gather(torch.zeros(1))


def test_a_failing_rank_aborts_its_peers():
    def rank_main(collective):
        if collective.rank == 1:
            raise ValueError("rank 1 breaks")
        return collective.all_gather(torch.zeros(1))

    with pytest.raises(ValueError, match="rank 1 breaks"):
        run_world(LoopbackWorld(3), rank_main)


def test_waker_ends_a_round_for_every_waiter():
    waker = LoopbackWaker()
    woke = [threading.Event() for _ in range(2)]

    def waiter(i: int) -> None:
        waker.wait(5)
        woke[i].set()

    threads = [threading.Thread(target=waiter, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    waker.wake(5)
    for t in threads:
        t.join(30)  # hang bound
    assert all(e.is_set() for e in woke)
    waker.wait(5)  # a round already woken returns at once
