"""GlooCollective's overlap accounting over a real two-rank gloo world: an exchange waited for at
once is all exposed; one that flies while the rank computes is (mostly) hidden; one that flies
while the rank is blocked on another exchange is not."""

from __future__ import annotations

import multiprocessing as mp
import time
from datetime import timedelta
from types import SimpleNamespace

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


def _two_in_flight(collective: GlooCollective) -> dict[str, float]:
    """Two exchanges posted back to back and waited for in order, nothing computed in between;
    rank 1 posts late, so rank 0 spends the flight of both blocked in the first wait()."""
    before = (collective.exchange_seconds, collective.hidden_seconds)
    for i in range(EXCHANGES // 4):
        dist.barrier()
        if collective.rank == 1:
            time.sleep(COMPUTE_S)
        first = collective.all_to_all(torch.full((WORLD * ROWS, WIDTH), float(i)))  # (R*C, W)
        second = collective.all_to_all(torch.full((WORLD * ROWS, WIDTH), float(-i)))  # (R*C, W)
        first.wait(), second.wait()
    return {"exchange": collective.exchange_seconds - before[0], "hidden": collective.hidden_seconds - before[1]}


def _rank_main(rank: int, port: int, out) -> None:
    torch.set_num_threads(1)
    collective = init_gloo("127.0.0.1", port, "test-gloo/", rank, WORLD, timeout_s=30)
    try:
        _exchanges(collective, 0.0)  # warm-up: connections, allocations
        out.put((rank, {"at_once": _exchanges(collective, 0.0), "overlapped": _exchanges(collective, COMPUTE_S),
                        "two_in_flight": _two_in_flight(collective)}))
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


def test_time_blocked_in_another_exchange_hides_nothing(counters):
    """Rank 0 computed nothing while both exchanges flew: the second one's flight overlapped the
    first one's wait, which is exposed time, not hidden (the two-micro-batch pattern)."""
    two = counters[0]["two_in_flight"]
    assert two["exchange"] > 0 and two["hidden"] / two["exchange"] < 0.2, two


def _posted(c: GlooCollective, start: float, posted: float) -> SimpleNamespace:
    """An exchange record with the fields count_exchange reads (accounting only: no world)."""
    x = SimpleNamespace(start=start, posted=posted)
    c.posted(x)
    return x


def test_hidden_is_the_flight_before_wait_whatever_finishes_first():
    c = GlooCollective(0, 2)
    c.count_exchange(_posted(c, 10.0, 10.5), done=13.0, called=11.0, returned=13.1)  # completed while blocked
    assert (c.exchange_seconds, c.hidden_seconds, c.exposed_seconds) == pytest.approx((3.0, 0.5, 2.6))
    c.count_exchange(_posted(c, 20.0, 20.0), done=21.0, called=22.0, returned=22.01)  # completed before wait
    assert (c.exchange_seconds, c.hidden_seconds, c.exposed_seconds) == pytest.approx((4.0, 1.5, 2.61))
    assert c.seconds == pytest.approx(c.exposed_seconds)


def test_flight_spent_blocked_on_another_exchange_is_not_hidden():
    c = GlooCollective(0, 2)
    first, second = _posted(c, 0.0, 0.1), _posted(c, 0.1, 0.2)
    c.count_exchange(first, done=1.0, called=0.5, returned=1.0)  # posting the second blocked 0.1-0.2
    c.count_exchange(second, done=1.1, called=1.0, returned=1.1)
    # first: 0.1-0.5 less the second's posting; second: 0.2-1.0 less the first's wait 0.5-1.0.
    assert c.hidden_seconds == pytest.approx(0.3 + 0.3)
    assert c._blocked == []  # nothing in flight: nothing kept


def test_world_of_one_counts_no_exchange():
    c = GlooCollective(0, 1)
    x = torch.ones(4, 3)  # (R*C, W)
    assert c.all_to_all(x).wait() is x
    assert c.exchange_seconds == c.hidden_seconds == c.exposed_seconds == 0.0
