"""GlooCollective's overlap accounting over a real two-rank gloo world: an exchange waited for at
once is all exposed; one that flies while the rank computes is (mostly) hidden."""

from __future__ import annotations

import multiprocessing as mp
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from moemesh.mesh.gloo import GlooCollective, init_gloo

WORLD = 2
EXCHANGES = 20
COMPUTE_S = 0.02  # "compute" between posting an exchange and waiting for it
ROWS, WIDTH = 2048, 256  # per destination block: 2 MiB of fp32


def _exchanges(collective: GlooCollective, compute_s: float) -> dict[str, float]:
    """EXCHANGES all_to_alls, each waited for after `compute_s` seconds of sleep (GIL released,
    like a torch op); returns the counters' growth and checks every exchange's result."""
    before = (collective.exchange_seconds, collective.hidden_seconds, collective.exposed_seconds)
    for i in range(EXCHANGES):
        send = torch.full((WORLD * ROWS, WIDTH), float(collective.rank * 100 + i))  # (R*C, W)
        dist.barrier()  # every rank posts at about the same time
        pending = collective.all_to_all(send)
        if compute_s:
            time.sleep(compute_s)
        recv = pending.wait()  # (R*C, W)
        assert [float(recv[r * ROWS, 0]) for r in range(WORLD)] == [float(r * 100 + i) for r in range(WORLD)]
        assert 0.0 <= collective.hidden_seconds <= collective.exchange_seconds
    after = (collective.exchange_seconds, collective.hidden_seconds, collective.exposed_seconds)
    return dict(zip(("exchange", "hidden", "exposed"), (a - b for a, b in zip(after, before))))


def _rank_main(rank: int, port: int, out) -> None:
    torch.set_num_threads(1)
    collective = init_gloo("127.0.0.1", port, "test-gloo/", rank, WORLD, timeout_s=30)
    try:
        _exchanges(collective, 0.0)  # warm-up: connections, allocations
        out.put((rank, {"at_once": _exchanges(collective, 0.0), "overlapped": _exchanges(collective, COMPUTE_S)}))
    finally:
        collective.close()


@pytest.fixture(scope="module")
def counters() -> dict[int, dict[str, dict[str, float]]]:
    """Both scenarios on a real two-rank gloo world (spawned processes), per rank."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, store.port, out)) for r in range(WORLD)]
    try:
        for p in procs:
            p.start()
        return dict(out.get(timeout=60) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()


def test_exchange_waited_at_once_is_exposed_not_hidden(counters):
    for rank, c in counters.items():
        at_once = c["at_once"]
        assert at_once["exchange"] > 0, rank
        assert 0 <= at_once["hidden"] <= at_once["exchange"]
        assert at_once["hidden"] / at_once["exchange"] < 0.5, (rank, at_once)
        # Blocked for the whole flight, give or take wake-up latency and the posting overhead.
        assert at_once["exposed"] == pytest.approx(at_once["exchange"], rel=0.25), (rank, at_once)


def test_exchange_flying_during_compute_is_hidden(counters):
    for rank, c in counters.items():
        overlapped = c["overlapped"]
        assert 0 < overlapped["hidden"] <= overlapped["exchange"]
        assert overlapped["hidden"] / overlapped["exchange"] > 0.5, (rank, overlapped)
        assert overlapped["exposed"] < overlapped["exchange"], (rank, overlapped)


def test_hidden_is_the_flight_before_wait_whatever_finishes_first():
    c = GlooCollective(0, 2)  # accounting only: no world needed
    c.count_exchange(start=10.0, posted=10.5, done=13.0, called=11.0, returned=13.1)  # completed while blocked
    assert (c.exchange_seconds, c.hidden_seconds, c.exposed_seconds) == pytest.approx((3.0, 0.5, 2.6))
    c.count_exchange(start=20.0, posted=20.0, done=21.0, called=22.0, returned=22.01)  # completed before wait
    assert (c.exchange_seconds, c.hidden_seconds, c.exposed_seconds) == pytest.approx((4.0, 1.5, 2.61))
    assert c.seconds == pytest.approx(c.exposed_seconds)


def test_world_of_one_counts_no_exchange():
    c = GlooCollective(0, 1)
    x = torch.ones(4, 3)  # (R*C, W)
    assert c.all_to_all(x).wait() is x
    assert c.exchange_seconds == c.hidden_seconds == c.exposed_seconds == 0.0
