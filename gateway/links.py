"""One worker's transport: its channel, its long-lived Serve stream, and an outbox.

A `WorkerLink` belongs to one world member, known by its identity (worker_id, incarnation); its
rank is updated in place when a new world generation renumbers the members. Sending never awaits
(an outbox drained by one writer task), so a Submit or a Cancel can be sent from a `finally`
during cancellation.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from gateway.migration import Key, Member
from moemesh import rpc
from moemesh.errors import UnavailableError
from moemesh.tls import TlsFiles
from moemesh.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)


class WorkerLink:
    """One member's Serve stream. `open()` connects; `events()` yields what the worker sends."""

    def __init__(self, member: Member, call_timeout_s: float, tls: TlsFiles | None = None):
        self.key: Key = member.key
        self.tls = tls
        self.rank = member.rank  # its rank in the current world; changes with the world
        self.address = member.address
        self.call_timeout_s = call_timeout_s
        self.up = False
        self.retired = asyncio.Event()  # set when the member left the world (or the pool closes)
        self._channel: grpc.aio.Channel | None = None
        self._call = None
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._writer: asyncio.Task | None = None

    @property
    def name(self) -> str:
        """For messages: "worker rank R (ID at ADDRESS)"."""
        return f"worker rank {self.rank} ({self.key[0] or '?'} at {self.address})"

    async def open(self) -> None:
        """Connect and open the Serve stream; UnavailableError if the worker cannot be reached."""
        channel = rpc.channel(self.address, self.tls)
        try:
            await asyncio.wait_for(channel.channel_ready(), timeout=self.call_timeout_s)
            stub = worker_pb2_grpc.WorkerStub(channel)
            await stub.Status(worker_pb2.StatusRequest(), timeout=self.call_timeout_s)
            # The Serve stream lives as long as the member, so it has no deadline: a dead peer is
            # noticed by the stream failing (HTTP/2 keepalive is on in rpc.CHANNEL_OPTIONS).
            call = stub.Serve()
        except (TimeoutError, grpc.aio.AioRpcError) as exc:
            await channel.close()
            raise UnavailableError(f"cannot reach {self.name}: {describe(exc)}") from exc
        except asyncio.CancelledError:  # the member left the world while we were connecting
            await channel.close()
            raise
        self._channel, self._call = channel, call
        self._outbox = asyncio.Queue()
        self._writer = asyncio.create_task(self._write(call, self._outbox), name=f"write-{self.key[0]}")
        self.up = True

    def send(self, message: worker_pb2.WorkerRequest) -> None:
        """Queue a message for the worker (never blocks); dropped if the stream is down."""
        if self.up:
            self._outbox.put_nowait(message)

    async def events(self):
        """Yield WorkerEvents; when the stream ends or breaks, raise UnavailableError saying why."""
        try:
            async for event in self._call:
                yield event
        except grpc.aio.AioRpcError as exc:
            raise UnavailableError(f"{self.name}: Serve stream broke: {describe(exc)}") from exc
        raise UnavailableError(f"{self.name}: the worker ended its Serve stream")

    async def close(self) -> None:
        """Stop the stream (the worker cancels everything submitted on it) and the channel."""
        self.up = False
        if self._writer is not None:
            self._writer.cancel()
        if self._call is not None:
            self._call.cancel()
        if self._channel is not None:
            await self._channel.close()
        self._writer = self._call = self._channel = None

    async def _write(self, call, outbox: asyncio.Queue) -> None:
        while True:
            message = await outbox.get()
            try:
                await call.write(message)
            except Exception as exc:
                log.debug("%s: write failed: %s", self.name, exc)
                return


def describe(exc: BaseException) -> str:
    """A short reason for a failed call."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
