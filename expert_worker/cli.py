"""`moemesh worker`: one expert worker process (one per device). Flags fall back to
MOEMESH_WORKER_* environment variables, read here once into WorkerSettings (moemesh.settings)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping

from expert_worker.settings import WorkerSettings
from moemesh import settings


def add_worker_command(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    """Register `worker` on `sub`; returns run(args) -> exit status."""
    p = sub.add_parser("worker", help="run one expert worker (one per device)")
    settings.add_options(p, WorkerSettings)

    def run(args: argparse.Namespace) -> int:
        built = settings_from(args, os.environ)
        import uvloop

        from expert_worker.server import serve
        from moemesh.logs import setup_logging

        setup_logging("worker", built.log_level)
        return uvloop.run(serve(built))

    return run


def settings_from(args: argparse.Namespace, environ: Mapping[str, str]) -> WorkerSettings:
    """WorkerSettings from parsed flags, falling back to MOEMESH_WORKER_* then the defaults."""
    return settings.settings_from(WorkerSettings, args, environ)
