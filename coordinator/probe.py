"""Is a worker alive? Ask its grpc.health.v1 service, with a deadline.

The only place the coordinator calls a worker: before forming a new world after a reported loss
or a vanished WaitForWorld, it probes the members it is unsure of. Any answer (SERVING,
NOT_SERVING, even an error status the server itself returned) means the process is alive;
UNAVAILABLE (nothing listening) and DEADLINE_EXCEEDED (no answer in time) mean it is dead.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.membership import WorkerInfo
from moemesh.rpc import channel
from moemesh.tls import TlsFiles

DEAD = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class HealthProbe:
    """`await probe(worker)` -> True if the worker's server answered a health check within `timeout_s`."""

    def __init__(self, timeout_s: float, tls: TlsFiles | None = None):
        self.timeout_s = timeout_s
        self.tls = tls

    async def __call__(self, worker: WorkerInfo) -> bool:
        async with channel(worker.address, self.tls) as ch:
            try:
                await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=self.timeout_s)
            except grpc.aio.AioRpcError as exc:
                return exc.code() not in DEAD
        return True
