"""Seeing a placement epoch switch WHILE a request generates, not only after the fact.

A watched stream reads a worker's Status after every token chunk it receives: (tokens so far,
placement epoch the worker computes with). An epoch seen to change between two chunks, with more
chunks still to come, switched while that request was being generated: the first reading came
after the request had tokens, the second before its last ones were made.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc

from moemesh.client import Client, TokenChunk
from moemesh.engine.sampling import SamplingParams
from moemesh.v1 import coordinator_pb2, coordinator_pb2_grpc, worker_pb2, worker_pb2_grpc

RPC_TIMEOUT_S = 10.0


async def first_worker(coordinator: str) -> str:
    """The address of rank 0's worker (every rank switches at the same step: one is enough)."""
    async with grpc.aio.insecure_channel(coordinator) as ch:
        world = await coordinator_pb2_grpc.CoordinatorStub(ch).WaitForWorld(
            coordinator_pb2.WaitForWorldRequest(), timeout=RPC_TIMEOUT_S)
    return min(world.members, key=lambda m: m.rank).address


@dataclass(frozen=True)
class Watched:
    token_ids: list[int]
    seen: list[tuple[int, int]]  # (tokens received so far, worker's placement epoch), one per chunk

    def switched_mid_stream(self) -> list[tuple[int, int, int]]:
        """(tokens, old epoch, new epoch) for each change seen between two chunks before the last."""
        return [(n, e0, e1) for (_, e0), (n, e1) in zip(self.seen, self.seen[1:])
                if e1 > e0 and n < len(self.token_ids)]


async def watch_stream(client: Client, worker: str, token_ids: list[int], params: SamplingParams,
                       watching: asyncio.Event | None = None) -> Watched:
    """Generate `token_ids`, reading `worker`'s Status after every chunk; `watching` is set once the
    first chunk's reading is in (a change from then on can be seen)."""
    tokens: list[int] = []
    seen: list[tuple[int, int]] = []
    async with grpc.aio.insecure_channel(worker) as ch:
        stub = worker_pb2_grpc.WorkerStub(ch)
        async for event in client.generate(token_ids=token_ids, params=params):
            if isinstance(event, TokenChunk):
                tokens.extend(event.token_ids)
                status = await stub.Status(worker_pb2.StatusRequest(), timeout=RPC_TIMEOUT_S)
                seen.append((len(tokens), status.placement_epoch))
                if watching is not None:
                    watching.set()
    return Watched(tokens, seen)


async def move_every_expert(coordinator: str, world_size: int) -> int:
    """Publish a placement with expert e on rank (e + 1) mod `world_size` alone, in every layer
    (SetPlacement, as `moemesh placement set` does); returns the new epoch."""
    async with grpc.aio.insecure_channel(coordinator) as ch:
        stub = coordinator_pb2_grpc.CoordinatorStub(ch)
        current = (await stub.GetPlacement(coordinator_pb2.GetPlacementRequest(), timeout=RPC_TIMEOUT_S)).placement
        new = coordinator_pb2.Placement(world_generation=current.world_generation, world_size=world_size)
        for layer in current.layers:
            lp = new.layers.add(layer=layer.layer)
            for e in range(len(layer.experts)):
                lp.experts.add(ranks=[(e + 1) % world_size])
        await stub.SetPlacement(coordinator_pb2.SetPlacementRequest(placement=new, expected_epoch=current.epoch),
                                timeout=RPC_TIMEOUT_S)
    return current.epoch + 1
