"""`moemesh coordinator` and `moemesh placement set|show`.

`add_coordinator_command(sub)` and `add_placement_command(sub)` follow moemesh.cli's protocol:
each adds one subcommand to `sub` and returns the function that runs it. Settings are built once,
in that function, from flags with MOEMESH_COORDINATOR_* environment fallbacks; nothing else in
the coordinator reads the environment.

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

from coordinator.settings import CoordinatorSettings
from moemesh.commands import run
from moemesh.errors import ConfigError
from moemesh.settings import add_options, settings_from

Runner = Callable[[argparse.Namespace], int]
DEFAULT_TARGET = "127.0.0.1:50050"


def add_coordinator_command(sub: argparse._SubParsersAction) -> Runner:
    """Register `coordinator`; returns its runner."""
    p = sub.add_parser("coordinator", help="run the coordinator (membership, placement, rendezvous)")
    add_options(p, CoordinatorSettings)

    def run(args: argparse.Namespace) -> int:
        settings = settings_from_args(args, os.environ)
        _configure_logging()
        import uvloop

        from coordinator.server import serve

        uvloop.run(serve(settings))
        return 0

    return run


def settings_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> CoordinatorSettings:
    """Flags win, then MOEMESH_COORDINATOR_* variables, then defaults; --model and --workers are required."""
    return settings_from(CoordinatorSettings, args, environ)


@dataclass(frozen=True)
class PlacementCommand:
    """`placement set|show` settings."""

    action: str  # "set" | "show" | "trace"
    target: str  # coordinator host:port
    timeout_s: float
    file: Path | None = None
    expected_epoch: int = 0
    yaml: bool = False


def add_placement_command(sub: argparse._SubParsersAction) -> Runner:
    """Register `placement set FILE` and `placement show`; returns the runner."""
    p = sub.add_parser("placement", help="show or set the expert placement of a running coordinator")
    actions = p.add_subparsers(dest="placement_action", required=True)
    set_p = actions.add_parser("set", help="publish a placement file (YAML / JSON) as the next epoch")
    set_p.add_argument("file", type=Path, help="placement file: {experts: [[ranks]...]} or {layers: {...}}")
    set_p.add_argument("--expected-epoch", type=int, default=0, help="apply only if this is the current epoch")
    show_p = actions.add_parser("show", help="print the placement in force and the load statistics")
    show_p.add_argument("--yaml", action="store_true", help="print a placement file instead of the table")
    trace_p = actions.add_parser("trace", help="write the measured routing as a trace file `moemesh plan` reads")
    trace_p.add_argument("file", type=Path, help="trace file to write (JSON)")
    for q in (set_p, show_p, trace_p):
        q.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                       help=f"coordinator address (env MOEMESH_COORDINATOR_ADDRESS; default {DEFAULT_TARGET})")
        q.add_argument("--timeout", type=float, default=10.0, help="deadline of each RPC in seconds")

    def run(args: argparse.Namespace) -> int:
        cmd = PlacementCommand(
            action=args.placement_action,
            target=args.coordinator or os.environ.get("MOEMESH_COORDINATOR_ADDRESS") or DEFAULT_TARGET,
            timeout_s=args.timeout, file=getattr(args, "file", None),
            expected_epoch=getattr(args, "expected_epoch", 0), yaml=getattr(args, "yaml", False),
        )
        if cmd.timeout_s <= 0:
            raise ConfigError(f"--timeout must be positive, got {cmd.timeout_s}")
        print(asyncio.run(_placement(cmd)))
        return 0

    return run


async def _placement(cmd: PlacementCommand) -> str:
    from coordinator import placement_admin

    if cmd.action == "set":
        assert cmd.file is not None
        published = await placement_admin.set_placement(cmd.target, cmd.file, cmd.expected_epoch, cmd.timeout_s)
        return f"published placement epoch {published.epoch} ({published.origin}) from {cmd.file}"
    resp = await placement_admin.get_placement(cmd.target, cmd.timeout_s)
    if cmd.action == "trace":
        assert cmd.file is not None
        cmd.file.write_text(placement_admin.trace_json(resp))
        return f"wrote the routing of {resp.window_tokens} measured tokens to {cmd.file}"
    return placement_admin.placement_yaml(resp).rstrip("\n") if cmd.yaml else placement_admin.format_placement(resp)


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


COMMANDS = (add_coordinator_command, add_placement_command)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone CLI with just the coordinator's commands (moemesh.cli wires in the same two)."""
    return run(argv, COMMANDS, description="moemesh coordinator commands")


if __name__ == "__main__":
    sys.exit(main())
