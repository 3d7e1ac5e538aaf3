"""The worker pool against scripted workers (real gRPC on loopback, in-process, fast): typed events,
one token count per request, failures, Cancel on release, the admission limit, balancing."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from gateway.events import Failed, Finished, Tokens
from gateway.workers import Handle
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
