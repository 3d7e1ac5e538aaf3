"""The coordinator's command line: a real `python -m coordinator.cli coordinator` process, the
`placement set|show` commands against it, and settings resolution (flags > env > defaults)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.cli import (
    PlacementSet,
    PlacementShow,
    PlacementTrace,
    add_coordinator_command,
    add_placement_command,
    main,
    placement_from_args,
)
from coordinator.settings import CoordinatorSettings
from moemesh.errors import ConfigError
from moemesh.retry import Backoff, retry_sync
from moemesh.settings import settings_from
from moemesh.v1 import coordinator_pb2 as pb
from moemesh.v1 import coordinator_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow  # starts the coordinator CLI as subprocesses

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 30.0  # importing torch dominates start-up on a busy machine


def wait_for_port(port_file: Path, proc: subprocess.Popen | None = None) -> int:
    def read() -> int:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"coordinator exited early with {proc.returncode}")
        if not port_file.exists():
            raise FileNotFoundError(f"no port file {port_file} after {START_TIMEOUT_S}s")
        return int(port_file.read_text())

    return retry_sync(read, lambda exc: isinstance(exc, FileNotFoundError),
                      backoff=Backoff(first_s=0.05, cap_s=0.2, deadline_s=START_TIMEOUT_S))


def coordinator_argv(model: Path, port_file: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "coordinator.cli", "coordinator", "--model", str(model), "--workers", "2",
            "--port", "0", "--port-file", str(port_file), "--shutdown-grace", "0.5", *extra]


@pytest.fixture
def coordinator(tiny_model: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen, int]]:
    """A coordinator process for 2 workers on a free port; killed if a test leaves it running."""
    port_file = tmp_path / "coordinator.port"
    with open(tmp_path / "coordinator.log", "wb") as log:
        # the tests register addresses nobody serves
        argv = coordinator_argv(tiny_model, port_file, "--no-registration-probe")
        proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=log)
    try:
        yield proc, wait_for_port(port_file, proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def health(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def register_two(port: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.CoordinatorStub(ch)
        for i in range(2):
            stub.RegisterWorker(pb.RegisterWorkerRequest(worker_id=f"w{i}", incarnation=1, address=f"h:{i}"),
                                timeout=5)


def test_coordinator_serves_placement_commands_and_stops_on_sigterm(coordinator, tmp_path, capsys):
    proc, port = coordinator
    target = f"127.0.0.1:{port}"
    assert health(port) == health_pb2.HealthCheckResponse.SERVING
    assert main(["placement", "show", "--coordinator", target, "--timeout", "5"]) == 2
    assert "UNAVAILABLE: no placement yet" in capsys.readouterr().err
    register_two(port)

    assert main(["placement", "show", "--coordinator", target]) == 0
    table = capsys.readouterr().out
    assert "placement epoch 1 (round_robin), world generation 1, 2 ranks" in table
    assert "layer 1" in table and "     7  1 " in table

    swapped = tmp_path / "swapped.yaml"
    swapped.write_text("experts: [[1], [0], [1], [0], [1], [0], [1], [0]]\n")
    assert main(["placement", "set", str(swapped), "--coordinator", target, "--expected-epoch", "1"]) == 0
    assert "published placement epoch 2 (manual)" in capsys.readouterr().out

    assert main(["placement", "set", str(swapped), "--coordinator", target, "--expected-epoch", "1"]) == 2
    assert "FAILED_PRECONDITION: expected placement epoch 1, the current epoch is 2" in capsys.readouterr().err
    short = tmp_path / "short.yaml"
    short.write_text("experts: [[1], [0]]\n")
    assert main(["placement", "set", str(short), "--coordinator", target]) == 2
    assert "INVALID_ARGUMENT: layer 0: 2 experts placed, the model has 8" in capsys.readouterr().err

    assert main(["placement", "show", "--yaml", "--coordinator", target]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert (shown["epoch"], shown["origin"], shown["world_size"]) == (2, "manual", 2)
    assert shown["layers"][0] == [[1], [0], [1], [0], [1], [0], [1], [0]]

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0


def test_exit_with_parent_stops_the_coordinator(tiny_model, tmp_path):
    """A parent starts the coordinator with --exit-with-parent and exits; the coordinator follows."""
    port_file = tmp_path / "child.port"
    parent = (
        "import subprocess, sys, time, pathlib\n"
        f"argv = {coordinator_argv(tiny_model, port_file, '--exit-with-parent')!r}\n"
        "child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "print(child.pid, flush=True)\n"
        f"port_file = pathlib.Path({str(port_file)!r})\n"
        "deadline = time.monotonic() + 30\n"
        "while not port_file.exists() and time.monotonic() < deadline:\n"
        "    time.sleep(0.05)\n"
    )
    out = subprocess.run([sys.executable, "-c", parent], cwd=REPO, capture_output=True, text=True, timeout=60)
    child = int(out.stdout.split()[0])
    try:
        port = int(port_file.read_text())
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child), "coordinator outlived its parent"
        with pytest.raises(grpc.RpcError):
            health(port)
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie awaiting reaping by init counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_coordinator_command(parser.add_subparsers())
    return parser.parse_args(["coordinator", *argv])


def test_settings_flags_override_env_which_overrides_defaults(tmp_path):
    env = {"MOEMESH_COORDINATOR_MODEL": str(tmp_path), "MOEMESH_COORDINATOR_WORKERS": "4",
           "MOEMESH_COORDINATOR_PORT": "6000", "MOEMESH_COORDINATOR_TRANSPORT": "nccl",
           "MOEMESH_COORDINATOR_EXIT_WITH_PARENT": "yes", "MOEMESH_COORDINATOR_HEARTBEAT_TIMEOUT": "3.5",
           "MOEMESH_COORDINATOR_REDUNDANT_EXPERTS": "1", "MOEMESH_COORDINATOR_PROBE_TIMEOUT": "9"}
    s = settings_from(CoordinatorSettings, parse("--port", "0", "--host", "0.0.0.0", "--advertise-host", "coord",
                                                 "--probe-timeout", "0.5"), env)
    assert (s.redundant_experts, s.probe_timeout_s, s.reform_settle_s) == (1, 0.5, 0.2)
    assert (s.model_dir, s.workers, s.port, s.host, s.transport) == (tmp_path.resolve(), 4, 0, "0.0.0.0", "nccl")
    assert (s.exit_with_parent, s.heartbeat_timeout_s, s.heartbeat_interval_s) == (True, 3.5, 1.0)
    assert s.store_host == "coord" and s.placement_file is None and s.port_file is None
    defaults = settings_from(CoordinatorSettings, parse("--model", "m", "--workers", "1"), {})
    assert (defaults.host, defaults.port, defaults.transport, defaults.exit_with_parent) == (
        "127.0.0.1", 50050, "gloo", False)
    assert defaults.model_dir.is_absolute() and defaults.store_host == "127.0.0.1"
    assert (defaults.redundant_experts, defaults.probe_timeout_s, defaults.max_concurrent_rpcs) == (0, 2.0, 1024)
    assert settings_from(CoordinatorSettings, parse("--model", "m", "--workers", "1"),
                         {"MOEMESH_COORDINATOR_MAX_CONCURRENT_RPCS": "7"}).max_concurrent_rpcs == 7


@pytest.mark.parametrize("argv, env, message", [
    ((), {}, "--model is required"),
    (("--model", "m"), {}, "--workers is required"),
    (("--model", "m", "--workers", "0"), {}, "--workers must be at least 1"),
    (("--model", "m"), {"MOEMESH_COORDINATOR_WORKERS": "two"}, "MOEMESH_COORDINATOR_WORKERS='two'"),
    (("--model", "m", "--workers", "2", "--transport", "tcp"), {}, "--transport must be one of"),
    (("--model", "m", "--workers", "2", "--heartbeat-timeout", "0.5"), {}, "must exceed"),
    (("--model", "m", "--workers", "2", "--expert-shards", "3"), {}, "needs at least as many workers"),
    (("--model", "m", "--workers", "4", "--expert-shards", "2", "--policy", "replicate"), {}, "cannot be combined"),
    (("--model", "m", "--workers", "2", "--redundant-experts", "-1"), {}, "--redundant-experts must not be negative"),
    (("--model", "m", "--workers", "2", "--probe-timeout", "0"), {}, "--probe-timeout must be positive"),
    (("--model", "m", "--workers", "2", "--reform-settle", "-1"), {}, "--reform-settle must not be negative"),
    (("--model", "m", "--workers", "2", "--max-concurrent-rpcs", "0"), {}, "--max-concurrent-rpcs must be at least 1"),
])
def test_bad_settings_are_config_errors(argv, env, message):
    with pytest.raises(ConfigError, match=message):
        settings_from(CoordinatorSettings, parse(*argv), env)


def test_main_prints_errors_and_exits_2(capsys):
    assert main(["coordinator", "--model", "m", "--workers", "0"]) == 2
    assert "moemesh coordinator: error: --workers must be at least 1" in capsys.readouterr().err


def placement(*argv: str, env: dict[str, str] | None = None):
    parser = argparse.ArgumentParser()
    add_placement_command(parser.add_subparsers())
    return placement_from_args(parser.parse_args(["placement", *argv]), env or {})


def test_placement_settings_take_the_address_from_flag_then_variable_then_default(tmp_path):
    env = {"MOEMESH_COORDINATOR_ADDRESS": "c:7", "MOEMESH_COORDINATOR_TIMEOUT": "99"}  # only the address counts
    assert placement("show", env=env) == PlacementShow(target="c:7", timeout_s=10.0, yaml=False)
    assert placement("show", "--yaml", "--coordinator", "f:1", env=env) == PlacementShow(target="f:1", yaml=True)
    assert placement("set", str(tmp_path / "p.yaml"), "--expected-epoch", "3", "--timeout", "2") == PlacementSet(
        target="127.0.0.1:50050", timeout_s=2.0, file=tmp_path / "p.yaml", expected_epoch=3)
    assert placement("trace", "t.json") == PlacementTrace(file=Path("t.json"))


@pytest.mark.parametrize("argv, env, message", [
    (("show", "--timeout", "0"), {}, "--timeout must be positive"),
    (("show",), {"MOEMESH_COORDINATOR_ADDRESS": ""}, "must be HOST:PORT"),
])
def test_bad_placement_settings_are_config_errors(argv, env, message):
    with pytest.raises(ConfigError, match=message):
        placement(*argv, env=env)
