"""`moemesh probe` (moemesh/probe.py) run as a real subprocess against a real mesh on loopback:
a coordinator, a worker and a gateway that answer SERVING (exit 0), and each way a check fails
(exit 1, one line on stderr): an unknown service, a closed port, a socket that never answers, and
the gateway NOT_SERVING once its only worker was killed (last: it breaks the module's mesh)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from moemesh.errors import MoemeshError
from moemesh.launch.mesh import Mesh, MeshSpec, running
from moemesh.model.tiny import TinySpec, write_tiny_model
from moemesh.retry import Backoff, retry_sync

pytestmark = pytest.mark.slow  # a mesh and CLI subprocesses

REPO = Path(__file__).resolve().parents[2]
HANG_BOUND_S = 60  # only catches a hang


def probe(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "moemesh.cli", "probe", *args], capture_output=True, text=True,
                          timeout=HANG_BOUND_S, env=env, check=False)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory) -> Iterator[tuple[Mesh, str]]:
    """A one-worker mesh on a tiny model, and the worker's address."""
    root = tmp_path_factory.mktemp("probe")
    model = write_tiny_model(root / "tiny", TinySpec(layers=1, experts=2, top_k=1, hidden=32, intermediate=32,
                                                     heads=2, kv_heads=1, vocab=300))
    worker_port = root / "worker0.port"
    spec = MeshSpec(model=model, workers=1, state_dir=root, log_dir=root,
                    per_worker_flags=(("--port-file", str(worker_port)),))
    with running(spec) as m:
        yield m, f"127.0.0.1:{worker_port.read_text().strip()}"


def test_each_service_serving_exits_0(mesh):
    m, worker = mesh
    for target, service in ((m.coordinator, ""), (worker, ""), (m.gateway, "moemesh.v1.Gateway")):
        run = probe(target, "--service", service)
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip().endswith("SERVING") and run.stderr == ""


def test_an_unknown_service_exits_1(mesh):
    m, _ = mesh
    run = probe(m.gateway, "--service", "no.such.Service")
    assert run.returncode == 1
    assert run.stderr.strip() == f"{m.gateway} service 'no.such.Service': unknown service (NOT_FOUND)"


def test_a_closed_port_is_unreachable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    run = probe(f"127.0.0.1:{port}")
    assert run.returncode == 1
    assert run.stderr.startswith(f"127.0.0.1:{port}: unreachable") and len(run.stderr.splitlines()) == 1


def test_a_listener_that_never_answers_times_out():
    with socket.socket() as s:  # accepts connections (the kernel's backlog) and never speaks HTTP/2
        s.bind(("127.0.0.1", 0))
        s.listen()
        run = probe(f"127.0.0.1:{s.getsockname()[1]}", "--timeout", "0.5")
    assert run.returncode == 1
    assert run.stderr.strip().endswith("timeout: no answer within 0.5 s")


def test_a_bad_target_is_a_usage_error():
    run = probe("localhost")
    assert run.returncode == 2 and "probe target must be HOST:PORT" in run.stderr


def test_gateway_without_a_live_worker_is_not_serving(mesh):
    """Last in this module: kills the mesh's only worker."""
    m, worker = mesh
    m.kill("worker0")

    def not_serving() -> subprocess.CompletedProcess:
        run = probe(m.gateway, "--service", "moemesh.v1.Gateway")
        if run.returncode == 0:
            raise MoemeshError("still SERVING")
        return run

    run = retry_sync(not_serving, lambda exc: isinstance(exc, MoemeshError),
                     backoff=Backoff(first_s=0.2, cap_s=1.0, deadline_s=HANG_BOUND_S))
    assert run.returncode == 1
    assert run.stderr.strip() == f"{m.gateway} service 'moemesh.v1.Gateway': NOT_SERVING"
    gone = probe(worker)
    assert gone.returncode == 1 and "unreachable" in gone.stderr
