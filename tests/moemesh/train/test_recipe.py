"""The recipe's fast mode (tiny sizes, a few steps) on a small archive: its loss falls."""

from __future__ import annotations

import argparse

import pytest

from moemesh.errors import ConfigError
from moemesh.settings import add_options, settings_from
from moemesh.train.recipe import TrainSettings, learning_rate, train

FAST = ["--layers", "1", "--hidden", "32", "--intermediate", "32", "--experts", "4", "--heads", "2",
        "--kv-heads", "1", "--seq-len", "48", "--batch", "8", "--steps", "160", "--eval-every", "80",
        "--eval-windows", "4", "--log-every", "10", "--warmup", "5", "--threads", "1"]


def settings(argv: list[str]) -> TrainSettings:
    parser = argparse.ArgumentParser()
    add_options(parser, TrainSettings)
    return settings_from(TrainSettings, parser.parse_args(argv), {})


def fast_settings(archive, out) -> TrainSettings:
    return settings([str(out), "--data", str(archive), *FAST])


def test_fast_mode_loss_falls_and_beats_the_unigram_baseline(archive, tmp_path):
    lines: list[str] = []
    _, _, result = train(fast_settings(archive, tmp_path / "out"), say=lines.append)
    first, last = result.curve[0], result.curve[-1]
    assert (first["step"], last["step"]) == (80, 160) and result.steps == 160
    assert last["train_loss"] < first["train_loss"]
    assert last["held_out_bits_per_byte"] < first["held_out_bits_per_byte"]
    assert result.held_out_bits_per_byte < result.unigram_bits_per_byte  # repetitive text: context helps
    assert result.tokens == 160 * 8 * 48
    progress = [line for line in lines if line.startswith("step 10/160")]
    assert progress and "ETA" in progress[0] and "bits/byte" in progress[0]


def test_learning_rate_warms_up_then_decays_to_the_floor(archive, tmp_path):
    s = fast_settings(archive, tmp_path)
    assert learning_rate(1, s) == pytest.approx(s.lr / 5)
    assert learning_rate(5, s) == pytest.approx(s.lr)
    assert learning_rate(160, s) == pytest.approx(s.lr * s.min_lr_ratio)
    rates = [learning_rate(i, s) for i in range(5, 161)]
    assert rates == sorted(rates, reverse=True)


@pytest.mark.parametrize("flags, match", [(["--top-k", "5"], "top_k"), (["--steps", "0"], "--steps"),
                                          (["--lr", "2"], "--lr")])
def test_bad_settings_are_config_errors(archive, tmp_path, flags, match):
    with pytest.raises(ConfigError, match=match):
        settings([str(tmp_path), "--data", str(archive), *FAST, *flags])
