"""gRPC plumbing shared by the three services: error mapping, server lifecycle, channels.

- `ErrorInterceptor` turns typed moemesh errors into status codes (the one table in
  moemesh.status) for every kind of handler, streaming ones included; a request message that does
  not parse (a string field with bad UTF-8, a truncated message) is INVALID_ARGUMENT saying so, not
  grpc's UNKNOWN.
- `Server` owns one grpc.aio server with health and reflection, made inside the running loop,
  and stops gracefully: health NOT_SERVING, then `stop(grace)`. Given TLS files (moemesh.tls) it
  serves only mTLS, and its `roles` rules say which certificate roles may call which method
  (`RoleGate`: PERMISSION_DENIED otherwise); without TLS every method stays open.
- Gates: checks the interceptor runs before every handler (authorization, API keys); a gate
  raises a typed error to refuse the call (a RateLimitedError also sends `retry-after`).
- `channel` dials over mTLS when given TLS files, else plaintext; every channel is made here.
Everything here must be called from inside a running event loop.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import signal
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from moemesh.errors import InvalidRequestError, MoemeshError, PermissionDeniedError, RateLimitedError
from moemesh.status import status_for
from moemesh.tls import TlsFiles, peer_roles

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
# gRPC core cancels calls that arrive while more than `grpc.server.max_pending_requests` (default
# 1000) are still waiting for the Python server to pick them up: under a burst of a few thousand
# calls some clients got CANCELLED instead of an answer (found by the overload test). With this
# backlog every call reaches the server, which answers RESOURCE_EXHAUSTED over its limits; a
# backlog holds only a call's headers until it is picked up.
PENDING_CALLS = 16_384
SERVER_OPTIONS = (
    *CHANNEL_OPTIONS,
    ("grpc.server.max_pending_requests", PENDING_CALLS),
    ("grpc.server.max_pending_requests_hard_limit", PENDING_CALLS),
    # the channels' 10 s keepalive pings (above) are welcome: by default a server allows one ping per
    # 5 minutes on a call that sends no data, so an idle Serve stream (a gateway's to its workers)
    # earned strikes and a GOAWAY "too_many_pings" that reset it (seen in compose; gRPC's keepalive guide)
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
)


# A check run before a handler: (full method name "/pkg.Service/Method", the request or None for a
# request stream, the call's context); raises a MoemeshError to refuse the call.
Gate = Callable[[str, Any, grpc.aio.ServicerContext], None]


class RoleGate:
    """Authorization from the peer certificate's role (moemesh.tls.peer_roles). `rules` maps a full
    method name, or a service prefix ending in "/" ("/moemesh.v1.Worker/"), to the roles that may
    call it (the exact name wins over a prefix); a method no rule names is open to every peer (the
    handshake already required a certificate signed by the CA)."""

    def __init__(self, rules: Mapping[str, Iterable[str]]):
        self.rules = {name: frozenset(roles) for name, roles in rules.items()}

    def allowed(self, method: str) -> frozenset[str] | None:
        """The roles that may call `method`; None when any peer may."""
        if method in self.rules:
            return self.rules[method]
        service = method[: method.rfind("/") + 1]
        return self.rules.get(service)

    def __call__(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> None:
        allowed = self.allowed(method)
        if allowed is None:
            return
        roles = peer_roles(context.auth_context())
        if not roles & allowed:
            raise PermissionDeniedError(f"{method} needs the role {' or '.join(sorted(allowed))}; the caller's "
                                        f"certificate names {', '.join(sorted(roles)) or 'no moemesh role'}")


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Runs the `gates` before every handler, then maps MoemeshError raised by a gate or by the
    handler to its status code with the error's message, and a request that does not parse to
    INVALID_ARGUMENT (see `_Undecodable`)."""

    def __init__(self, gates: Sequence[Gate] = ()):
        self.gates = tuple(gates)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        parse, reply = _tolerant(handler.request_deserializer), handler.response_serializer
        gate = _gate(self.gates, handler_call_details.method)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(_wrap_unary(handler.unary_unary, gate), parse, reply)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(_wrap_stream(handler.unary_stream, gate), parse, reply)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(handler.stream_unary, gate, streamed=True), parse, reply)
        return grpc.stream_stream_rpc_method_handler(
            _wrap_stream(handler.stream_stream, gate, streamed=True), parse, reply)


def _gate(gates: tuple[Gate, ...], method: str) -> Callable[[Any, grpc.aio.ServicerContext], None]:
    def check(request: Any, context: grpc.aio.ServicerContext) -> None:
        for gate in gates:
            gate(method, request, context)

    return check


async def _abort(context: grpc.aio.ServicerContext, exc: MoemeshError) -> None:
    """End the call with `exc`'s status code (and a rate limit's `retry-after` trailing metadata)."""
    trailing: tuple[tuple[str, str], ...] = ()
    if isinstance(exc, RateLimitedError):
        trailing = (("retry-after", str(max(1, math.ceil(exc.retry_after_s)))),)
    await context.abort(status_for(exc), str(exc), trailing_metadata=trailing)


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


def _wrap_unary(behaviour: Callable, gate: Callable, streamed: bool = False) -> Callable:
    async def wrapped(request, context):
        try:
            gate(None if streamed else request, context)
            request = _checked_stream(request) if streamed else _checked(request)
            return await behaviour(request, context)
        except MoemeshError as exc:
            await _abort(context, exc)

    return wrapped


def _wrap_stream(behaviour: Callable, gate: Callable, streamed: bool = False) -> Callable:
    """A streaming handler is an async generator (ours), or a coroutine that writes with
    context.write() (grpc's health servicer's Watch): each is wrapped as what it is."""
    if not inspect.isasyncgenfunction(behaviour):
        return _wrap_unary(behaviour, gate, streamed)

    async def wrapped(request, context):
        try:
            gate(None if streamed else request, context)
            request = _checked_stream(request) if streamed else _checked(request)
            async for item in behaviour(request, context):
                yield item
        except MoemeshError as exc:
            await _abort(context, exc)

    return wrapped


class Server:
    """One grpc.aio server: services + health ("" and each named service) + reflection.

    `max_concurrent_rpcs` bounds the calls in progress at once (health and reflection included):
    grpc answers RESOURCE_EXHAUSTED to any call over it before a handler runs; None = no bound.
    With `tls` the port is mTLS only and `roles` (RoleGate's rules) authorize each method by the
    caller's certificate; without it `roles` is not enforced (plaintext: no identities). `gates`
    run before every handler either way (after the role check)."""

    def __init__(self, service_names: Iterable[str], max_concurrent_rpcs: int | None = None, *,
                 tls: TlsFiles | None = None, roles: Mapping[str, Iterable[str]] | None = None,
                 gates: Sequence[Gate] = ()):
        self.service_names = tuple(service_names)
        self.tls = tls
        checks: tuple[Gate, ...] = (RoleGate(roles or {}), *gates) if tls is not None else tuple(gates)
        self.grpc = grpc.aio.server(
            interceptors=[ErrorInterceptor(checks)], options=SERVER_OPTIONS,
            maximum_concurrent_rpcs=max_concurrent_rpcs,
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc
        )
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        """Bind (port 0 = any free port), start, report NOT_SERVING until `set_ready()`."""
        address = f"{host}:{port}"
        if self.tls is None:
            self.port = self.grpc.add_insecure_port(address)
        else:
            self.port = self.grpc.add_secure_port(address, self.tls.server_credentials())
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


def channel(target: str, tls: TlsFiles | None = None) -> grpc.aio.Channel:
    """A channel to `target`: mTLS with `tls` (this process's certificate, the CA it trusts), else plaintext."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
    return grpc.aio.secure_channel(target, tls.channel_credentials(), options=CHANNEL_OPTIONS)


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
