"""moemesh.launch: named child processes (real `moemesh` services) started, watched and stopped.
Whole meshes run in tests/moemesh/test_launcher.py (`moemesh up`) and tests/gateway (running_mesh)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from moemesh.chaos import make_requests, reference, run_load
from moemesh.errors import MoemeshError
from moemesh.launch import Mesh, MeshSpec, Processes, running
from moemesh.launch.processes import STOP_ORDER, _stage
from moemesh.launch.progress import WORDS
from moemesh.model.tiny import TinySpec, write_tiny_model
from moemesh.rpc import channel
from moemesh.v1 import coordinator_pb2, coordinator_pb2_grpc

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
        proc = procs.procs["coordinator"]
        assert procs.terminate("coordinator") == 0 and proc.poll() == 0
        procs.check_alive()  # an exit asked for is no crash: the child is forgotten
        assert "coordinator" not in procs.children and procs.exited() == []
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
        procs.start("gateway", ["gateway", "--coordinator", "127.0.0.1:1", "--model", str(model), "--port", "0",
                                "--http-port", "-1"])
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


# ---- a coordinator killed under load ---------------------------------------------------------------
RESTART_SPEC = TinySpec(layers=2, experts=4, hidden=32, intermediate=32, heads=4, kv_heads=2, vocab=300)
HANG_S = 120.0  # bounds a hang only: one request's deadline, the wait for the restarted coordinator
OUTAGE_S = 3.0  # the load runs on this long with no coordinator at all


async def _world(coordinator: str, after: int = 0) -> coordinator_pb2.World:
    """The coordinator's newest world after generation `after`, asking again while it is down."""
    deadline = time.monotonic() + HANG_S
    async with channel(coordinator) as ch:
        stub = coordinator_pb2_grpc.CoordinatorStub(ch)
        while True:
            try:
                return await stub.WaitForWorld(coordinator_pb2.WaitForWorldRequest(after_generation=after), timeout=5)
            except grpc.aio.AioRpcError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)


@pytest.mark.slow  # a 2-worker mesh under load, its coordinator killed and restarted
def test_a_killed_coordinator_is_restarted_from_its_state_and_no_request_fails(tmp_path):
    """SIGKILL the coordinator of a 2-worker mesh while requests stream: workers and gateway serve
    on without it, `supervise` restarts it on its port from its state file, it resumes the same
    world (no new generation), every request ends with the reference tokens; afterwards the mesh
    still heals (a killed worker: a newer generation forms from the survivor)."""
    model = write_tiny_model(tmp_path / "model", RESTART_SPEC)
    requests = make_requests(8, RESTART_SPEC.vocab, max_new_tokens=16, seed=2)
    expected = reference(model, requests, max_model_len=256)
    spec = MeshSpec(model=model, workers=2, state_dir=tmp_path / "state", log_dir=tmp_path / "logs",
                    coordinator_flags=("--state-file", str(tmp_path / "state" / "coordinator.state")),
                    worker_flags=("--threads", "1", "--max-model-len", "256"), gateway_flags=("--max-model-len", "256"))

    async def scenario(mesh: Mesh):
        before = await _world(mesh.coordinator)
        first_done = asyncio.Event()
        restarted = asyncio.Event()
        rounds = []

        async def load() -> None:  # rounds of the same requests until one ran wholly after the restart
            while True:
                was_restarted = restarted.is_set()
                outcomes, _ = await run_load(mesh.gateway, requests, concurrency=4, timeout_s=HANG_S,
                                             on_done=lambda _: first_done.set())
                rounds.append(outcomes)
                if was_restarted:
                    return

        loading = asyncio.create_task(load())
        await first_done.wait()
        mesh.kill("coordinator")
        await asyncio.sleep(OUTAGE_S)  # the scenario: requests keep streaming with no coordinator
        assert mesh.processes.exited("worker") == [] and not loading.done()
        assert mesh.supervise(max_restarts=1) == ["coordinator"]
        resumed = await _world(mesh.coordinator)
        restarted.set()
        await loading
        assert mesh.processes.exited() == []
        mesh.kill("worker1")
        healed = await _world(mesh.coordinator, after=resumed.generation)
        return before, resumed, healed, rounds

    said: list[str] = []
    with running(spec, progress=said.append) as mesh:
        # start-up progress, per worker, read from its metrics: every stage it was seen in, in order
        for worker in ("worker0", "worker1"):
            stages = [line.split(f"{worker} ", 1)[1] for line in said if f" {worker} " in line]
            assert stages[-1].startswith("serving (") and "MB read)" in stages[-1], said
            assert stages == [s for s in stages if s.split(" (")[0] in WORDS.values()], said
        before, resumed, healed, rounds = asyncio.run(scenario(mesh))
        argv = mesh.processes.children["coordinator"].argv
    assert argv[argv.index("--port") + 1] == mesh.coordinator.rsplit(":", 1)[1]  # restarted on its port
    assert resumed == before  # same generation, members, rendezvous and first epoch
    assert len(rounds) >= 2
    for outcomes in rounds:
        assert [o.error for o in outcomes] == [""] * len(requests)
        assert [o.tokens for o in outcomes] == expected
    assert healed.generation > before.generation and [m.worker_id for m in healed.members] == ["worker-0"]
