"""gateway.api_keys: the API key gate on a real grpc server (moemesh.rpc.Server, health only): health
and reflection open by default, guarded with --api-keys-guard-health; a key's max_tokens applies to
a Generate request's max_new_tokens (or the gateway's default when sampling is unset)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.api_keys import ApiKeyGate
from moemesh.auth import KeyGuard, key_digest, parse_key_file
from moemesh.errors import CapacityError
from moemesh.rpc import Server
from moemesh.v1 import gateway_pb2

KEY = "mm-gate-test"
CALL_S = 10.0  # hang bound


def _gate(guard_health: bool) -> ApiKeyGate:
    return ApiKeyGate(KeyGuard(parse_key_file(f"{key_digest(KEY)} max_tokens=8\n")), default_max_new_tokens=16,
                      guard_health=guard_health)


async def _health_codes(guard_health: bool) -> dict[str, grpc.StatusCode]:
    server = Server(["moemesh.v1.Gateway"], gates=[_gate(guard_health)])
    port = await server.start("127.0.0.1", 0)
    codes = {}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            for name, metadata in (("no key", ()), ("key", (("authorization", f"Bearer {KEY}"),))):
                try:
                    await stub.Check(health_pb2.HealthCheckRequest(), timeout=CALL_S, metadata=metadata)
                    codes[name] = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as exc:
                    codes[name] = exc.code()
    finally:
        await server.stop(0.1)
    return codes


def test_health_is_open_by_default_and_guarded_on_request():
    assert asyncio.run(_health_codes(False)) == {"no key": grpc.StatusCode.OK, "key": grpc.StatusCode.OK}
    assert asyncio.run(_health_codes(True)) == {"no key": grpc.StatusCode.UNAUTHENTICATED,
                                                "key": grpc.StatusCode.OK}


class _Context:
    """Only what the gate reads of a servicer context: the call's metadata."""

    def invocation_metadata(self):
        return (("authorization", f"Bearer {KEY}"),)


def test_max_tokens_counts_max_new_tokens_or_the_default_and_every_prompt_of_a_batch():
    gate, method = _gate(False), "/moemesh.v1.Gateway/Generate"
    small = gateway_pb2.GenerateRequest()
    small.sampling.max_new_tokens = 8
    gate(method, small, _Context())
    with pytest.raises(CapacityError, match="asked for 16"):
        gate(method, gateway_pb2.GenerateRequest(), _Context())  # unset sampling: the default of 16
    big = gateway_pb2.GenerateRequest()
    big.sampling.max_new_tokens = 9
    with pytest.raises(CapacityError, match="asked for 9"):
        gate("/moemesh.v1.Gateway/GenerateBatch", gateway_pb2.GenerateBatchRequest(requests=[small, big]), _Context())
