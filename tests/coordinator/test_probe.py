"""HealthProbe against real gRPC servers on loopback port 0 and an address where nothing listens."""

from __future__ import annotations

import asyncio

import grpc

from coordinator.membership import WorkerInfo
from coordinator.probe import HealthProbe
from moemesh.rpc import Server
from tests.coordinator.test_reformation import dead_address


def at(address: str) -> WorkerInfo:
    return WorkerInfo("w", 1, address)


def test_any_answer_is_alive_and_silence_is_dead():
    async def scenario():
        probe = HealthProbe(timeout_s=2.0)
        serving, starting = Server([]), Server([])
        bare = grpc.aio.server()  # answers, but has no health service: UNIMPLEMENTED
        try:
            serving_port = await serving.start("127.0.0.1", 0)
            await serving.set_ready()
            starting_port = await starting.start("127.0.0.1", 0)  # NOT_SERVING until ready
            bare_port = bare.add_insecure_port("127.0.0.1:0")
            await bare.start()
            return await asyncio.gather(*(probe(at(f"127.0.0.1:{port}"))
                                          for port in (serving_port, starting_port, bare_port)),
                                        probe(at(dead_address())))
        finally:
            for server in (serving, starting):
                await server.stop(0)
            await bare.stop(0)

    assert asyncio.run(scenario()) == [True, True, True, False]
