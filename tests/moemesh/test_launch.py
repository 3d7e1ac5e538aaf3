"""moemesh.launch: named child processes (real `moemesh` services) started, watched and stopped.
Whole meshes run in tests/moemesh/test_launcher.py (`moemesh up`) and tests/gateway (running_mesh)."""

from __future__ import annotations

from pathlib import Path

import pytest

from moemesh.errors import MoemeshError
from moemesh.launch import Mesh, MeshSpec, Processes
from moemesh.launch.processes import STOP_ORDER, _stage
from moemesh.model.tiny import TinySpec, write_tiny_model

START_TIMEOUT_S = 120.0  # only catches a hang (importing torch on a loaded machine)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("launch") / "model",
                            TinySpec(layers=2, experts=4, hidden=32, intermediate=32, heads=4, kv_heads=2, vocab=512))


def test_a_started_service_publishes_its_port_and_stops_on_sigterm(model, tmp_path):
    procs = Processes(tmp_path / "logs")
    try:
        procs.start("coordinator", ["coordinator", "--model", str(model), "--workers", "1", "--port", "0",
                                    "--port-file", str(tmp_path / "c.port"), "--shutdown-grace", "0.1"])
        assert procs.wait_port("coordinator", tmp_path / "c.port", START_TIMEOUT_S) > 0
        procs.check_alive()
        assert procs.terminate("coordinator") == 0
        with pytest.raises(MoemeshError, match="coordinator exited with code 0"):
            procs.check_alive()
        assert (tmp_path / "logs" / "coordinator.log").is_file()
    finally:
        procs.stop()
    assert all(p.poll() is not None for p in procs.procs.values())


def test_a_child_that_dies_is_reported_with_its_log(tmp_path):
    procs = Processes(tmp_path / "logs")
    try:
        procs.start("coordinator", ["coordinator", "--model", str(tmp_path / "missing"), "--workers", "1",
                                    "--port", "0"])
        with pytest.raises(MoemeshError, match="coordinator exited with code 2") as info:
            procs.wait_port("coordinator", tmp_path / "never.port", START_TIMEOUT_S)
        assert "--- coordinator.log ---" in str(info.value) and "config.json" in str(info.value)
    finally:
        procs.stop()


def test_kill_is_a_crash_and_names_are_unique(model, tmp_path):
    procs = Processes(tmp_path / "logs")
    try:
        procs.start("gateway", ["gateway", "--coordinator", "127.0.0.1:1", "--model", str(model), "--port", "0"])
        with pytest.raises(MoemeshError, match="already running"):
            procs.start("gateway", ["gateway"])
        procs.kill("gateway")
        assert procs.procs["gateway"].returncode == -9
    finally:
        procs.stop()


def test_a_killed_worker_is_restarted_with_the_same_command_and_a_crashed_coordinator_is_reported(model, tmp_path):
    """Mesh.supervise: workers come back (bounded), any other role ends the mesh with its log."""
    mesh = Mesh(MeshSpec(model=model, workers=1, state_dir=tmp_path, log_dir=tmp_path / "logs"))
    try:
        # A worker whose coordinator does not exist yet keeps retrying: a live process to kill.
        mesh.processes.start("worker0", ["worker", "--coordinator", "127.0.0.1:1", "--port", "0"])
        first = mesh.procs["worker0"]
        assert mesh.supervise(max_restarts=1) == []  # running: nothing to do
        mesh.kill("worker0")
        assert mesh.supervise(max_restarts=1) == ["worker0"]
        again = mesh.procs["worker0"]
        assert again.pid != first.pid and again.poll() is None
        assert mesh.processes.children["worker0"].argv == ("worker", "--coordinator", "127.0.0.1:1", "--port", "0")
        mesh.kill("worker0")
        with pytest.raises(MoemeshError, match="after 1 restarts; giving up"):
            mesh.supervise(max_restarts=1)
        mesh.processes.start("coordinator", ["coordinator", "--model", str(tmp_path / "missing"), "--workers", "1"])
        mesh.procs["coordinator"].wait(timeout=START_TIMEOUT_S)
        with pytest.raises(MoemeshError, match="coordinator exited with code 2"):
            mesh.supervise(max_restarts=5)
    finally:
        mesh.stop()


def test_stop_order_is_gateways_then_workers_then_the_coordinator():
    assert [_stage(r) for r in ("gateway", "worker", "coordinator", "other")] == [0, 1, 2, len(STOP_ORDER)]


def test_mesh_spec_checks_its_counts(tmp_path):
    with pytest.raises(MoemeshError):
        MeshSpec(model=tmp_path, workers=0, state_dir=tmp_path)
    with pytest.raises(MoemeshError, match="per_worker_flags"):
        MeshSpec(model=tmp_path, workers=1, state_dir=tmp_path, per_worker_flags=((), ()))
