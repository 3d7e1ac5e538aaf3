"""The `moemesh` command line (moemesh/cli.py), each documented entry driven once through a real
subprocess (`python -m moemesh.cli ...`), asserting what it produced: a checkpoint, tokens equal to
the in-process engine's, a simulator report, a served mesh that stops on Ctrl-C and leaves no
process behind. Kept short: one `up`, small models."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from moemesh.engine.engine import Engine, generate
from moemesh.engine.sampling import SamplingParams
from moemesh.model.config import load_config
from moemesh.model.decoder import RuntimeShape, build_model

pytestmark = pytest.mark.slow  # runs the CLI as subprocesses (a mesh among them)

TIMEOUT_S = 300  # hang bound for every subprocess (the machine is shared and slow to import torch)


def moemesh(*args: str, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run([sys.executable, "-m", "moemesh.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)


def reference(model_dir: Path, prompt: list[int], params: SamplingParams) -> list[int]:
    model = build_model(model_dir, RuntimeShape(max_seqs=1, max_model_len=256))
    return generate(Engine(model), [prompt], params)[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """`moemesh tiny-model` writes a loadable checkpoint of the requested shape."""
    out = tmp_path_factory.mktemp("cli") / "tiny"
    run = moemesh("tiny-model", str(out), "--layers", "2", "--experts", "4", "--top-k", "2", "--hidden", "64",
                  "--intermediate", "64", "--heads", "4", "--kv-heads", "2", "--vocab", "300", "--seed", "3")
    assert run.returncode == 0, run.stderr
    assert f"wrote {out}" in run.stdout
    return out


def test_tiny_model_writes_the_requested_shape(tiny):
    cfg = load_config(tiny)
    assert (cfg.num_experts, cfg.top_k, cfg.hidden_size, cfg.vocab_size) == (4, 2, 64, 300)


def test_generate_local_matches_the_engine(tiny):
    run = moemesh("generate", "--local", "--model", str(tiny), "--token-ids", "1,5,9", "--max-new-tokens", "6",
                  "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["token_ids"] == reference(tiny, [1, 5, 9], SamplingParams(max_new_tokens=6))


def test_generate_local_seeded_sampling_matches_the_engine(tiny):
    params = SamplingParams(max_new_tokens=6, temperature=0.9, top_k=20, top_p=0.9, seed=11)
    run = moemesh("generate", "--local", "--model", str(tiny), "--token-ids", "1,5,9", "--max-new-tokens", "6",
                  "--temperature", "0.9", "--top-k", "20", "--top-p", "0.9", "--seed", "11", "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["token_ids"] == reference(tiny, [1, 5, 9], params)


def test_generate_local_without_a_model_is_refused():
    run = moemesh("generate", "--local", "--token-ids", "1")
    assert run.returncode != 0 and "--local needs --model" in run.stderr


def test_simulate_reports_the_paper_deployment(tmp_path):
    out = tmp_path / "sim.json"
    run = moemesh("simulate", "--sweep", "16", "--json", str(out))
    assert run.returncode == 0, run.stderr
    assert "deployment ep16: 16 devices" in run.stdout
    report = json.loads(out.read_text())
    p = report["prediction"]
    assert (p["deployment"], p["devices"], p["phase"]) == ("ep16", 16, "decode")
    assert p["tpot_s"] == p["step_s"] and p["tps"] == pytest.approx(p["batch"] / p["step_s"])  # decode
    assert len(p["layers"]) == 4 and [s["devices"] for s in report["scaling"]] == [16, 16]  # 2 contexts


def test_worker_overflow_flags_parse_and_refuse_bad_values():
    """`up` does not pass --overflow / --capacity-factor (they are `moemesh worker` flags, read by a
    worker the launcher starts with defaults): the worker's parser lists them with their choices
    and refuses what they do not accept."""
    helped = moemesh("worker", "--help")
    assert helped.returncode == 0, helped.stderr
    assert "--overflow {dropless,reroute,drop}" in helped.stdout and "--capacity-factor" in helped.stdout
    bad = moemesh("worker", "--overflow", "spill")
    assert bad.returncode == 2 and "invalid choice: 'spill'" in bad.stderr
    bad = moemesh("worker", "--capacity-factor", "lots")
    assert bad.returncode == 2 and "--capacity-factor" in bad.stderr


def test_up_without_a_model_serves_the_default_and_stops_on_ctrl_c(tmp_path):
    """`up` with no --model writes the default tiny model into --cache-dir and serves it; a token
    stream through its gateway equals the in-process engine's; SIGINT stops every process."""
    from moemesh.client import generate_remote

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    log = tmp_path / "up.log"  # a file, not a pipe: the mesh's logs must never block on a full pipe
    with log.open("w") as err:
        up = subprocess.Popen([sys.executable, "-m", "moemesh.cli", "up", "--cache-dir", str(tmp_path), "--port", "0",
                               "--workers", "2", "--max-model-len", "256"],
                              stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True, env=env)
    children: list[psutil.Process] = []
    try:
        line = up.stdout.readline() if up.stdout else ""
        match = re.search(r"gateway at (\S+); coordinator at (\S+);", line)
        assert match, (line, log.read_text()[-3000:])
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) >= 4  # coordinator, 2 workers, gateway
        model_dir = tmp_path / "tiny-mixtral-8x"
        assert load_config(model_dir).num_experts == 8
        params = SamplingParams(max_new_tokens=5)
        ids, _ = generate_remote(match.group(1), None, [3, 4, 5], params, timeout_s=120)
        assert ids == reference(model_dir, [3, 4, 5], params)
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0  # hang bound
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        for child in children:  # stop whatever it left, then fail below
            if child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
                child.kill()
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"moemesh up left {alive} running"
