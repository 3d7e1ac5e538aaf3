"""compose/gpu.yaml and its generator (moemesh/compose_gpu.py): the committed file is what the
generator writes, both compose files pass the compose-spec JSON schema (check-jsonschema's vendored
copy, run as its real CLI), and the lint catches what the schema cannot see; a bad file is caught."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moemesh.compose_gpu import lint, load, merged, override, render

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "compose" / "compose.yaml"
GPU = REPO / "compose" / "gpu.yaml"
HANG_BOUND_S = 120  # only catches a hang


def schema_check(*files: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("check-jsonschema")
    return subprocess.run([str(exe), "--builtin-schema", "vendor.compose-spec", *map(str, files)],
                          capture_output=True, text=True, timeout=HANG_BOUND_S, check=False)


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "moemesh.cli", "compose-gpu", *args], capture_output=True,
                          text=True, timeout=HANG_BOUND_S, env=env, check=False)


def gpu_doc(ids=("0", "1")) -> dict:
    return override(load(BASE), list(ids))


def test_committed_gpu_yaml_is_the_generators_output():
    assert GPU.read_text() == render(gpu_doc(), gpus=2, first_gpu=0)


def test_each_gpu_gets_one_worker_derived_from_the_cpu_worker():
    base, doc = load(BASE), gpu_doc(("2", "3", "4"))
    workers = {name: s for name, s in doc["services"].items() if name.startswith("worker-gpu")}
    assert sorted(workers) == ["worker-gpu2", "worker-gpu3", "worker-gpu4"]
    for name, service in workers.items():
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device == {"driver": "nvidia", "device_ids": [name.removeprefix("worker-gpu")], "capabilities": ["gpu"]}
        assert service["entrypoint"] == base["services"]["worker"]["entrypoint"]
        assert service["healthcheck"] == base["services"]["worker"]["healthcheck"]
        assert service["environment"]["MOEMESH_WORKER_DEVICE"] == "cuda:0"  # the one GPU the container sees
    assert doc["services"]["worker"] == {"scale": 0}
    assert doc["services"]["coordinator"]["environment"]["MOEMESH_COORDINATOR_WORKERS"] == "3"
    assert set(doc["services"]["gateway"]["depends_on"]) == set(workers)
    assert lint(merged(base, doc)) == []


def test_both_compose_files_pass_the_compose_spec_schema():
    run = schema_check(BASE, GPU)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_schema_catches_a_malformed_device_request(tmp_path):
    doc = gpu_doc()
    doc["services"]["worker-gpu0"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] = "gpu"
    bad = tmp_path / "gpu.yaml"
    bad.write_text(yaml.safe_dump(doc))
    run = schema_check(bad)
    assert run.returncode == 1 and "capabilities" in run.stdout + run.stderr


def _devices(doc: dict, service: str) -> list:
    return doc["services"][service]["deploy"]["resources"]["reservations"]["devices"]


def test_lint_catches_count_with_device_ids():
    doc = merged(load(BASE), gpu_doc())
    _devices(doc, "worker-gpu1")[0]["count"] = 1
    assert lint(doc) == ["worker-gpu1: a device request gives both count and device_ids (Docker takes one)"]


def test_lint_catches_a_gpu_given_twice():
    doc = merged(load(BASE), gpu_doc())
    _devices(doc, "worker-gpu1")[0]["device_ids"] = ["0"]
    assert lint(doc) == ["worker-gpu1: device id 0 is already worker-gpu0's"]
    _devices(doc, "worker-gpu1")[0]["device_ids"] = ["1", "1"]
    assert lint(doc) == ["worker-gpu1: device id 1 listed twice"]


def test_lint_catches_a_gpu_request_without_the_gpu_capability():
    doc = merged(load(BASE), gpu_doc())
    _devices(doc, "worker-gpu0")[0]["capabilities"] = ["compute"]
    assert lint(doc) == ["worker-gpu0: an nvidia device request without capabilities [gpu]"]


@pytest.mark.slow  # CLI subprocesses
def test_cli_writes_and_lints(tmp_path):
    out = tmp_path / "gpu.yaml"
    wrote = cli("--gpus", "4", "--first-gpu", "2", "--out", str(out))
    assert wrote.returncode == 0, wrote.stderr
    assert out.read_text() == render(gpu_doc(("2", "3", "4", "5")), gpus=4, first_gpu=2)
    assert cli("--lint", "--out", str(out)).returncode == 0
    doc = copy.deepcopy(yaml.safe_load(out.read_text()))
    _devices(doc, "worker-gpu3")[0]["device_ids"] = ["2"]
    out.write_text(yaml.safe_dump(doc))
    caught = cli("--lint", "--out", str(out))
    assert caught.returncode == 1
    assert caught.stderr.strip() == "moemesh compose-gpu: worker-gpu3: device id 2 is already worker-gpu2's"
    assert cli("--gpus", "0").returncode == 2
