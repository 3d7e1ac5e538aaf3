"""The `moemesh` command line (moemesh/cli.py), each documented entry driven once through a real
subprocess (`python -m moemesh.cli ...`), asserting what it produced: a checkpoint, tokens equal to
the in-process engine's, a simulator report, a served mesh that stops on Ctrl-C and leaves no
process behind. Kept short: one `up`, small models."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import psutil
import pytest

from expert_worker.settings import WorkerSettings
from moemesh.cli import GenerateSettings
from moemesh.cli import main as cli_main
from moemesh.engine.engine import Engine, generate
from moemesh.engine.sampling import SamplingParams
from moemesh.errors import ConfigError
from moemesh.launcher import DEFAULT_MODEL, UpSettings, add_up_command, mesh_spec, resolved
from moemesh.model.config import load_config
from moemesh.model.decoder import RuntimeShape, build_model
from moemesh.settings import add_options, settings_from

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


def test_generate_local_without_a_model_is_refused(capsys):
    code, _, err = main_in_process(capsys, "generate", "--local", "--token-ids", "1")
    assert code == 2 and "--local needs --model" in err


def generate_settings(*argv: str) -> GenerateSettings:
    parser = argparse.ArgumentParser()
    add_options(parser, GenerateSettings)
    return settings_from(GenerateSettings, parser.parse_args(argv), {"MOEMESH_GENERATE_TARGET": "ignored:1"})


def test_generate_settings_are_flags_only_with_their_defaults():
    s = generate_settings("--target", "g:1", "--token-ids", "1,2")
    assert s == GenerateSettings(target="g:1", token_ids=(1, 2))
    assert (s.local, s.model, s.max_new_tokens, s.temperature, s.top_p, s.top_k, s.seed, s.timeout_s, s.json) == (
        False, None, 32, 0.0, 1.0, 0, None, 120.0, False)


@pytest.mark.parametrize("argv, message", [
    ((), "give one of --local or --target"),
    (("--local", "--model", "m", "--target", "g:1", "--prompt", "x"), "give one of --local or --target"),
    (("--target", "g:1"), "give one of --prompt or --token-ids"),
    (("--target", "g:1", "--prompt", "x", "--token-ids", "1"), "give one of --prompt or --token-ids"),
])
def test_generate_settings_refuse_an_ambiguous_command(argv, message):
    with pytest.raises(ConfigError, match=message):
        generate_settings(*argv)


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


def main_in_process(capsys, *args: str) -> tuple[int, str, str]:
    """`moemesh ARGS` through the same main() the console script runs, in this process (parsing and
    refusals need no child: a subprocess only adds seconds of torch import)."""
    try:
        code = cli_main(list(args))
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def test_worker_overflow_flags_parse_and_refuse_bad_values(capsys):
    """--overflow / --capacity-factor / --dtype are `moemesh worker` flags that `up` also takes (and
    passes on, below): both parsers list them with their choices and refuse what they do not accept."""
    for command in ("worker", "up"):
        code, out, err = main_in_process(capsys, command, "--help")
        assert code == 0, err
        assert "--overflow {dropless,reroute,drop}" in out and "--capacity-factor" in out
        assert "--dtype {auto,float32,bfloat16,float16}" in out
        code, _, err = main_in_process(capsys, command, "--overflow", "spill")
        assert code == 2 and "invalid choice: 'spill'" in err
        code, _, err = main_in_process(capsys, command, "--capacity-factor", "lots")
        assert code == 2 and "--capacity-factor" in err


def up_settings(*argv: str, env: dict[str, str] | None = None) -> UpSettings:
    parser = argparse.ArgumentParser()
    add_up_command(parser.add_subparsers())
    return settings_from(UpSettings, parser.parse_args(["up", *argv]), env or {})


def test_up_settings_flags_override_the_environment_which_overrides_defaults(tmp_path):
    env = {"MOEMESH_UP_PORT": "0", "MOEMESH_UP_POLICY": "gating", "MOEMESH_UP_WORKERS": "3"}
    s = up_settings("--workers", "2", "--placement", "p.yaml", env=env)
    assert (s.port, s.policy, s.workers, s.model, s.host, s.max_seqs, s.micro_batches) == (
        0, "gating", 2, None, "127.0.0.1", 32, 1)
    assert s.placement == Path("p.yaml").resolve() and (s.overflow, s.capacity_factor, s.dtype) == (None,) * 3
    assert s.http_port == 8000 and up_settings("--http-port", "-1").http_port == -1
    assert mesh_spec(up_settings("--model", str(tmp_path), "--workers", "1", "--http-port", "0"), tmp_path,
                     cpus=1).gateway_http_port == 0
    with pytest.raises(ConfigError, match="MOEMESH_UP_POLICY='best' is not valid for --policy"):
        up_settings(env={"MOEMESH_UP_POLICY": "best"})
    with pytest.raises(ConfigError, match="--experts-per-worker must be > 0"):
        up_settings("--experts-per-worker", "0")


def test_up_resolves_its_workers_from_the_model(tiny):
    assert resolved(up_settings("--model", str(tiny))).workers == 4  # one per expert
    assert resolved(up_settings("--model", str(tiny), "--experts-per-worker", "2")).workers == 2
    assert resolved(up_settings("--model", str(tiny), "--workers", "3")).model == tiny.resolve()


def test_up_passes_worker_flags_on_only_when_given(tmp_path):
    """Unset, a worker keeps its own default (or its MOEMESH_WORKER_* variable): no flag is passed."""
    given = up_settings("--model", str(tmp_path), "--workers", "2", "--overflow", "drop", "--dtype", "float32",
                        "--chunked-prefill", "--max-batched-tokens", "256",
                        env={"MOEMESH_UP_CAPACITY_FACTOR": "1.5"})
    flags = mesh_spec(given, tmp_path, cpus=8).worker_flags
    pairs = set(pairwise(flags))
    assert {("--overflow", "drop"), ("--capacity-factor", "1.5"), ("--dtype", "float32"), ("--threads", "4"),
            ("--max-batched-tokens", "256")} <= pairs and "--chunked-prefill" in flags
    parser = argparse.ArgumentParser()
    add_options(parser, WorkerSettings)
    worker = settings_from(WorkerSettings, parser.parse_args(["--coordinator", "x:1", *flags]), {})
    assert (worker.chunked_prefill, worker.max_batched_tokens, worker.overflow) == (True, 256, "drop")
    assert ("--gating-rule", "ours") in set(pairwise(mesh_spec(given, tmp_path, cpus=8).coordinator_flags))
    paper = up_settings("--model", str(tmp_path), "--workers", "2", "--policy", "gating", "--gating-rule", "paper")
    assert ("--gating-rule", "paper") in set(pairwise(mesh_spec(paper, tmp_path, cpus=8).coordinator_flags))
    plain = mesh_spec(up_settings("--model", str(tmp_path), "--workers", "2"), tmp_path, cpus=8).worker_flags
    assert not {"--overflow", "--capacity-factor", "--dtype", "--chunked-prefill", "--max-batched-tokens"} & set(plain)


def test_up_without_a_model_serves_the_default_and_stops_on_ctrl_c(tmp_path):
    """`up` with no --model serves the shipped default model (the trained one); its workers
    run with the worker flags given to `up`; a token stream through its gateway equals the in-process
    engine's; SIGINT stops every process."""
    from moemesh.client import generate_remote

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    log = tmp_path / "up.log"  # a file, not a pipe: the mesh's logs must never block on a full pipe
    with log.open("w") as err:
        up = subprocess.Popen([sys.executable, "-m", "moemesh.cli", "up", "--port", "0",
                               "--http-port", "0", "--workers", "2", "--max-model-len", "256", "--overflow",
                               "dropless", "--dtype", "float32", "--capacity-factor", "1.5"],
                              stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True, env=env)
    children: list[psutil.Process] = []
    try:
        line = up.stdout.readline() if up.stdout else ""
        match = re.search(r"gateway at (\S+); coordinator at (\S+);", line)
        assert match, (line, log.read_text()[-3000:])
        assert re.search(r"; OpenAI API at http://127\.0\.0\.1:\d+/v1$", line.strip()), line
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) >= 4  # coordinator, 2 workers, gateway
        workers = [c.cmdline() for c in children if "worker" in c.cmdline()]
        assert len(workers) == 2 and all(
            {("--overflow", "dropless"), ("--dtype", "float32"), ("--capacity-factor", "1.5")} <= set(pairwise(w))
            for w in workers)
        model_dir = DEFAULT_MODEL
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
