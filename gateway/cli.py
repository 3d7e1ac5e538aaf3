"""`moemesh gateway ...`: flags with MOEMESH_GATEWAY_* environment fallbacks -> GatewaySettings.

Register with `add_gateway_command(subparsers)` (returns the function that runs the parsed
command); or run standalone: `python -m gateway.cli gateway --coordinator HOST:PORT --model DIR`.
A flag given on the command line wins over its environment variable (MOEMESH_GATEWAY_ + the flag
name in upper case with '_' for '-', e.g. MOEMESH_GATEWAY_MAX_INFLIGHT), which wins over the
default. This module is the only place the gateway reads the environment.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from gateway.settings import ENV_PREFIX, GatewaySettings
from moemesh.commands import run
from moemesh.errors import MoemeshError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}

# flag -> (settings field, parse, help); every flag defaults to None so the env fallback can apply
_FLAGS: tuple[tuple[str, str, Callable[[str], Any], str], ...] = (
    ("--coordinator", "coordinator", str, "coordinator HOST:PORT (required)"),
    ("--model", "model_dir", Path, "checkpoint folder with config.json and tokenizer.json (required)"),
    ("--host", "host", str, "address to bind (default 127.0.0.1)"),
    ("--port", "port", int, "port to bind; 0 = any free port (default 50051)"),
    ("--port-file", "port_file", Path, "write the bound port to this file"),
    ("--max-model-len", "max_model_len", int,
     "the workers' context in tokens; effective = min(this, max_position_embeddings) (default 2048)"),
    ("--max-new-tokens-limit", "max_new_tokens_limit", int, "largest max_new_tokens accepted (default 4096)"),
    ("--default-max-new-tokens", "default_max_new_tokens", int,
     "max_new_tokens for requests that leave sampling unset (default 16)"),
    ("--max-inflight", "max_inflight", int,
     "prompts in flight before RESOURCE_EXHAUSTED (default 1024)"),
    ("--call-timeout", "call_timeout_s", float, "deadline of each coordinator / worker call, s (default 10)"),
    ("--grace", "grace_s", float, "seconds in-flight calls may finish on SIGTERM (default 5)"),
)


def add_gateway_command(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    """Register `gateway` on `sub`; returns run(args) -> exit status."""
    p = sub.add_parser("gateway", help="serve the client-facing Gateway API in front of the workers",
                       description=__doc__.splitlines()[0])
    for flag, dest, parse, help_text in _FLAGS:
        p.add_argument(flag, dest=dest, type=parse, default=None, help=help_text)
    p.add_argument("--exit-with-parent", dest="exit_with_parent", action="store_const", const=True,
                   default=None, help="stop when the parent process exits (for launchers)")
    p.add_argument("--log-level", default=None, help="logging level (default INFO)")

    def run(args: argparse.Namespace) -> int:
        """Build the settings once, set up logging, serve until stopped."""
        settings = settings_from(args, os.environ)
        from gateway.server import run as run_server
        from moemesh.logs import setup_logging

        setup_logging("gateway", args.log_level or os.environ.get(ENV_PREFIX + "LOG_LEVEL", "INFO"))

        return run_server(settings)

    return run


def settings_from(args: argparse.Namespace, environ: Mapping[str, str]) -> GatewaySettings:
    """GatewaySettings from parsed flags, falling back to MOEMESH_GATEWAY_* then the defaults."""
    flags = {dest: (flag, parse) for flag, dest, parse, _ in _FLAGS}
    flags["exit_with_parent"] = ("--exit-with-parent", _parse_bool)
    values: dict[str, Any] = {}
    for f in fields(GatewaySettings):
        flag, parse = flags[f.name]
        value = getattr(args, f.name, None)
        env_name = ENV_PREFIX + flag.lstrip("-").upper().replace("-", "_")
        if value is None and env_name in environ:
            try:
                value = parse(environ[env_name])
            except (ValueError, TypeError) as exc:
                raise MoemeshError(f"{env_name}={environ[env_name]!r} is not valid for {flag}: {exc}") from exc
        if value is not None:
            values[f.name] = value
    for required in ("coordinator", "model_dir"):
        if required not in values:
            flag = flags[required][0]
            env_name = ENV_PREFIX + flag.lstrip("-").upper().replace("-", "_")
            raise MoemeshError(f"{flag} is required (or set {env_name})")
    return GatewaySettings(**values)


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"expected one of {sorted(_TRUE | _FALSE)}")


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: `python -m gateway.cli gateway ...`."""
    return run(argv, (add_gateway_command,))


if __name__ == "__main__":
    sys.exit(main())
