"""gRPC plumbing shared by the three services: error mapping, server lifecycle, channels.

- `ErrorInterceptor` turns typed moemesh errors into status codes (the one table in
  moemesh.status) for every kind of handler, streaming ones included; a request message that does
  not parse (a string field with bad UTF-8, a truncated message) is INVALID_ARGUMENT saying so, not
  grpc's UNKNOWN.
- `Server` owns one grpc.aio server with health and reflection, made inside the running loop,
  and stops gracefully: health NOT_SERVING, then `stop(grace)`.
Everything here must be called from inside a running event loop.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
from collections.abc import Callable, Iterable
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from moemesh.errors import InvalidRequestError, MoemeshError
from moemesh.status import status_for

log = logging.getLogger(__name__)

# Big enough for a batch of long prompts; tensors never travel over gRPC.
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    # A peer that went away (a restarted coordinator or worker) is dialled again at least every
    # second, not after gRPC's default backoff of up to 120 s: heartbeats must reach a restarted
    # coordinator within its heartbeat timeout.
    ("grpc.max_reconnect_backoff_ms", 1_000),
)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps MoemeshError raised by any handler to its status code with the error's message, and a
    request that does not parse to INVALID_ARGUMENT (see `_Undecodable`)."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        parse, reply = _tolerant(handler.request_deserializer), handler.response_serializer
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(_wrap_unary(handler.unary_unary), parse, reply)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(_wrap_stream(handler.unary_stream), parse, reply)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(handler.stream_unary, streamed=True), parse, reply)
        return grpc.stream_stream_rpc_method_handler(
            _wrap_stream(handler.stream_stream, streamed=True), parse, reply)


class _Undecodable:
    """What `_tolerant` hands on for a request message that did not parse. grpc.aio answers an
    exception raised while deserializing with UNKNOWN, so the deserializer returns this instead and
    the wrapped handler raises InvalidRequestError before (or, for a request stream, when) it is read."""

    def __init__(self, error: DecodeError):
        self.error = error

    def reject(self) -> InvalidRequestError:
        return InvalidRequestError(f"the request does not parse (every string field must be valid UTF-8): "
                                   f"{self.error}")


def _tolerant(deserializer: Callable | None) -> Callable | None:
    if deserializer is None:  # a generic handler taking raw bytes: nothing to parse
        return None

    def parse(data: bytes):
        try:
            return deserializer(data)
        except DecodeError as exc:
            return _Undecodable(exc)

    return parse


def _checked(request):
    """A unary request as it is, or InvalidRequestError when it did not parse."""
    if isinstance(request, _Undecodable):
        raise request.reject()
    return request


async def _checked_stream(requests):
    """A request stream whose messages that did not parse raise InvalidRequestError where read."""
    async for request in requests:
        yield _checked(request)


def _wrap_unary(behaviour: Callable, streamed: bool = False) -> Callable:
    async def wrapped(request, context):
        try:
            request = _checked_stream(request) if streamed else _checked(request)
            return await behaviour(request, context)
        except MoemeshError as exc:
            await context.abort(status_for(exc), str(exc))

    return wrapped


def _wrap_stream(behaviour: Callable, streamed: bool = False) -> Callable:
    """A streaming handler is an async generator (ours), or a coroutine that writes with
    context.write() (grpc's health servicer's Watch): each is wrapped as what it is."""
    if not inspect.isasyncgenfunction(behaviour):
        return _wrap_unary(behaviour, streamed)

    async def wrapped(request, context):
        try:
            request = _checked_stream(request) if streamed else _checked(request)
            async for item in behaviour(request, context):
                yield item
        except MoemeshError as exc:
            await context.abort(status_for(exc), str(exc))

    return wrapped


class Server:
    """One grpc.aio server: services + health ("" and each named service) + reflection.

    `max_concurrent_rpcs` bounds the calls in progress at once (health and reflection included):
    grpc answers RESOURCE_EXHAUSTED to any call over it before a handler runs; None = no bound."""

    def __init__(self, service_names: Iterable[str], max_concurrent_rpcs: int | None = None):
        self.service_names = tuple(service_names)
        self.grpc = grpc.aio.server(
            interceptors=[ErrorInterceptor()], options=CHANNEL_OPTIONS, maximum_concurrent_rpcs=max_concurrent_rpcs
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc
        )
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        """Bind (port 0 = any free port), start, report NOT_SERVING until `set_ready()`."""
        self.port = self.grpc.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise MoemeshError(f"cannot bind {host}:{port}")
        await self.grpc.start()
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        return self.port

    async def set_ready(self) -> None:
        await self._set_all(health_pb2.HealthCheckResponse.SERVING)

    async def set_not_serving(self) -> None:
        """Up, but unable to serve now (no world that can serve): health says so until set_ready()."""
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self, grace_s: float) -> None:
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.grpc.stop(grace_s)

    async def _set_all(self, status) -> None:
        for name in ("", *self.service_names):
            await self.health.set(name, status)


def stop_event_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM (the process's graceful-stop trigger)."""
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, event.set)
    return event


def write_port_file(path: Path | None, port: int) -> None:
    """Atomically publish the bound port (how `moemesh up` learns ports chosen by the OS)."""
    if path is None:
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(str(port))
    tmp.replace(path)


def channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)


async def exit_with_parent(stop: asyncio.Event, poll_s: float = 0.5) -> None:
    """Set `stop` when the parent process goes away (so `moemesh up` never leaves orphans)."""
    import os

    parent = os.getppid()
    while not stop.is_set():
        if os.getppid() != parent:
            log.warning("parent process %d is gone: stopping", parent)
            stop.set()
            return
        await asyncio.sleep(poll_s)
