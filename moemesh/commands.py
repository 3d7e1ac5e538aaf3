"""Running subcommands: shared by `moemesh` and each service's stand-alone entry point.

A command is a function `add(subparsers) -> run(args) -> exit code` that registers one
subcommand; user errors (MoemeshError) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable

from moemesh.errors import MoemeshError

Command = Callable[[argparse._SubParsersAction], Callable[[argparse.Namespace], int]]


def build_parser(commands: Iterable[Command], prog: str = "moemesh", description: str = "") -> tuple[
    argparse.ArgumentParser, dict[str, Callable[[argparse.Namespace], int]]
]:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    runners = {}
    for add in commands:
        before = set(sub.choices)
        run = add(sub)
        (name,) = set(sub.choices) - before
        runners[name] = run
    return parser, runners


def run(argv: list[str] | None, commands: Iterable[Command], prog: str = "moemesh", description: str = "") -> int:
    parser, runners = build_parser(commands, prog, description)
    args = parser.parse_args(argv)
    try:
        return runners[args.command](args)
    except MoemeshError as exc:
        print(f"{prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
