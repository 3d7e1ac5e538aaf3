"""moemesh.retry: exponential backoff with a cap, an overall deadline and a stop event."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from moemesh.errors import UnavailableError
from moemesh.retry import Backoff, retry, retry_sync
from moemesh.status import is_not_yet

FAST = Backoff(first_s=0.001, cap_s=0.004)
HANG_GUARD_S = 30.0  # only catches a hang; no test compares durations


def test_delays_grow_by_the_factor_up_to_the_cap():
    delays = Backoff(first_s=0.1, cap_s=0.5, factor=2.0).delays()
    assert [round(next(delays), 3) for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]


@pytest.mark.parametrize("bad", [{"first_s": 0}, {"first_s": 1, "cap_s": 0.5}, {"factor": 0.5}, {"deadline_s": -1}])
def test_bad_backoff_is_rejected(bad):
    with pytest.raises(ValueError):
        Backoff(**bad)


class Flaky:
    """Fails with `exc` `failures` times, then returns "up"."""

    def __init__(self, failures: int, exc: Exception | None = None):
        self.failures, self.calls = failures, 0
        self.exc = exc or UnavailableError("not yet")

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc
        return "up"

    async def call(self) -> str:
        return self()


def _unavailable(exc: Exception) -> bool:
    return isinstance(exc, UnavailableError)


def test_retries_retryable_errors_until_success_and_reports_each_attempt():
    flaky, seen = Flaky(3), []
    result = asyncio.run(retry(flaky.call, _unavailable, backoff=FAST, on_retry=lambda n, e: seen.append(n)))
    assert (result, flaky.calls, seen) == ("up", 4, [1, 2, 3])
    assert retry_sync(Flaky(2), _unavailable, backoff=FAST) == "up"


def test_a_non_retryable_error_propagates_at_once():
    flaky = Flaky(5, KeyError("bad"))
    with pytest.raises(KeyError):
        asyncio.run(retry(flaky.call, _unavailable, backoff=FAST))
    assert flaky.calls == 1


def test_the_deadline_re_raises_the_last_error():
    flaky = Flaky(10**9)
    with pytest.raises(UnavailableError, match="not yet"):
        asyncio.run(retry(flaky.call, _unavailable, backoff=Backoff(first_s=0.001, cap_s=0.01, deadline_s=0.05)))
    assert flaky.calls > 1
    with pytest.raises(UnavailableError):
        retry_sync(Flaky(10**9), _unavailable, backoff=Backoff(first_s=0.001, cap_s=0.01, deadline_s=0.05))


def test_setting_stop_ends_a_wait_early_with_none():
    async def scenario():
        stop = asyncio.Event()
        flaky = Flaky(10**9)
        backoff = Backoff(first_s=3600, cap_s=3600)
        task = asyncio.create_task(retry(flaky.call, _unavailable, stop=stop, backoff=backoff))
        while flaky.calls == 0:
            await asyncio.sleep(0)
        stop.set()
        return await asyncio.wait_for(task, HANG_GUARD_S), flaky.calls

    assert asyncio.run(scenario()) == (None, 1)


def test_sync_stop_ends_a_wait_early_with_none():
    stop = threading.Event()
    flaky = Flaky(10**9)
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(
        retry_sync(flaky, _unavailable, stop=stop, backoff=Backoff(first_s=3600, cap_s=3600))))
    thread.start()
    while flaky.calls == 0:
        threading.Event().wait(0.001)
    stop.set()
    thread.join(HANG_GUARD_S)
    assert result == [None] and flaky.calls == 1


def test_a_set_stop_makes_no_attempt():
    stop = threading.Event()
    stop.set()
    flaky = Flaky(0)
    assert retry_sync(flaky, _unavailable, stop=stop) is None and flaky.calls == 0


def _rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="x")


def test_is_not_yet_retries_unavailable_and_deadline_only():
    assert is_not_yet(_rpc_error(grpc.StatusCode.UNAVAILABLE))
    assert is_not_yet(_rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED))
    assert not is_not_yet(_rpc_error(grpc.StatusCode.INVALID_ARGUMENT))
    assert not is_not_yet(UnavailableError("typed, not a gRPC error"))


def test_retry_against_a_real_server_that_starts_late(late_server):
    """A gRPC call to a port where the server comes up only after a few failures succeeds."""
    assert late_server() == "SERVING"


@pytest.fixture
def late_server():
    """Health-check a server that starts after the first failed attempt (real gRPC on loopback)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from moemesh.rpc import Server, channel

    async def scenario() -> str:
        server = Server(["test.Late"])
        port = await server.start("127.0.0.1", 0)
        await server.stop(0)  # the port is known and nothing listens on it now
        late = Server(["test.Late"])
        attempts = 0

        async def check() -> str:
            nonlocal attempts
            attempts += 1
            if attempts == 2:  # bring the server up on the same port after one failure
                assert await late.start("127.0.0.1", port) == port
                await late.set_ready()
            async with channel(f"127.0.0.1:{port}") as ch:
                reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5.0)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

        try:
            return await retry(check, is_not_yet, backoff=Backoff(first_s=0.01, cap_s=0.1, deadline_s=HANG_GUARD_S))
        finally:
            await late.stop(0)

    return lambda: asyncio.run(scenario())
