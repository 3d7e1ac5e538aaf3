"""expert_worker.cli: flags (and their environment fallbacks) parse into the worker's settings."""

from __future__ import annotations

import argparse

import pytest

from expert_worker.cli import add_worker_command


def _parse(*argv: str, env: dict[str, str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_worker_command(parser.add_subparsers(), env=env or {})
    return parser.parse_args(["worker", "--coordinator", "c:1", *argv])


@pytest.mark.parametrize("text, expected", [("0", 0), ("12GiB", 12 * 2**30), ("60GB", 60 * 10**9), ("1e9", 10**9),
                                            ("512 MiB", 512 * 2**20)])
def test_expert_memory_sizes(text, expected):
    assert _parse("--expert-memory", text).expert_memory == expected


def test_expert_memory_from_the_environment_and_bad_sizes():
    assert _parse(env={"MOEMESH_WORKER_EXPERT_MEMORY": "2GiB"}).expert_memory == 2 * 2**30
    with pytest.raises(SystemExit):
        _parse("--expert-memory", "lots")
