"""A real mesh for end-to-end tests: coordinator, N expert workers and a gateway as subprocesses.

Nothing is mocked: the mesh is started by the one launcher (moemesh.launch); each process binds
port 0 and publishes its port through a port file, logs to logs/NAME.log; `running_mesh` yields once
the gateway reports SERVING and always stops every process it started (gateway first, then
workers, then the coordinator).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from moemesh.launch import Mesh, MeshSpec, running
from moemesh.model.tiny import TinySpec, write_tiny_model
from moemesh.rpc import channel
from moemesh.v1 import coordinator_pb2, coordinator_pb2_grpc, worker_pb2, worker_pb2_grpc

TINY = TinySpec(hidden=64, intermediate=64, layers=2, experts=8, heads=4, kv_heads=2, vocab=512)
START_TIMEOUT_S = 120.0
QUIET_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
SETTLE_S = 60.0  # hang bound: how long a cancellation may take to reach the workers


@contextlib.contextmanager
def running_mesh(
    tmp: Path, *, workers: int = 2, gateway_flags: Sequence[str] = (), worker_flags: Sequence[str] = (),
    spec: TinySpec = TINY,
) -> Iterator[Mesh]:
    """Start coordinator, gateway and `workers` workers; yield when the gateway is SERVING.
    The gateway starts before any worker: it must wait for the world by itself."""
    tmp.mkdir(parents=True, exist_ok=True)
    model_dir = tmp / "model"
    if not (model_dir / "config.json").exists():
        write_tiny_model(model_dir, spec)
    mesh = MeshSpec(model=model_dir, workers=workers, state_dir=tmp, log_dir=tmp / "logs", gateway_first=True,
                    worker_flags=("--threads", "1", "--max-seqs", "8", *worker_flags),
                    gateway_flags=tuple(gateway_flags), env=QUIET_ENV, start_timeout_s=START_TIMEOUT_S)
    with running(mesh) as m:
        yield m


@dataclass(frozen=True)
class WorkersSeen:
    """From every worker's Status: requests running or waiting in total, and the engine steps
    executed (ranks step in lockstep; the most of any rank). A request making n tokens is
    running for at least n steps, so fewer steps than that since it was submitted prove that
    it was stopped early, on any machine."""

    load: int
    steps: int


async def workers_seen(coordinator: str) -> WorkersSeen:
    async with channel(coordinator) as ch:
        world = await coordinator_pb2_grpc.CoordinatorStub(ch).WaitForWorld(
            coordinator_pb2.WaitForWorldRequest(), timeout=5)
    load = steps = 0
    for member in world.members:
        async with channel(member.address) as wch:
            status = await worker_pb2_grpc.WorkerStub(wch).Status(worker_pb2.StatusRequest(), timeout=5)
        load += status.running_requests + status.waiting_requests
        steps = max(steps, status.steps)
    return WorkersSeen(load, steps)


async def settled(coordinator: str) -> WorkersSeen:
    """Poll the workers until nothing runs or waits on them (or SETTLE_S passes); what was seen last."""
    deadline = time.monotonic() + SETTLE_S  # hang bound
    while (seen := await workers_seen(coordinator)).load and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return seen
