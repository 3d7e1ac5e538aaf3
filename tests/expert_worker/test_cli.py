"""expert_worker.cli: flags (and their environment fallbacks) parse into the worker's settings."""

from __future__ import annotations

import argparse

import pytest

from expert_worker.cli import add_worker_command
from expert_worker.settings import WorkerSettings
from moemesh.errors import ConfigError
from moemesh.settings import settings_from


def _settings(*argv: str, env: dict[str, str] | None = None) -> WorkerSettings:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_worker_command(parser.add_subparsers())
    return settings_from(WorkerSettings, parser.parse_args(["worker", "--coordinator", "c:1", *argv]), env or {})


@pytest.mark.parametrize("text, expected", [("0", 0), ("12GiB", 12 * 2**30), ("60GB", 60 * 10**9), ("1e9", 10**9),
                                            ("512 MiB", 512 * 2**20)])
def test_expert_memory_sizes(text, expected):
    assert _settings("--expert-memory", text).expert_memory_bytes == expected


def test_expert_memory_from_the_environment_and_bad_sizes():
    assert _settings(env={"MOEMESH_WORKER_EXPERT_MEMORY": "2GiB"}).expert_memory_bytes == 2 * 2**30
    with pytest.raises(SystemExit):
        _settings("--expert-memory", "lots")
    with pytest.raises(ConfigError, match="MOEMESH_WORKER_EXPERT_MEMORY='lots'"):
        _settings(env={"MOEMESH_WORKER_EXPERT_MEMORY": "lots"})


def test_defaults_and_environment_fallbacks():
    s = _settings("--host", "0.0.0.0", env={"MOEMESH_WORKER_MICRO_BATCHES": "2", "MOEMESH_WORKER_THREADS": "3",
                                           "MOEMESH_WORKER_EXIT_WITH_PARENT": "on", "MOEMESH_WORKER_HOST": "h"})
    assert (s.coordinator, s.host, s.advertise_host, s.micro_batches, s.threads, s.exit_with_parent) == (
        "c:1", "0.0.0.0", "0.0.0.0", 2, 3, True)
    assert _settings("--advertise-host", "peer").advertise_host == "peer"
    assert _settings() == WorkerSettings(coordinator="c:1")
    assert _settings().max_concurrent_rpcs == 1024
    assert _settings(env={"MOEMESH_WORKER_MAX_CONCURRENT_RPCS": "9"}).max_concurrent_rpcs == 9
    with pytest.raises(ConfigError, match="--max-concurrent-rpcs must be at least 1, got 0"):
        _settings("--max-concurrent-rpcs", "0")


def test_bad_choices_from_the_environment_name_the_variable():
    with pytest.raises(ConfigError, match="MOEMESH_WORKER_DTYPE='int8'"):
        _settings(env={"MOEMESH_WORKER_DTYPE": "int8"})


def test_the_coordinator_is_required():
    parser = argparse.ArgumentParser()
    add_worker_command(parser.add_subparsers())
    with pytest.raises(ConfigError, match=r"--coordinator is required \(or set MOEMESH_WORKER_COORDINATOR\)"):
        settings_from(WorkerSettings, parser.parse_args(["worker"]), {})
    from_env = settings_from(WorkerSettings, parser.parse_args(["worker"]), {"MOEMESH_WORKER_COORDINATOR": "c:2"})
    assert from_env.coordinator == "c:2"
