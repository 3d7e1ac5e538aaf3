"""moemesh.settings: one frozen dataclass per service, built from flags > environment > defaults."""

from __future__ import annotations

import argparse
from dataclasses import FrozenInstanceError, dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from coordinator.settings import CoordinatorSettings
from expert_worker.settings import WorkerSettings
from gateway.settings import GatewaySettings
from moemesh.errors import ConfigError
from moemesh.settings import add_options, option, options, parse_bool, parse_settings, settings_from


@dataclass(frozen=True)
class Demo:
    ENV_PREFIX: ClassVar[str] = "MOEMESH_DEMO_"

    target: str = option("--target", "HOST:PORT to call")
    retries: int = option("--max-retries", "attempts", int, default=3)
    verbose: bool = option("--verbose", "say more", parse_bool, default=False)
    out: Path | None = option("--out", "output file", Path, default=None)
    mode: str = option("--mode", "how", default="fast", choices=("fast", "safe"))
    internal: float = 0.5  # no flag


def build(argv: list[str], env: dict[str, str] | None = None) -> Demo:
    parser = argparse.ArgumentParser()
    add_options(parser, Demo)
    return settings_from(Demo, parser.parse_args(argv), env or {})


def test_flag_beats_environment_beats_default():
    env = {"MOEMESH_DEMO_TARGET": "e:1", "MOEMESH_DEMO_MAX_RETRIES": "7", "MOEMESH_DEMO_OUT": "/o"}
    assert build(["--max-retries", "9"], env) == Demo(target="e:1", retries=9, out=Path("/o"))
    assert build(["--target", "f:1"], env).target == "f:1"
    assert build(["--target", "f:1"]) == Demo(target="f:1")


@pytest.mark.parametrize("text, value", [("1", True), ("yes", True), ("ON", True), ("true", True),
                                         ("0", False), ("no", False), ("off", False), ("", False)])
def test_booleans_from_the_environment(text, value):
    assert build(["--target", "t:1"], {"MOEMESH_DEMO_VERBOSE": text}).verbose is value


def test_a_switch_flag_sets_true():
    assert build(["--target", "t:1", "--verbose"], {"MOEMESH_DEMO_VERBOSE": "0"}).verbose is True


@pytest.mark.parametrize("env, message", [
    ({"MOEMESH_DEMO_MAX_RETRIES": "many"}, "MOEMESH_DEMO_MAX_RETRIES='many' is not valid for --max-retries"),
    ({"MOEMESH_DEMO_VERBOSE": "maybe"}, "MOEMESH_DEMO_VERBOSE='maybe' is not valid for --verbose"),
    ({"MOEMESH_DEMO_MODE": "slow"}, "MOEMESH_DEMO_MODE='slow' is not valid for --mode: choose one of fast, safe"),
])
def test_a_bad_variable_is_a_config_error_naming_it(env, message):
    with pytest.raises(ConfigError, match=message):
        build(["--target", "t:1"], env)


def test_a_missing_required_field_names_flag_and_variable():
    with pytest.raises(ConfigError, match=r"--target is required \(or set MOEMESH_DEMO_TARGET\)"):
        build([])


def test_settings_are_frozen_and_unflagged_fields_keep_their_default():
    s = build(["--target", "t:1"])
    assert s.internal == 0.5 and "internal" not in {f.name for f, _ in options(Demo)}
    with pytest.raises(FrozenInstanceError):
        s.target = "x"  # type: ignore[misc]


@pytest.mark.parametrize("cls, command", [(CoordinatorSettings, "coordinator"), (GatewaySettings, "gateway"),
                                          (WorkerSettings, "worker")])
def test_every_service_flag_names_its_variable_in_the_help(cls, command):
    parser = argparse.ArgumentParser(prog=command)
    add_options(parser, cls)
    text = " ".join(parser.format_help().split())
    for _, opt in options(cls):
        assert opt.flag in text and opt.env(cls.ENV_PREFIX) in text


@dataclass(frozen=True)
class Tool:
    """A one-shot tool: no variables but the one it names; a positional; a switch that turns off."""

    ENV_PREFIX: ClassVar[None] = None

    file: Path = option("file", "input file", Path)
    target: str = option("--target", "HOST:PORT", default="h:1", env="MOEMESH_SHARED_ADDRESS")
    count: int = option("--count", "how many", int, default=2, metavar="N")
    progress: bool = option("--no-progress", "no progress bar", parse_bool, default=True)


def build_tool(argv: list[str], env: dict[str, str] | None = None) -> Tool:
    parser = argparse.ArgumentParser()
    add_options(parser, Tool)
    return settings_from(Tool, parser.parse_args(argv), env or {})


def test_a_tool_without_prefix_reads_only_the_variables_it_names():
    env = {"MOEMESH_SHARED_ADDRESS": "e:2", "COUNT": "7", "MOEMESH_COUNT": "7", "NO_PROGRESS": "1"}
    assert build_tool(["in.txt"], env) == Tool(file=Path("in.txt"), target="e:2", count=2, progress=True)
    assert build_tool(["in.txt", "--target", "f:3", "--count", "5"], env) == Tool(Path("in.txt"), "f:3", 5)


def test_a_switch_with_a_true_default_turns_it_off():
    assert build_tool(["f", "--no-progress"]).progress is False
    assert build(["--target", "t:1"], {"MOEMESH_DEMO_VERBOSE": "0"}).verbose is False


def test_a_positional_is_required_by_the_parser_and_never_from_the_environment():
    parser = argparse.ArgumentParser()
    add_options(parser, Tool)
    with pytest.raises(SystemExit):
        parser.parse_args([])
    with pytest.raises(ConfigError, match=r"^file is required$"):
        settings_from(Tool, argparse.Namespace(), {"FILE": "x"})


def test_a_tool_help_names_only_its_variables():
    parser = argparse.ArgumentParser()
    add_options(parser, Tool)
    text = " ".join(parser.format_help().split())
    assert "--target TARGET HOST:PORT (env MOEMESH_SHARED_ADDRESS; default h:1)" in text
    assert "--count N how many (default 2)" in text and "--no-progress no progress bar" in text


@dataclass(frozen=True)
class Bench:
    """A benchmark script's settings: flags taking one or more values, and an internal flag."""

    ENV_PREFIX: ClassVar[str] = "MOEMESH_BENCH_"

    workers: tuple[int, ...] = option("--workers", "mesh sizes", int, default=(2, 4, 8), many=True)
    batches: tuple[int, ...] = option("--micro-batches", "per step", int, default=(1,), choices=(1, 2), many=True)
    child: Path | None = option("--child", argparse.SUPPRESS, Path, default=None)


def build_bench(argv: list[str], env: dict[str, str] | None = None) -> Bench:
    parser = argparse.ArgumentParser()
    add_options(parser, Bench)
    return settings_from(Bench, parser.parse_args(argv), env or {})


def test_a_many_valued_flag_gives_a_tuple_from_flags_or_the_environment():
    assert build_bench([]) == Bench(workers=(2, 4, 8), batches=(1,))
    assert build_bench(["--workers", "3", "5", "--micro-batches", "2", "1"]) == Bench((3, 5), (2, 1))
    assert build_bench([], {"MOEMESH_BENCH_WORKERS": "6, 7 9"}).workers == (6, 7, 9)
    assert build_bench(["--workers", "1"], {"MOEMESH_BENCH_WORKERS": "6"}).workers == (1,)


def test_a_many_valued_flag_checks_every_value():
    parser = argparse.ArgumentParser()
    add_options(parser, Bench)
    for argv in (["--micro-batches", "1", "3"], ["--workers"], ["--workers", "2", "x"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
    with pytest.raises(ConfigError, match=r"MOEMESH_BENCH_MICRO_BATCHES='1 3' is not valid .*choose one of 1, 2"):
        build_bench([], {"MOEMESH_BENCH_MICRO_BATCHES": "1 3"})
    with pytest.raises(ConfigError, match="MOEMESH_BENCH_WORKERS=' ' is not valid for --workers: give one or more"):
        build_bench([], {"MOEMESH_BENCH_WORKERS": " "})


def test_an_internal_flag_parses_but_is_not_in_the_help():
    parser = argparse.ArgumentParser()
    add_options(parser, Bench)
    text = " ".join(parser.format_help().split())
    assert "--child" not in text and "--workers WORKERS [WORKERS ...] mesh sizes" in text
    assert "(env MOEMESH_BENCH_WORKERS; default 2 4 8)" in text
    assert build_bench(["--child", "c.json"]).child == Path("c.json")


def test_a_script_parses_its_settings_in_one_call_and_a_config_error_exits_2(capsys):
    assert parse_settings(Bench, ["--workers", "3"], "a bench") == Bench(workers=(3,))
    assert parse_settings(Demo, ["--target", "t:1"], environ={"MOEMESH_DEMO_MAX_RETRIES": "4"}).retries == 4
    assert parse_settings(Demo, ["--target", "t:1"]).retries == 3  # no environment unless passed
    with pytest.raises(SystemExit) as exit_:
        parse_settings(Demo, [])
    assert exit_.value.code == 2 and "error: --target is required" in capsys.readouterr().err
