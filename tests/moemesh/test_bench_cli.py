"""`moemesh bench`'s settings (moemesh.bench_cli): flags only, its defaults, the closed loop's
concurrency. The run itself is driven in tests/moemesh/test_loadgen.py."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from moemesh.bench_cli import BenchSettings, add_bench_command
from moemesh.errors import ConfigError
from moemesh.settings import settings_from


def bench_settings(*argv: str) -> BenchSettings:
    parser = argparse.ArgumentParser()
    add_bench_command(parser.add_subparsers())
    return settings_from(BenchSettings, parser.parse_args(["bench", *argv]), {"MOEMESH_BENCH_REQUESTS": "9"})


def test_defaults_are_a_closed_loop_of_8_in_flight():
    s = bench_settings("--target", "g:1")
    assert (s.target, s.requests, s.concurrency, s.mode, s.burstiness, s.warmup, s.seed, s.timeout_s) == (
        "g:1", 64, 8, "closed", 1.0, 4, 0, 600.0)
    assert (str(s.prompt_len), str(s.output_len), s.json_path, s.progress) == ("32", "32", None, True)


def test_an_open_loop_has_no_cap_unless_given():
    s = bench_settings("--target", "g:1", "--request-rate", "5", "--prompt-len", "uniform:2:6", "--no-progress",
                       "--json", "r.json")
    assert (s.mode, s.request_rate, s.concurrency, s.progress, s.json_path) == ("open", 5.0, None, False,
                                                                              Path("r.json"))
    assert str(s.prompt_len) == "uniform:2:6"
    assert bench_settings("--target", "g:1", "--request-rate", "5", "--concurrency", "3").concurrency == 3


@pytest.mark.parametrize("argv, message", [
    ((), "--target is required$"),
    (("--target", "g:1", "--requests", "0"), "--requests must be >= 1"),
    (("--target", "g:1", "--warmup", "-1"), "--warmup >= 0"),
])
def test_bad_settings_are_config_errors(argv, message):
    with pytest.raises(ConfigError, match=message):
        bench_settings(*argv)


def test_a_concurrency_below_one_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        bench_settings("--target", "g:1", "--concurrency", "0")
    assert "--concurrency must be >= 1, got 0" in capsys.readouterr().err
