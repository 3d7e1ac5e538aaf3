"""GlooCollective: its overlap accounting, and its worlds (bounded, typed, abandonable waits;
one process joining a second world generation after leaving the first).

The bookkeeping (which part of an exchange's flight counts as hidden, which as exposed) is checked
on recorded intervals, where every number is known. On a real two-rank gloo world only what events
make certain is asserted: the counters are exactly that bookkeeping replayed on the times the run
recorded, and an exchange that rank 0 leaves in flight until rank 1 (told by an event) has posted
counts at least that stretch as hidden. No ratio of measured times is compared with a threshold:
how much of a flight a sleep hides depends on the machine's load, not on the code.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from moemesh.errors import CollectiveError
from moemesh.mesh.gloo import GlooCollective, StoreWaker, init_gloo
from moemesh.mesh.overlap import hidden_seconds

pytestmark = pytest.mark.slow  # the module fixture spawns a gloo world

WORLD = 2
ROUNDS = 3
ROWS, WIDTH = 256, 64  # per destination block
EVENT_TIMEOUT_S = 30.0  # hang bound for the hand-offs between ranks


# ---- bookkeeping on recorded intervals -------------------------------------------------------------
def _posted(c: GlooCollective, start: float, posted: float) -> SimpleNamespace:
    """An exchange record with the fields count_exchange reads (accounting only: no world)."""
    x = SimpleNamespace(start=start, posted=posted)
    c.posted(x)
    return x


def test_hidden_seconds_is_the_span_less_the_blocked_intervals():
    assert hidden_seconds(1.0, 4.0, []) == pytest.approx(3.0)
    assert hidden_seconds(1.0, 4.0, [(0.0, 1.5), (2.0, 2.5), (3.5, 9.0)]) == pytest.approx(1.5)
    assert hidden_seconds(1.0, 4.0, [(0.0, 5.0)]) == 0.0
    assert hidden_seconds(4.0, 1.0, []) == 0.0  # completed before it could fly


def test_an_exchange_waited_for_at_once_is_all_exposed():
    c = GlooCollective(0, 2)
    c.count_exchange(_posted(c, 0.0, 0.1), done=2.0, called=0.1, returned=2.05)  # wait() right after posting
    assert (c.exchange_seconds, c.hidden_seconds, c.exposed_seconds) == pytest.approx((2.0, 0.0, 2.05))


def test_an_exchange_flying_during_compute_is_hidden_up_to_the_wait():
    c = GlooCollective(0, 2)
    c.count_exchange(_posted(c, 0.0, 0.1), done=2.0, called=1.5, returned=2.0)  # computed 0.1-1.5
    assert (c.exchange_seconds, c.hidden_seconds, c.exposed_seconds) == pytest.approx((2.0, 1.4, 0.6))


def test_two_in_flight_waited_in_order_hide_nothing():
    """Both posted back to back, nothing computed: the second flew while the engine was blocked in
    the first's wait (the two-micro-batch pattern), which is exposed time, not hidden."""
    c = GlooCollective(0, 2)
    first, second = _posted(c, 0.0, 0.1), _posted(c, 0.1, 0.2)
    c.count_exchange(first, done=1.0, called=0.2, returned=1.0)
    c.count_exchange(second, done=1.0, called=1.0, returned=1.0)
    assert c.hidden_seconds == 0.0 and c.exchange_seconds == pytest.approx(1.0 + 0.9)
    assert c.exposed_seconds == pytest.approx(0.1 + 0.8 + 0.1 + 0.0)


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


# ---- a real two-rank gloo world ----------------------------------------------------------------------
def _recording(collective: GlooCollective) -> list[tuple]:
    """Note every posting and every count the collective makes, in order (then do them)."""
    log: list[tuple] = []
    post, count = collective.posted, collective.count_exchange

    def posted(x) -> None:
        log.append(("post", id(x), x.start, x.posted))
        post(x)

    def count_exchange(x, done: float, called: float, returned: float) -> None:
        log.append(("count", id(x), done, called, returned))
        count(x, done, called, returned)

    collective.posted, collective.count_exchange = posted, count_exchange
    return log


def _replay(log: list[tuple]) -> tuple[float, float, float]:
    """The bookkeeping on the recorded times alone: (exchange, hidden, exposed) seconds."""
    c = GlooCollective(0, WORLD)
    records: dict[int, SimpleNamespace] = {}
    for kind, key, *times in log:
        if kind == "post":
            records[key] = _posted(c, *times)
        else:
            done, called, returned = times
            c.count_exchange(records[key], done=done, called=called, returned=returned)
    return c.exchange_seconds, c.hidden_seconds, c.exposed_seconds


def _send(rank: int, i: int) -> torch.Tensor:
    return torch.full((WORLD * ROWS, WIDTH), float(rank * 100 + i))  # (R*C, W)


def _check(recv: torch.Tensor, i: int) -> None:
    assert [float(recv[r * ROWS, 0]) for r in range(WORLD)] == [float(r * 100 + i) for r in range(WORLD)]


def _held(collective: GlooCollective, posted_evs, peer_evs) -> list[dict[str, float]]:
    """Rank 0 posts, tells rank 1, and waits only once rank 1 has posted too: the exchange cannot
    complete before rank 1's posting, which happens after rank 0's `told` stamp."""
    out = []
    for i in range(ROUNDS):
        before = collective.hidden_seconds
        if collective.rank == 0:
            pending = collective.all_to_all(_send(0, i))
            told = time.perf_counter()
            posted_evs[i].set()
            assert peer_evs[i].wait(EVENT_TIMEOUT_S)
            _check(pending.wait(), i)
            out.append({"hidden_s": collective.hidden_seconds - before, "held_s": told - pending.posted})
        else:
            assert posted_evs[i].wait(EVENT_TIMEOUT_S)
            pending = collective.all_to_all(_send(1, i))
            peer_evs[i].set()
            _check(pending.wait(), i)
    return out


def _two_in_flight(collective: GlooCollective) -> None:
    """Two exchanges posted back to back and waited for in order, nothing computed in between."""
    for i in range(ROUNDS):
        collective.all_gather(torch.zeros(1, dtype=torch.int64))  # a barrier: start each round together
        first = collective.all_to_all(_send(collective.rank, i))
        second = collective.all_to_all(_send(collective.rank, 10 + i))
        _check(first.wait(), i)
        _check(second.wait(), 10 + i)


def _rank_main(rank: int, port: int, posted_evs, peer_evs, out) -> None:
    torch.set_num_threads(1)
    collective = init_gloo("127.0.0.1", port, "test-gloo/", rank, WORLD, timeout_s=30)
    try:
        log = _recording(collective)
        held = _held(collective, posted_evs, peer_evs)
        _two_in_flight(collective)
        counters = (collective.exchange_seconds, collective.hidden_seconds, collective.exposed_seconds)
        out.put((rank, {"log": log, "held": held, "counters": counters}))
    finally:
        collective.close()


@pytest.fixture(scope="module")
def runs() -> dict[int, dict]:
    """Both scenarios on a real two-rank gloo world (spawned processes), per rank."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    posted_evs, peer_evs = [ctx.Event() for _ in range(ROUNDS)], [ctx.Event() for _ in range(ROUNDS)]
    procs = [ctx.Process(target=_rank_main, args=(r, store.port, posted_evs, peer_evs, out)) for r in range(WORLD)]
    try:
        for p in procs:
            p.start()
        return dict(out.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()


def test_real_counters_are_the_bookkeeping_of_the_recorded_times(runs):
    for rank, run in runs.items():
        posts = [e for e in run["log"] if e[0] == "post"]
        counts = [e for e in run["log"] if e[0] == "count"]
        assert len(posts) == len(counts) == 3 * ROUNDS, rank  # every exchange counted once
        for _, _, done, called, returned in counts:
            assert done <= returned and called <= returned
        exchange, hidden, exposed = run["counters"]
        assert (exchange, hidden, exposed) == pytest.approx(_replay(run["log"]), rel=1e-12, abs=1e-12), rank
        assert exchange > 0 and 0 <= hidden <= exchange


def test_an_exchange_held_in_flight_by_the_peer_counts_that_time_as_hidden(runs):
    """Rank 0 computed (told rank 1, waited for its event) while its exchange could not complete:
    at least the stretch from its posting to telling rank 1 is hidden, whatever the machine's load."""
    held = runs[0]["held"]
    assert len(held) == ROUNDS
    for h in held:
        assert h["held_s"] > 0
        assert h["hidden_s"] >= h["held_s"] - 1e-9  # the counter is a running float sum


# ---- worlds: failures are typed and bounded; a process moves on to the next generation ----------
GROUP_TIMEOUT_S = 60.0  # the group's own deadline: every failure below must come before it, typed


def _store() -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))


def _join_both(port: int, prefix: str, abandoned=lambda: False) -> list[GlooCollective]:
    """Two ranks of one world as threads of this process (gloo is thread-safe per group)."""
    out: list = [None, None]

    def join(rank: int) -> None:
        out[rank] = init_gloo("127.0.0.1", port, prefix, rank, WORLD, GROUP_TIMEOUT_S, abandoned)

    threads = [threading.Thread(target=join, args=(rank,)) for rank in range(WORLD)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(EVENT_TIMEOUT_S)
    assert all(c is not None for c in out), "rendezvous hung"
    return out


def _gather_both(collectives: list[GlooCollective], value: int) -> list[list[int]]:
    out: list = [None, None]

    def gather(rank: int) -> None:
        out[rank] = collectives[rank].all_gather(torch.tensor([value + rank])).flatten().tolist()

    threads = [threading.Thread(target=gather, args=(rank,)) for rank in range(WORLD)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(EVENT_TIMEOUT_S)
    return out


def test_ranks_leave_one_generation_and_form_the_next_in_the_same_process():
    store = _store()
    first = _join_both(store.port, "world/1/")
    assert _gather_both(first, 10) == [[10, 11], [10, 11]]
    for c in first:
        c.close()
    second = _join_both(store.port, "world/2/")  # no process-global default group stands in the way
    assert _gather_both(second, 20) == [[20, 21], [20, 21]]


def test_bytes_to_counts_every_block_sent_to_a_peer_padding_included_and_the_header():
    store = _store()
    both = _join_both(store.port, "bytes/")
    sends = [torch.zeros(WORLD * 3, 5) for _ in range(WORLD)]  # (R*C, W): blocks of 3 rows, all padding
    threads = [threading.Thread(target=lambda r=rank: both[r].all_to_all(sends[r]).wait()) for rank in range(WORLD)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(EVENT_TIMEOUT_S)
    assert [c.bytes_to for c in both] == [[0, 60], [60, 0]]  # 3 rows x 5 fp32 to the peer; its own stays
    _gather_both(both, 1)
    assert [c.bytes_to for c in both] == [[0, 68], [68, 0]]  # header: (R - 1) x one int64 to the next rank


def test_a_wait_on_a_peer_that_never_comes_is_given_up_once_a_newer_world_exists():
    store = _store()
    newer = threading.Event()
    collectives = _join_both(store.port, "world/1/", abandoned=newer.is_set)
    newer.set()  # the coordinator formed generation 2; rank 1 already left for it
    with pytest.raises(CollectiveError, match="abandoned"):
        collectives[0].all_gather(torch.tensor([1]))  # rank 1 never joins this one


def test_a_rank_that_gave_up_a_wait_leaves_at_once_and_joins_the_next_world():
    """Dropping a gloo group joins its threads, and one still runs the exchange this rank gave up
    (its peer is stopped, or left) until the group's timeout. Leaving must not wait for that: a
    stopped peer would hold the survivors out of the next world for --collective-timeout."""
    store = _store()
    newer = threading.Event()
    first = _join_both(store.port, "world/1/", abandoned=newer.is_set)
    newer.set()
    with pytest.raises(CollectiveError, match="abandoned"):
        first[0].all_gather(torch.tensor([1]))  # rank 1 never posts: its exchange stays in flight
    leaving = threading.Thread(target=first[0].close)
    leaving.start()
    leaving.join(EVENT_TIMEOUT_S)  # a hang bound, shorter than the group's timeout it must not wait for
    assert not leaving.is_alive(), "closing waited for the abandoned exchange"
    second = _join_both(store.port, "world/2/")
    assert _gather_both(second, 20) == [[20, 21], [20, 21]]


def _peer_then_sleep(port: int) -> None:
    collective = init_gloo("127.0.0.1", port, "world/1/", 1, WORLD, GROUP_TIMEOUT_S)
    collective.all_gather(torch.tensor([1]))
    time.sleep(GROUP_TIMEOUT_S)  # killed long before


def test_a_peer_killed_mid_collective_breaks_the_wait_as_a_collective_error_not_a_timeout():
    store = _store()
    peer = mp.get_context("spawn").Process(target=_peer_then_sleep, args=(store.port,))
    peer.start()
    try:
        me = init_gloo("127.0.0.1", store.port, "world/1/", 0, WORLD, GROUP_TIMEOUT_S)
        me.all_gather(torch.tensor([0]))  # both joined
        pending = me.all_to_all(torch.zeros(WORLD * 4, 8))  # the peer never posts its half
        peer.kill()
        with pytest.raises(CollectiveError, match="failed") as caught:
            pending.wait()
        assert "abandoned" not in str(caught.value)
    finally:
        peer.kill()
        peer.join(EVENT_TIMEOUT_S)


# ---- the idle waker across a restarted store ------------------------------------------------------
def test_the_store_waker_polls_while_its_store_is_down_and_uses_the_store_rehosted_on_the_same_port():
    """A coordinator's restart, in one process: the store goes away and comes back, empty, on the
    same port. Waits fail at once while it is away (no sleep of the long timeout); afterwards the
    wakers' clients are made again and a wake ends another rank's wait."""
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    port = master.port
    sleeper = StoreWaker("127.0.0.1", port, "gen3/wake/", timeout_s=EVENT_TIMEOUT_S)
    waker = StoreWaker("127.0.0.1", port, "gen3/wake/", timeout_s=EVENT_TIMEOUT_S)
    waker.wake(1)
    sleeper.wait(1)  # set: returns at once
    del master  # the store's coordinator is gone
    started = time.monotonic()
    for round_ in (2, 3, 4):
        sleeper.wait(round_)  # each fails (or finds no store) at once and sleeps the poll interval
        waker.wake(round_)  # lost: nobody to tell
    assert time.monotonic() - started < EVENT_TIMEOUT_S  # hang bound: no wait slept its timeout
    assert sleeper.reconnects == 0
    master = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    sleeper.wait(5)  # makes its client again, does not wait in this round
    assert sleeper.reconnects == 1
    woke = threading.Event()

    def sleep_in_round_6() -> None:
        sleeper.wait(6)
        woke.set()

    thread = threading.Thread(target=sleep_in_round_6, daemon=True)
    thread.start()
    waker.wake(6)  # its client is made again and the key set
    assert woke.wait(EVENT_TIMEOUT_S), "the wake after the restart did not end the wait"
    thread.join(EVENT_TIMEOUT_S)
    assert waker.reconnects == 1
    del master
