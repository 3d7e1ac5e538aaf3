"""moemesh.rpc.Server: health follows set_ready / set_not_serving, on Check and on the streaming
Watch (which runs through the same error interceptor as every handler)."""

from __future__ import annotations

import asyncio
import collections

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moemesh.rpc import Server

SERVICE = "moemesh.v1.Gateway"
CALL_TIMEOUT_S = 10.0  # a hang bound
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


async def _scenario() -> tuple[list[int], list[int]]:
    server = Server([SERVICE])
    port = await server.start("127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            request = health_pb2.HealthCheckRequest(service=SERVICE)
            checks = [(await stub.Check(request, timeout=CALL_TIMEOUT_S)).status]
            watch = stub.Watch(request, timeout=CALL_TIMEOUT_S)
            seen = [(await watch.read()).status]
            await server.set_ready()
            seen.append((await watch.read()).status)
            checks.append((await stub.Check(request, timeout=CALL_TIMEOUT_S)).status)
            await server.set_not_serving()
            seen.append((await watch.read()).status)
            checks.append((await stub.Check(request, timeout=CALL_TIMEOUT_S)).status)
            watch.cancel()
            return checks, seen
    finally:
        await server.stop(0.1)


def test_health_check_and_watch_follow_the_servers_state():
    checks, seen = asyncio.run(_scenario())
    assert checks == [NOT_SERVING, SERVING, NOT_SERVING]
    assert seen == [NOT_SERVING, SERVING, NOT_SERVING]


def _bad_utf8(service: str = "ab") -> bytes:
    """A serialized HealthCheckRequest whose string field holds bytes that are not UTF-8."""
    good = health_pb2.HealthCheckRequest(service=service).SerializeToString()
    return good.replace(service.encode(), b"\xff\xfe")


def _count_requests_handler() -> grpc.GenericRpcHandler:
    """A client-streaming method (raw grpc, parsed by protobuf) answering how many requests it read."""
    async def count(requests, context):
        n = 0
        async for _ in requests:
            n += 1
        return health_pb2.HealthCheckResponse(status=n)

    handler = grpc.stream_unary_rpc_method_handler(count, health_pb2.HealthCheckRequest.FromString,
                                                   health_pb2.HealthCheckResponse.SerializeToString)
    return grpc.method_handlers_generic_handler("test.Count", {"Count": handler})


async def _bad_utf8_scenario() -> list[tuple[grpc.StatusCode, str]]:
    server = Server([SERVICE])
    server.grpc.add_generic_rpc_handlers((_count_requests_handler(),))
    port = await server.start("127.0.0.1", 0)
    answers = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:  # raw bytes: no client-side parsing
            good = health_pb2.HealthCheckRequest(service="ab").SerializeToString()
            calls = [ch.unary_unary("/grpc.health.v1.Health/Check")(_bad_utf8(), timeout=CALL_TIMEOUT_S),
                     _read_all(ch.unary_stream("/grpc.health.v1.Health/Watch")(_bad_utf8(), timeout=CALL_TIMEOUT_S)),
                     ch.stream_unary("/test.Count/Count")(iter([good, _bad_utf8()]), timeout=CALL_TIMEOUT_S)]
            for call in calls:
                try:
                    await call
                except grpc.aio.AioRpcError as exc:
                    answers.append((exc.code(), exc.details()))
            counted = await ch.stream_unary("/test.Count/Count")(iter([good, good]), timeout=CALL_TIMEOUT_S)
            answers.append((grpc.StatusCode.OK, str(health_pb2.HealthCheckResponse.FromString(counted).status)))
    finally:
        await server.stop(0)
    return answers


async def _read_all(call) -> list:
    return [message async for message in call]


def test_a_string_field_with_bad_utf8_is_invalid_argument_in_every_kind_of_call():
    answers = asyncio.run(_bad_utf8_scenario())
    assert [code for code, _ in answers[:3]] == [grpc.StatusCode.INVALID_ARGUMENT] * 3  # grpc alone says UNKNOWN
    for _, details in answers[:3]:
        assert "does not parse" in details and "UTF-8" in details and "HealthCheckRequest" in details
    assert answers[3] == (grpc.StatusCode.OK, "2")  # good messages still parse


async def _over_the_limit_scenario() -> tuple[grpc.StatusCode, int]:
    server = Server([SERVICE], max_concurrent_rpcs=1)
    port = await server.start("127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            request = health_pb2.HealthCheckRequest(service=SERVICE)
            watch = stub.Watch(request, timeout=CALL_TIMEOUT_S)
            first = (await watch.read()).status  # the Watch is in progress: it holds the one slot
            try:
                await stub.Check(request, timeout=CALL_TIMEOUT_S)
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
            watch.cancel()
            return code, first
    finally:
        await server.stop(0)


def test_a_call_over_max_concurrent_rpcs_is_resource_exhausted():
    code, first = asyncio.run(_over_the_limit_scenario())
    assert first == NOT_SERVING
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


async def _burst_scenario(calls: int) -> collections.Counter[str]:
    server = Server([SERVICE], max_concurrent_rpcs=64)
    port = await server.start("127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            request = health_pb2.HealthCheckRequest(service=SERVICE)

            async def one() -> str:
                try:
                    await stub.Check(request, timeout=CALL_TIMEOUT_S * 6)
                    return "OK"
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name

            return collections.Counter(await asyncio.gather(*(one() for _ in range(calls))))
    finally:
        await server.stop(0)


def test_a_burst_of_calls_is_answered_never_cancelled_by_grpcs_backlog_limit():
    """gRPC core cancels calls over its backlog of 1000 waiting to be picked up (CANCELLED, as if the
    client had given up); a Server keeps a larger backlog, so each call gets its answer: OK, or
    RESOURCE_EXHAUSTED over max_concurrent_rpcs."""
    seen = asyncio.run(_burst_scenario(2500))
    assert set(seen) <= {"OK", "RESOURCE_EXHAUSTED"} and seen["OK"], seen


# --- mTLS, the role rules and gates (real certificates from moemesh.certs, a real server) ---

CHECK = "/grpc.health.v1.Health/Check"


def _tls(folder, role: str):
    from moemesh.certs import role_files
    from moemesh.tls import TlsFiles

    files = role_files(folder, role)
    return TlsFiles(files.cert, files.key, files.ca)


async def _check(port: int, tls) -> grpc.StatusCode:
    """The status of one health Check over mTLS with `tls` (None: plaintext)."""
    from moemesh.rpc import channel

    async with channel(f"127.0.0.1:{port}", tls) as ch:
        try:
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_an_mtls_server_refuses_peers_without_a_ca_signed_certificate_and_applies_role_rules(tmp_path):
    from moemesh.certs import write_certs
    from moemesh.tls import TlsFiles

    write_certs(tmp_path / "ca")
    write_certs(tmp_path / "other")
    mine = _tls(tmp_path / "ca", "client")
    callers = {
        "admin": _tls(tmp_path / "ca", "admin"),
        "client": mine,
        "plaintext": None,
        "another CA": _tls(tmp_path / "other", "admin"),
        "wrong key": TlsFiles(mine.cert, _tls(tmp_path / "ca", "admin").key, mine.ca),
        "admin again": _tls(tmp_path / "ca", "admin"),  # the server still serves after the refusals
    }

    async def scenario():
        server = Server([SERVICE], tls=_tls(tmp_path / "ca", "coordinator"), roles={CHECK: ("admin",)})
        port = await server.start("127.0.0.1", 0)
        try:
            return {name: await _check(port, tls) for name, tls in callers.items()}
        finally:
            await server.stop(0.1)

    codes = asyncio.run(scenario())
    assert codes == {"admin": grpc.StatusCode.OK, "client": grpc.StatusCode.PERMISSION_DENIED,
                     "plaintext": grpc.StatusCode.UNAVAILABLE, "another CA": grpc.StatusCode.UNAVAILABLE,
                     "wrong key": grpc.StatusCode.UNAVAILABLE, "admin again": grpc.StatusCode.OK}


def test_without_tls_role_rules_are_not_enforced_and_a_gates_rate_limit_sends_retry_after():
    from moemesh.errors import RateLimitedError

    seen: list[str] = []

    def gate(method, request, context):
        seen.append(method)
        if len(seen) > 1:
            raise RateLimitedError("slow down", retry_after_s=2.2)

    async def scenario():
        server = Server([SERVICE], roles={CHECK: ("admin",)}, gates=[gate])
        port = await server.start("127.0.0.1", 0)
        try:
            first = await _check(port, None)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                call = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S)
                try:
                    await call
                except grpc.aio.AioRpcError as exc:
                    return first, exc.code(), dict(exc.trailing_metadata() or ())
        finally:
            await server.stop(0.1)
        return first, grpc.StatusCode.OK, {}

    first, limited, trailing = asyncio.run(scenario())
    assert first == grpc.StatusCode.OK and seen[0] == CHECK
    assert limited == grpc.StatusCode.RESOURCE_EXHAUSTED and trailing.get("retry-after") == "3"
