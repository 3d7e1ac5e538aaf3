"""`moemesh gateway ...`: flags with MOEMESH_GATEWAY_* environment fallbacks -> GatewaySettings.

Register with `add_gateway_command(subparsers)` (returns the function that runs the parsed
command); or run standalone: `python -m gateway.cli gateway --coordinator HOST:PORT --model DIR`.
A flag given on the command line wins over its environment variable (MOEMESH_GATEWAY_ + the flag
name in upper case with '_' for '-', e.g. MOEMESH_GATEWAY_MAX_INFLIGHT), which wins over the
default (moemesh.settings). This module is the only place the gateway reads the environment.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from gateway.settings import GatewaySettings
from moemesh.commands import run
from moemesh.settings import add_options, settings_from


def add_gateway_command(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    """Register `gateway` on `sub`; returns run(args) -> exit status."""
    p = sub.add_parser("gateway", help="serve the client-facing Gateway API in front of the workers",
                       description=__doc__.splitlines()[0])
    add_options(p, GatewaySettings)

    def run(args: argparse.Namespace) -> int:
        """Build the settings once, set up logging, serve until stopped."""
        built = settings_from(GatewaySettings, args, os.environ)
        from gateway.server import run as run_server
        from moemesh.logs import setup_logging

        setup_logging("gateway", built.log_level)
        return run_server(built)

    return run


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: `python -m gateway.cli gateway ...`."""
    return run(argv, (add_gateway_command,))


if __name__ == "__main__":
    sys.exit(main())
