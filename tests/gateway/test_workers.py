"""The worker pool against scripted workers (real gRPC on loopback, in-process, fast): typed events,
one token count per request, failures, Cancel on release, the admission limit, balancing."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from gateway.errors import NoWorkerError
from gateway.events import Failed, Finished, Tokens
from gateway.workers import Handle, submit_message
from moemesh.engine.sampling_wire import sampling_from_proto
from moemesh.errors import CapacityError
from moemesh.v1 import common_pb2
from tests.gateway.scripted import (
    BREAK,
    HANG_BOUND_S,
    ScriptedWorker,
    batch,
    finished,
    prepared,
    rejected,
    scripted_pool,
    tokens,
    world,
)

LENGTH, ERROR = common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_ERROR


def hold(submit):
    """Script: the request runs until cancelled."""
    return []


async def take(sink: asyncio.Queue, n: int) -> list:
    """The next `n` (tag, event) items of a sink."""
    return [await asyncio.wait_for(sink.get(), HANG_BOUND_S) for _ in range(n)]


async def ended(handle: Handle) -> list:
    """Every event of `handle` up to its last one (Finished or Failed)."""
    events: list = []
    while not events or isinstance(events[-1], Tokens):
        events.append((await take(handle.sink, 1))[0][1])
    return events


def test_worker_events_become_typed_events_and_the_handle_counts_the_tokens():
    def script(s):
        rid = s.request_id
        return [batch(tokens(rid, 5), tokens(rid, 6, 7)), tokens(rid, 8), finished(rid, LENGTH, completion=99)]

    async def scenario():
        worker = ScriptedWorker(0, script)
        async with scripted_pool([worker]) as pool:
            sink: asyncio.Queue = asyncio.Queue()
            (handle,) = await pool.submit([prepared((4, 5), max_new_tokens=10)], sink)
            events = await ended(handle)
            return worker, handle, events, pool.inflight, pool.outstanding([0])

    worker, handle, events, inflight, outstanding = asyncio.run(scenario())
    assert events == [Tokens((5,), 0), Tokens((6, 7), 1), Tokens((8,), 3), Finished(LENGTH)]
    assert handle.generated == [5, 6, 7, 8] and handle.tokens == 4 and handle.done
    assert inflight == 1  # until released
    assert outstanding == {0: 0}  # an ended request weighs nothing
    (submit,) = worker.submits
    assert list(submit.prompt_token_ids) == [4, 5] and submit.sampling.max_new_tokens == 10
    assert submit.request_id == handle.worker_request_id and not submit.generated_token_ids


def test_a_rejection_is_failed_with_the_workers_code_and_a_finished_without_reason_is_an_error():
    def script(s):
        rid = s.request_id
        if s.prompt_token_ids[0] == 1:
            return [rejected(rid, grpc.StatusCode.RESOURCE_EXHAUSTED, "no free slot")]
        return [tokens(rid, 3), finished(rid, common_pb2.FINISH_REASON_UNSPECIFIED)]

    async def scenario():
        async with scripted_pool([ScriptedWorker(0, script)]) as pool:
            handles = await pool.submit([prepared((1,)), prepared((2,))], asyncio.Queue())
            return [await ended(h) for h in handles], pool.links[0].name

    (refused, odd), name = asyncio.run(scenario())
    assert refused == [Failed(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{name} rejected the request: no free slot")]
    assert odd == [Tokens((3,), 0), Finished(ERROR, f"{name} gave no reason")]


def test_with_migrations_off_a_broken_stream_fails_its_requests_unavailable_and_the_link_comes_back():
    def script(s):
        rid = s.request_id
        return {1: [], 2: [tokens(rid, 9)], 3: [BREAK], 4: [tokens(rid, 4), finished(rid, LENGTH)]}[
            s.prompt_token_ids[0]]

    async def scenario():
        worker = ScriptedWorker(0, script)
        async with scripted_pool([worker], max_migrations=0) as pool:
            sink: asyncio.Queue = asyncio.Queue()
            waiting, streaming = await pool.submit([prepared((1,)), prepared((2,))], sink)
            assert await take(sink, 1) == [(1, Tokens((9,), 0))]
            (breaking,) = await pool.submit([prepared((3,))], asyncio.Queue())
            events = [await ended(h) for h in (waiting, streaming, breaking)]
            await worker.wait_for(lambda: worker.streams == 2)
            assert pool.links[0].up  # set before the new stream could reach the worker
            (after,) = await pool.submit([prepared((4,))], asyncio.Queue())
            return events, [waiting.tokens, streaming.tokens], await ended(after)

    events, counts, later = asyncio.run(scenario())
    for *_, last in events:
        assert isinstance(last, Failed) and last.code == grpc.StatusCode.UNAVAILABLE
        assert "worker rank 0" in last.message and "Serve stream broke" in last.message
        assert "gave up after 0 migrations" in last.message
    assert counts == [0, 1]
    assert later == [Tokens((4,), 0), Finished(LENGTH)]


def test_release_sends_cancel_once_and_later_events_of_it_are_dropped():
    def script(s):
        rid = s.request_id
        return [tokens(rid, 1)] if s.prompt_token_ids[0] == 1 else [tokens(rid, 2), finished(rid, LENGTH)]

    async def scenario():
        worker = ScriptedWorker(0, script)
        async with scripted_pool([worker]) as pool:
            running_sink: asyncio.Queue = asyncio.Queue()
            (running,) = await pool.submit([prepared((1,))], running_sink)
            await take(running_sink, 1)
            pool.release(running)
            pool.release(running)  # idempotent
            await worker.wait_for(lambda: len(worker.cancels) == 1)
            # The worker answers the Cancel with Finished{CANCELLED} before the next request's events.
            (later,) = await pool.submit([prepared((2,))], asyncio.Queue())
            later_events = await ended(later)
            pool.release(later)  # ended already: no Cancel
            (last,) = await pool.submit([prepared((2,))], asyncio.Queue())
            await ended(last)
            return worker.cancels, running, running_sink.qsize(), later_events, pool.inflight

    cancels, running, left, later_events, inflight = asyncio.run(scenario())
    assert cancels == [running.worker_request_id]
    assert left == 0  # the Finished{CANCELLED} reply went nowhere
    assert later_events == [Tokens((2,), 0), Finished(LENGTH)]
    assert inflight == 1  # only `last`, not released


def test_the_admission_limit_refuses_all_or_nothing():
    async def scenario():
        worker = ScriptedWorker(0, hold)
        async with scripted_pool([worker], max_inflight=2) as pool:
            first = await pool.submit([prepared()], asyncio.Queue())
            with pytest.raises(CapacityError, match="1 requests in flight, limit 2") as over:
                await pool.submit([prepared(), prepared()], asyncio.Queue())
            second = await pool.submit([prepared()], asyncio.Queue())
            with pytest.raises(CapacityError):
                await pool.submit([prepared()], asyncio.Queue())
            pool.release(first[0])
            third = await pool.submit([prepared()], asyncio.Queue())
            await worker.wait_for(lambda: len(worker.submits) == 3)
            return over.value, [first, second, third], worker.submits

    _, handles, submits = asyncio.run(scenario())
    assert [s.request_id for s in submits] == [h[0].worker_request_id for h in handles]


def test_requests_go_to_the_worker_with_the_fewest_outstanding_tokens():
    """Budgets 100 then 10 then 10: rank 0, rank 1, rank 1; then 95 tokens arrive on rank 0 and
    the balancer, reading the handle's count, sends the next one there."""
    def script(s):
        rid = s.request_id
        return [tokens(rid, *range(95))] if s.sampling.max_new_tokens == 100 else []

    async def scenario():
        workers = [ScriptedWorker(0, script), ScriptedWorker(1, script)]
        async with scripted_pool(workers) as pool:
            sink: asyncio.Queue = asyncio.Queue()
            big, small = await pool.submit([prepared(max_new_tokens=100), prepared(max_new_tokens=10)], sink)
            (third,) = await pool.submit([prepared(max_new_tokens=10)], asyncio.Queue())
            await take(sink, 1)
            load = pool.outstanding([0, 1])
            (fourth,) = await pool.submit([prepared(max_new_tokens=10)], asyncio.Queue())
            return [h.rank for h in (big, small, third, fourth)], load, big.tokens

    ranks, load, counted = asyncio.run(scenario())
    assert ranks == [0, 1, 1, 0]
    assert counted == 95 and load == {0: 5, 1: 20}


UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def test_the_submit_of_a_migrated_request_carries_the_prompt_the_tokens_streamed_and_the_same_sampling():
    item = prepared((4, 5, 6), max_new_tokens=9, temperature=0.5, top_k=5, seed=1234, stop_token_ids=(3,))
    handle = Handle("gw-7", 0, item, asyncio.Queue(), generated=[11, 12])
    message = submit_message(handle).submit
    assert message.request_id == "gw-7"
    assert list(message.prompt_token_ids) == [4, 5, 6] and list(message.generated_token_ids) == [11, 12]
    assert sampling_from_proto(message.sampling) == item.params  # same seed: the same draws per position


def test_a_broken_stream_migrates_its_requests_with_the_tokens_streamed_and_offsets_continue():
    """Worker 0 streams 2 tokens then its stream breaks: the request goes to worker 1 under a new
    id with those 2 tokens, the same prompt and sampling; worker 1's tokens come at offset 2."""
    def breaking(s):
        return [tokens(s.request_id, 5, 6), BREAK]

    def resuming(s):
        return [tokens(s.request_id, 7), finished(s.request_id, LENGTH, completion=3)]

    async def scenario():
        workers = [ScriptedWorker(0, breaking), ScriptedWorker(1, resuming)]
        async with scripted_pool(workers) as pool:
            (handle,) = await pool.submit([prepared((4,), max_new_tokens=3, temperature=1.0, seed=9)],
                                          asyncio.Queue())
            first_id = handle.worker_request_id
            events = await ended(handle)
            await workers[0].wait_for(lambda: workers[0].streams == 2)  # the link came back
            return workers, handle, first_id, events, pool.migrations

    workers, handle, first_id, events, migrations = asyncio.run(scenario())
    assert events == [Tokens((5, 6), 0), Tokens((7,), 2), Finished(LENGTH)]
    assert handle.generated == [5, 6, 7] and handle.migrations == 1 and migrations == 1
    (original,), (resumed,) = workers[0].submits, workers[1].submits
    assert original.request_id == first_id and resumed.request_id == handle.worker_request_id != first_id
    assert list(resumed.prompt_token_ids) == [4] and list(resumed.generated_token_ids) == [5, 6]
    assert resumed.sampling == original.sampling and resumed.sampling.seed == 9


def test_rejected_unavailable_even_after_tokens_migrates_away_from_the_worker_that_let_go():
    """Worker 0 gives the request back (Rejected{UNAVAILABLE} after a token): it goes to worker 1
    although worker 1 is busier, since worker 0 let go of it in this world."""
    def leaving(s):
        rid = s.request_id
        if s.sampling.max_new_tokens == 100:
            return []
        return [tokens(rid, 5), rejected(rid, UNAVAILABLE, "worker rank 0 lost its mesh")]

    def resuming(s):
        return [] if s.sampling.max_new_tokens == 100 else [tokens(s.request_id, 6), finished(s.request_id, LENGTH)]

    async def scenario():
        workers = [ScriptedWorker(0, leaving), ScriptedWorker(1, resuming)]
        async with scripted_pool(workers) as pool:
            handle, busy = await pool.submit([prepared(max_new_tokens=4), prepared(max_new_tokens=100)],
                                             asyncio.Queue())
            ranks = (handle.rank, busy.rank)
            events = await ended(handle)
            return workers, ranks, handle, events

    workers, ranks, handle, events = asyncio.run(scenario())
    assert ranks == (0, 1)
    assert events == [Tokens((5,), 0), Tokens((6,), 1), Finished(LENGTH)]
    assert handle.rank == 1 and handle.migrations == 1
    assert list(workers[1].submits[-1].generated_token_ids) == [5]


def test_migrations_are_bounded_then_the_request_fails_unavailable():
    """Every submission streams one token and breaks the stream; with --max-migrations 2 the third
    break ends the request: three tokens at offsets 0, 1, 2, then Failed(UNAVAILABLE)."""
    def script(s):
        return [tokens(s.request_id, 10 + len(s.generated_token_ids)), BREAK]

    async def scenario():
        worker = ScriptedWorker(0, script)
        async with scripted_pool([worker], max_migrations=2) as pool:
            (handle,) = await pool.submit([prepared(max_new_tokens=50)], asyncio.Queue())
            return await ended(handle), [list(s.generated_token_ids) for s in worker.submits], pool.migrations

    events, resumed_from, migrations = asyncio.run(scenario())
    assert events[:3] == [Tokens((10,), 0), Tokens((11,), 1), Tokens((12,), 2)]
    assert isinstance(events[3], Failed) and events[3].code == UNAVAILABLE
    assert "gave up after 2 migrations" in events[3].message and "Serve stream broke" in events[3].message
    assert resumed_from == [[], [10], [10, 11]] and migrations == 2


def test_a_request_whose_tokens_were_all_streamed_finishes_instead_of_migrating():
    def script(s):
        return [tokens(s.request_id, 1, 2), BREAK]

    async def scenario():
        worker = ScriptedWorker(0, script)
        async with scripted_pool([worker]) as pool:
            (handle,) = await pool.submit([prepared(max_new_tokens=2)], asyncio.Queue())
            return await ended(handle), len(worker.submits), pool.migrations

    events, submits, migrations = asyncio.run(scenario())
    assert events == [Tokens((1, 2), 0), Finished(LENGTH)]
    assert (submits, migrations) == (1, 0)


def test_a_new_world_keeps_the_streams_of_members_still_present_and_migrates_those_of_members_gone():
    """World 1: A (rank 0), B (rank 1). World 2: B (rank 0), C (rank 1). B keeps its one stream and
    its request (now on rank 0); A's stream is closed and its request moves at once to the live
    member, B (C's stream is not open yet); C gets a stream and the next request, C being less loaded."""
    async def scenario():
        a, b, c = ScriptedWorker(0, hold), ScriptedWorker(1, hold), ScriptedWorker(2, hold)
        async with scripted_pool([a, b, c], connect=False) as pool:
            assert await asyncio.wait_for(pool.connect(world(1, a, b), asyncio.Event()), HANG_BOUND_S)
            on_a, on_b = await pool.submit([prepared(max_new_tokens=10), prepared(max_new_tokens=20)],
                                           asyncio.Queue())
            before = (on_a.rank, on_b.rank, on_a.worker_request_id)
            pool.apply_world(world(2, b, c))
            await b.wait_for(lambda: len(b.submits) == 2)
            await asyncio.wait_for(pool.until_connected(asyncio.Event()), HANG_BOUND_S)
            (later,) = await pool.submit([prepared(max_new_tokens=5)], asyncio.Queue())
            await c.wait_for(lambda: len(c.submits) == 1)
            links = {rank: link.key for rank, link in pool.links.items()}
            return (a, b, c), before, (on_a, on_b, later), links, pool.generation, pool.migrations

    (a, b, c), before, (on_a, on_b, later), links, generation, migrations = asyncio.run(scenario())
    assert before[:2] == (0, 1)
    assert (b.streams, c.streams, a.streams) == (1, 1, 1)  # B's stream kept, not reopened
    assert links == {0: ("w1", 0), 1: ("w2", 0)} and generation == 2
    assert on_b.rank == 0 and b.submits[0].request_id == on_b.worker_request_id and on_b.migrations == 0
    assert on_a.rank == 0 and on_a.migrations == 1 == migrations
    assert b.submits[1].request_id == on_a.worker_request_id != before[2]
    assert later.rank == 1 and c.submits[0].request_id == later.worker_request_id


def test_a_member_with_a_new_incarnation_is_a_new_member():
    async def scenario():
        a = ScriptedWorker(0, hold)
        async with scripted_pool([a]) as pool:
            (handle,) = await pool.submit([prepared()], asyncio.Queue())
            await a.wait_for(lambda: len(a.submits) == 1)
            pool.apply_world(world(2, (a, 1)))  # the same worker_id, restarted
            await a.wait_for(lambda: len(a.submits) == 2)
            return a.streams, handle.migrations, [s.request_id for s in a.submits]

    streams, migrations, ids = asyncio.run(scenario())
    assert streams == 2 and migrations == 1 and ids[0] != ids[1]


def test_a_request_waits_while_the_world_cannot_serve_and_runs_once_one_can():
    """An unservable world: streams open, but a new request waits (the admission limit still
    answers at once); the next world can serve and the request runs there."""
    def script(s):
        return [tokens(s.request_id, 3), finished(s.request_id, LENGTH)]

    async def scenario():
        a = ScriptedWorker(0, script)
        async with scripted_pool([a], max_inflight=1, connect=False) as pool:
            assert pool.not_serving_reason.startswith("no world formed yet")
            await asyncio.wait_for(pool.connect(world(1, a, unservable_reason="layer 1 expert 3 has no replica"),
                                                asyncio.Event()), HANG_BOUND_S)
            reason = pool.not_serving_reason
            waiting = asyncio.create_task(pool.submit([prepared()], asyncio.Queue()))
            await asyncio.sleep(0)  # let it reach its wait
            with pytest.raises(CapacityError):
                await pool.submit([prepared()], asyncio.Queue())
            submitted_while_unservable = len(a.submits)
            pool.apply_world(world(2, a))
            (handle,) = await asyncio.wait_for(waiting, HANG_BOUND_S)
            return reason, submitted_while_unservable, await ended(handle), pool.not_serving_reason

    reason, early, events, after = asyncio.run(scenario())
    assert reason == "world 1 cannot serve: layer 1 expert 3 has no replica"
    assert early == 0 and events == [Tokens((3,), 0), Finished(LENGTH)] and after == ""


@pytest.mark.parametrize("recovery_wait_s, deadline_in_s", [(0.2, None), (HANG_BOUND_S * 10, 0.2)])
def test_waiting_for_a_live_worker_is_bounded_by_the_recovery_wait_and_the_deadline(recovery_wait_s, deadline_in_s):
    async def scenario():
        a = ScriptedWorker(0, hold)
        async with scripted_pool([a], connect=False, recovery_wait_s=recovery_wait_s) as pool:
            pool.apply_world(world(1, a, unservable_reason="no replica of layer 0 expert 1"))
            deadline = None if deadline_in_s is None else time.monotonic() + deadline_in_s
            with pytest.raises(NoWorkerError) as refused:
                await asyncio.wait_for(pool.submit([prepared()], asyncio.Queue(), deadline), HANG_BOUND_S)
            return str(refused.value), pool.inflight

    message, inflight = asyncio.run(scenario())
    assert "no live worker: world 1 cannot serve: no replica of layer 0 expert 1" in message
    assert inflight == 0


def test_a_migrating_request_waits_for_a_member_that_may_take_it_then_fails_past_the_bound():
    """The only worker lets go of the request: nobody else may take it in this world, so it waits
    and fails UNAVAILABLE after --recovery-wait; another request that waits the same way is taken
    by the member of the next world."""
    def leaving(s):
        return [rejected(s.request_id, UNAVAILABLE, "worker is leaving its mesh")]

    def script(s):
        return [tokens(s.request_id, 8), finished(s.request_id, LENGTH)]

    async def scenario():
        a, b = ScriptedWorker(0, leaving), ScriptedWorker(1, script)
        async with scripted_pool([a, b], connect=False, recovery_wait_s=0.3) as pool:
            await asyncio.wait_for(pool.connect(world(1, a), asyncio.Event()), HANG_BOUND_S)
            (doomed,) = await pool.submit([prepared()], asyncio.Queue())
            doomed_events = await ended(doomed)
            pool.recovery_wait_s = HANG_BOUND_S
            (saved,) = await pool.submit([prepared()], asyncio.Queue())
            await a.wait_for(lambda: len(a.submits) == 2)
            pool.apply_world(world(2, b))
            return doomed_events, await ended(saved)

    doomed_events, saved_events = asyncio.run(scenario())
    (failed,) = doomed_events
    assert isinstance(failed, Failed) and failed.code == UNAVAILABLE
    assert "worker is leaving its mesh" in failed.message and "no worker took it within" in failed.message
    assert saved_events == [Tokens((8,), 0), Finished(LENGTH)]
