"""`moemesh worker`: one expert worker process (one per device). Flags fall back to
MOEMESH_WORKER_* environment variables, read here once into WorkerSettings (moemesh.settings)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

from expert_worker.settings import WorkerSettings
from moemesh.settings import add_options, settings_from


def add_worker_command(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    """Register `worker` on `sub`; returns run(args) -> exit status."""
    p = sub.add_parser("worker", help="run one expert worker (one per device)")
    add_options(p, WorkerSettings)

    def run(args: argparse.Namespace) -> int:
        built = settings_from(WorkerSettings, args, os.environ)
        import uvloop

        from expert_worker.server import serve
        from moemesh.logs import setup_logging

        setup_logging("worker", built.log_level)
        return uvloop.run(serve(built))

    return run


