"""`moemesh top` against a real mesh (coordinator, 2 gloo workers, gateway: processes), in a real
terminal: tmux runs it on a private server, `capture-pane` reads the screen, `q` quits it."""

from __future__ import annotations

import asyncio
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moemesh.client import Client
from moemesh.engine.sampling import SamplingParams
from moemesh.rpc import channel
from moemesh.v1 import coordinator_pb2, coordinator_pb2_grpc
from tests.gateway.mesh import running_mesh

pytestmark = pytest.mark.slow  # starts a mesh of real processes and a terminal

REPO = Path(__file__).resolve().parents[2]
SCREEN_BOUND_S = 120.0  # hang bound: top imports, reads and draws well within it
TMUX_CALL_S = 10.0


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory):
    with running_mesh(tmp_path_factory.mktemp("top")) as m:
        asyncio.run(_load(m.gateway))
        yield m


async def _load(gateway: str) -> None:
    async with Client(gateway, timeout=60) as client:
        params = SamplingParams(max_new_tokens=8, ignore_eos=True)
        await asyncio.gather(*(client.generate_text(token_ids=[3, 4, 5 + i], params=params) for i in range(4)))


def _members(coordinator: str) -> list:
    async def world():
        async with channel(coordinator) as ch:
            return await coordinator_pb2_grpc.CoordinatorStub(ch).WaitForWorld(
                coordinator_pb2.WaitForWorldRequest(), timeout=5)

    return list(asyncio.run(world()).members)


def _top_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "moemesh.cli", "top", *args]


def _tmux(socket_name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["tmux", "-L", socket_name, *args], capture_output=True, text=True, timeout=TMUX_CALL_S,
                          check=False)


def test_top_in_a_terminal_shows_every_worker_and_the_generation_then_q_quits(mesh):
    members = _members(mesh.coordinator)
    socket_name, session = f"moemesh-top-{os.getpid()}", "top"
    command = " ".join(shlex.quote(a) for a in ["env", f"PYTHONPATH={REPO}", *_top_command(
        "--coordinator", mesh.coordinator, "--refresh", "0.5")])
    try:
        started = _tmux(socket_name, "new-session", "-d", "-s", session, "-x", "160", "-y", "50", command)
        assert started.returncode == 0, started.stderr
        deadline = time.monotonic() + SCREEN_BOUND_S  # hang bound
        screen = ""
        while time.monotonic() < deadline:
            screen = _tmux(socket_name, "capture-pane", "-p", "-t", session).stdout
            if "world generation 1" in screen and "from   1" in screen:
                break
            time.sleep(0.2)
        assert "world generation 1" in screen, screen
        for m in members:
            assert m.address in screen and m.metrics_address in screen, screen
        assert "layer   0" in screen and "layer   1" in screen, screen  # the tiny model's two MoE layers
        assert "from   0" in screen and "from   1" in screen, screen
        _tmux(socket_name, "send-keys", "-t", session, "q")
        deadline = time.monotonic() + SCREEN_BOUND_S  # hang bound
        while _tmux(socket_name, "has-session", "-t", session).returncode == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _tmux(socket_name, "has-session", "-t", session).returncode != 0, "q did not quit top"
    finally:
        _tmux(socket_name, "kill-server")


def test_once_prints_a_screen_and_an_unreachable_coordinator_is_a_clean_error(mesh):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    once = subprocess.run(_top_command("--coordinator", mesh.coordinator, "--once", "--refresh", "0.2"),
                          capture_output=True, text=True, timeout=SCREEN_BOUND_S, env=env, check=False)
    assert once.returncode == 0, once.stderr
    assert "world generation 1" in once.stdout and all(m.address in once.stdout for m in _members(mesh.coordinator))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nobody = f"127.0.0.1:{s.getsockname()[1]}"  # bound, never listening: connections are refused
        gone = subprocess.run(_top_command("--coordinator", nobody, "--timeout", "2"), capture_output=True,
                              text=True, timeout=SCREEN_BOUND_S, env=env, check=False)
    assert gone.returncode == 1
    assert gone.stderr.strip().startswith(f"moemesh top: cannot reach the coordinator at {nobody}"), gone.stderr
    assert "Traceback" not in gone.stderr
