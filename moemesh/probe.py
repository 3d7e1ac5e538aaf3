"""`moemesh probe HOST:PORT`: is a service SERVING? One grpc.health.v1 Check with a deadline.

For container healthchecks and scripts: exit 0 when the service answers SERVING, 1 otherwise with
one line on stderr saying why (unreachable, NOT_SERVING, no answer within the timeout, an unknown
service). It imports neither torch nor the services (`moemesh.cli` runs it without loading the other
commands), so a healthcheck every few seconds costs a fraction of a second of CPU.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moemesh.errors import ConfigError
from moemesh.settings import add_options, option, settings_from

OK, NOT_OK = 0, 1


@dataclass(frozen=True)
class ProbeSettings:
    """`moemesh probe`: flags only, so a healthcheck's command line says what it asks."""

    ENV_PREFIX: ClassVar[str | None] = None

    target: str = option("target", "the service's gRPC address", metavar="HOST:PORT")
    service: str = option("--service", "health service name (empty: the whole server; the gateway also "
                          "answers moemesh.v1.Gateway)", default="")
    timeout_s: float = option("--timeout", "deadline of the check, seconds", float, default=3.0)

    def __post_init__(self) -> None:
        if ":" not in self.target:
            raise ConfigError(f"probe target must be HOST:PORT, got {self.target!r}")
        if self.timeout_s <= 0:
            raise ConfigError(f"--timeout must be positive, got {self.timeout_s}")


@dataclass(frozen=True)
class ProbeResult:
    """What one check found: `serving`, and a line saying what was seen."""

    serving: bool
    line: str


def probe(s: ProbeSettings) -> ProbeResult:
    """Ask `s.target`'s health service once, within `s.timeout_s`."""
    what = f"{s.target}" + (f" service {s.service!r}" if s.service else "")
    with grpc.insecure_channel(s.target) as ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=s.service),
                                                         timeout=s.timeout_s)
        except grpc.RpcError as exc:
            return ProbeResult(False, _failure_line(what, exc, s.timeout_s))
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return ProbeResult(reply.status == health_pb2.HealthCheckResponse.SERVING, f"{what}: {status}")


def _failure_line(what: str, exc: grpc.RpcError, timeout_s: float) -> str:
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"{what}: timeout: no answer within {timeout_s:g} s"
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"{what}: unreachable ({exc.details() if isinstance(exc, grpc.Call) else exc})"
    if code == grpc.StatusCode.NOT_FOUND:
        return f"{what}: unknown service (NOT_FOUND)"
    return f"{what}: {code.name}: {exc.details() if isinstance(exc, grpc.Call) else exc}"


def add_probe_command(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    p = sub.add_parser("probe", help="exit 0 when a service's grpc.health.v1 says SERVING, else 1 (healthchecks)")
    add_options(p, ProbeSettings)

    def run(args: argparse.Namespace) -> int:
        result = probe(settings_from(ProbeSettings, args, {}))
        print(result.line, file=sys.stdout if result.serving else sys.stderr)
        return OK if result.serving else NOT_OK

    return run
