"""moemesh.rpc.Server: health follows set_ready / set_not_serving, on Check and on the streaming
Watch (which runs through the same error interceptor as every handler)."""

from __future__ import annotations

import asyncio

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
