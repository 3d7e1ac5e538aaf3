"""`moemesh coordinator` and `moemesh placement set|show|trace`.

`add_coordinator_command(sub)` and `add_placement_command(sub)` follow moemesh.cli's protocol:
each adds one subcommand to `sub` and returns the function that runs it. Settings are built once,
in that function (moemesh.settings): the coordinator's from flags with MOEMESH_COORDINATOR_*
environment fallbacks, each placement action's from flags with only MOEMESH_COORDINATOR_ADDRESS
as a fallback; nothing else in the coordinator reads the environment.

`main(argv)` is a stand-alone entry point with just these commands:
`python -m coordinator.cli coordinator --model DIR --workers 2`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from coordinator.settings import CoordinatorSettings
from moemesh.commands import run
from moemesh.errors import ConfigError
from moemesh.settings import add_options, option, parse_bool, settings_from
from moemesh.tls import ca_option, cert_option, key_option, tls_of

Runner = Callable[[argparse.Namespace], int]
DEFAULT_TARGET = "127.0.0.1:50050"


def add_coordinator_command(sub: argparse._SubParsersAction) -> Runner:
    """Register `coordinator`; returns its runner."""
    p = sub.add_parser("coordinator", help="run the coordinator (membership, placement, rendezvous)")
    add_options(p, CoordinatorSettings)

    def run(args: argparse.Namespace) -> int:
        settings = settings_from(CoordinatorSettings, args, os.environ)
        _configure_logging()
        import uvloop

        from coordinator.server import serve

        uvloop.run(serve(settings))
        return 0

    return run


@dataclass(frozen=True, kw_only=True)
class PlacementTarget:
    """What every `placement` action takes: the coordinator and a deadline. A one-shot tool: no
    MOEMESH_* variables but the coordinator's address, which shells and scripts share."""

    ENV_PREFIX: ClassVar[str | None] = None

    target: str = option("--coordinator", "coordinator address", default=DEFAULT_TARGET,
                         env="MOEMESH_COORDINATOR_ADDRESS", metavar="HOST:PORT")
    timeout_s: float = option("--timeout", "deadline of each RPC in seconds", float, default=10.0)
    tls_cert: Path | None = cert_option(env="MOEMESH_TLS_CERT")  # mTLS (SetPlacement needs the admin role)
    tls_key: Path | None = key_option(env="MOEMESH_TLS_KEY")
    tls_ca: Path | None = ca_option(env="MOEMESH_TLS_CA")

    def __post_init__(self) -> None:
        tls_of(self)  # all three or none
        if not self.target:
            raise ConfigError("--coordinator (or MOEMESH_COORDINATOR_ADDRESS) must be HOST:PORT, got ''")
        if self.timeout_s <= 0:
            raise ConfigError(f"--timeout must be positive, got {self.timeout_s}")


@dataclass(frozen=True, kw_only=True)
class PlacementSet(PlacementTarget):
    """`placement set FILE`: publish a placement file as the next epoch."""

    file: Path = option("file", "placement file: {experts: [[ranks]...]} or {layers: {...}}", Path)
    expected_epoch: int = option("--expected-epoch", "apply only if this is the current epoch (0: any)", int,
                                 default=0)


@dataclass(frozen=True, kw_only=True)
class PlacementShow(PlacementTarget):
    """`placement show`: the placement in force and the load statistics."""

    yaml: bool = option("--yaml", "print a placement file instead of the table", parse_bool, default=False)


@dataclass(frozen=True, kw_only=True)
class PlacementTrace(PlacementTarget):
    """`placement trace FILE`: the measured routing as a trace file `moemesh plan` reads."""

    file: Path = option("file", "trace file to write (JSON)", Path)


PLACEMENT_ACTIONS: dict[str, tuple[type[PlacementTarget], str]] = {
    "set": (PlacementSet, "publish a placement file (YAML / JSON) as the next epoch"),
    "show": (PlacementShow, "print the placement in force and the load statistics"),
    "trace": (PlacementTrace, "write the measured routing as a trace file `moemesh plan` reads"),
}


def add_placement_command(sub: argparse._SubParsersAction) -> Runner:
    """Register `placement set FILE`, `placement show` and `placement trace FILE`; returns the runner."""
    p = sub.add_parser("placement", help="show or set the expert placement of a running coordinator")
    actions = p.add_subparsers(dest="placement_action", required=True)
    for name, (cls, help_text) in PLACEMENT_ACTIONS.items():
        add_options(actions.add_parser(name, help=help_text), cls)

    def run(args: argparse.Namespace) -> int:
        print(asyncio.run(_placement(placement_from_args(args, os.environ))))
        return 0

    return run


def placement_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> PlacementTarget:
    """The parsed action's settings: flags, then MOEMESH_COORDINATOR_ADDRESS, then defaults."""
    return settings_from(PLACEMENT_ACTIONS[args.placement_action][0], args, environ)


async def _placement(cmd: PlacementTarget) -> str:
    from coordinator import placement_admin

    if isinstance(cmd, PlacementSet):
        published = await placement_admin.set_placement(cmd.target, cmd.file, cmd.expected_epoch, cmd.timeout_s,
                                                        tls_of(cmd))
        return f"published placement epoch {published.epoch} ({published.origin}) from {cmd.file}"
    resp = await placement_admin.get_placement(cmd.target, cmd.timeout_s, tls_of(cmd))
    if isinstance(cmd, PlacementTrace):
        cmd.file.write_text(placement_admin.trace_json(resp))
        return f"wrote the routing of {resp.window_tokens} measured tokens to {cmd.file}"
    assert isinstance(cmd, PlacementShow), cmd
    return placement_admin.placement_yaml(resp).rstrip("\n") if cmd.yaml else placement_admin.format_placement(resp)


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


COMMANDS = (add_coordinator_command, add_placement_command)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone CLI with just the coordinator's commands (moemesh.cli wires in the same two)."""
    return run(argv, COMMANDS, description="moemesh coordinator commands")


if __name__ == "__main__":
    sys.exit(main())
