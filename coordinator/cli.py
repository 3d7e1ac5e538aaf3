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
from typing import Any

from coordinator.settings import TRANSPORTS, CoordinatorSettings
from moemesh.commands import run
from moemesh.errors import ConfigError

Runner = Callable[[argparse.Namespace], int]
DEFAULT_TARGET = "127.0.0.1:50050"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


@dataclass(frozen=True)
class _Option:
    """One coordinator setting: its flag, settings field, type, default and environment variable."""

    flag: str
    field: str
    kind: Callable[[str], Any]
    default: Any
    help: str

    @property
    def env(self) -> str:
        return "MOEMESH_COORDINATOR_" + self.flag.removeprefix("--").replace("-", "_").upper()


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE or value in _FALSE:
        return value in _TRUE
    raise ValueError(f"not a boolean: {text!r}")


OPTIONS = (
    _Option("--model", "model_dir", Path, None, "checkpoint folder (config.json) the deployment serves"),
    _Option("--workers", "workers", int, None, "number of workers the first world waits for"),
    _Option("--host", "host", str, "127.0.0.1", "interface to bind"),
    _Option("--port", "port", int, 50050, "gRPC port; 0 = any free port"),
    _Option("--port-file", "port_file", Path, None, "write the bound gRPC port to this file"),
    _Option("--transport", "transport", str, "gloo", f"data-plane transport: {', '.join(TRANSPORTS)}"),
    _Option("--heartbeat-interval", "heartbeat_interval_s", float, 1.0, "seconds between worker heartbeats"),
    _Option("--heartbeat-timeout", "heartbeat_timeout_s", float, 10.0, "silence (s) before a worker is reported"),
    _Option("--placement", "placement_file", Path, None, "initial placement file (YAML or JSON)"),
    _Option("--exit-with-parent", "exit_with_parent", _bool, False, "stop when the parent process exits"),
    _Option("--advertise-host", "advertise_host", str, None, "host workers use to reach the TCPStore"),
    _Option("--load-window", "load_window_reports", int, 32, "load reports kept per worker"),
    _Option("--shutdown-grace", "shutdown_grace_s", float, 2.0, "seconds in-flight RPCs get on stop"),
    _Option("--policy", "policy", str, "auto",
            "balancing policy: auto (replicate when workers > experts, else none), none, gating, replicate, "
            "split (hot experts split over two workers)"),
    _Option("--rebalance-every", "rebalance_every_tokens", int, 100, "routed tokens between balancing updates"),
    _Option("--topology", "topology", str, "local", "planner topology (preset or YAML) for policy replicate"),
    _Option("--expert-shards", "expert_shards", int, 1,
            "split every expert over this many ranks (expert tensor parallelism); 0 = the fewest that fit "
            "the memory workers report"),
)


def add_coordinator_command(sub: argparse._SubParsersAction) -> Runner:
    """Register `coordinator`; returns its runner."""
    p = sub.add_parser("coordinator", help="run the coordinator (membership, placement, rendezvous)")
    for opt in OPTIONS:
        helptext = f"{opt.help} (env {opt.env}; default {opt.default})"
        if opt.kind is _bool:
            p.add_argument(opt.flag, dest=opt.field, action="store_true", default=None, help=helptext)
        else:
            p.add_argument(opt.flag, dest=opt.field, type=opt.kind, default=None, help=helptext)

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
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        value = getattr(args, opt.field, None)
        if value is None and opt.env in environ:
            try:
                value = opt.kind(environ[opt.env])
            except ValueError as exc:
                raise ConfigError(f"{opt.env}={environ[opt.env]!r}: {exc}") from None
        values[opt.field] = opt.default if value is None else value
    for required in ("model_dir", "workers"):
        if values[required] is None:
            opt = next(o for o in OPTIONS if o.field == required)
            raise ConfigError(f"{opt.flag} is required (or set {opt.env})")
    values["model_dir"] = Path(values["model_dir"]).resolve()
    return CoordinatorSettings(**values)


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
    from coordinator import tools

    if cmd.action == "set":
        assert cmd.file is not None
        published = await tools.set_placement(cmd.target, cmd.file, cmd.expected_epoch, cmd.timeout_s)
        return f"published placement epoch {published.epoch} ({published.origin}) from {cmd.file}"
    resp = await tools.get_placement(cmd.target, cmd.timeout_s)
    if cmd.action == "trace":
        assert cmd.file is not None
        cmd.file.write_text(tools.trace_json(resp))
        return f"wrote the routing of {resp.window_tokens} measured tokens to {cmd.file}"
    return tools.placement_yaml(resp).rstrip("\n") if cmd.yaml else tools.format_placement(resp)


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


COMMANDS = (add_coordinator_command, add_placement_command)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone CLI with just the coordinator's commands (moemesh.cli wires in the same two)."""
    return run(argv, COMMANDS, description="moemesh coordinator commands")


if __name__ == "__main__":
    sys.exit(main())
