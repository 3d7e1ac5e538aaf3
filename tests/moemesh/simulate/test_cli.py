"""`moemesh simulate`'s settings (moemesh.simulate.cli): flags only, with their defaults. A whole
run is driven in tests/moemesh/test_cli.py."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from moemesh.settings import settings_from
from moemesh.simulate.cli import SimulateSettings, add_simulate_command


def simulate_settings(*argv: str) -> SimulateSettings:
    parser = argparse.ArgumentParser()
    add_simulate_command(parser.add_subparsers())
    return settings_from(SimulateSettings, parser.parse_args(["simulate", *argv]), {"MOEMESH_SIMULATE_BATCH": "7"})


def test_defaults_predict_the_paper_deployment():
    s = simulate_settings()
    assert s == SimulateSettings()
    assert (s.topology, s.model, s.deployment, s.batch, s.seq, s.phase, s.micro_batches, s.placement, s.skew) == (
        "paper-16xh100", "paper", "ep16", None, None, "decode", 0, "ours", "uniform")
    assert (s.top_k, s.measure, s.rates, s.sweep, s.out, s.json_path) == (
        None, False, None, (16, 32, 64, 128, 256, 512, 1024), None, None)


def test_flags_parse_into_their_types():
    s = simulate_settings("--micro-batches", "2", "--sweep", "16,64", "--measure", "--rates", "g.json", "--json",
                          "r.json", "--phase", "prefill", "--batch", "8")
    assert (s.micro_batches, s.sweep, s.measure, s.rates, s.json_path, s.phase, s.batch) == (
        2, (16, 64), True, Path("g.json"), Path("r.json"), "prefill", 8)
    assert simulate_settings("--micro-batches", "auto", "--sweep", "").micro_batches == 0
    assert simulate_settings("--sweep", "").sweep == ()


def test_a_placement_outside_the_planners_methods_is_refused():
    with pytest.raises(SystemExit):
        simulate_settings("--placement", "random")


def test_model_presets_and_the_aligned_placement_parse():
    s = simulate_settings("--model", "deepseek-v3", "--placement", "aligned")
    assert (s.model, s.placement) == ("deepseek-v3", "aligned")
