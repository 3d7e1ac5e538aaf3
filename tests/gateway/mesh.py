"""A real mesh for end-to-end tests: coordinator, N expert workers and a gateway as subprocesses.

Nothing is mocked: each process is started with its own CLI, binds port 0 and publishes its port
through a port file; `running_mesh` yields once the gateway reports SERVING and always stops every
process it started (gateway first, then workers, then the coordinator).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moemesh.model.tiny import TinySpec, write_tiny_model

REPO = Path(__file__).resolve().parents[2]
TINY = TinySpec(hidden=64, intermediate=64, layers=2, experts=8, heads=4, kv_heads=2, vocab=512)
START_TIMEOUT_S = 120.0


@dataclass
class Mesh:
    """Addresses of a running mesh and the processes behind it."""

    model_dir: Path
    logs: Path
    coordinator: str = ""
    gateway: str = ""
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, args: Sequence[str]) -> subprocess.Popen:
        """Start `python -m ARGS`, its output in logs/NAME.log."""
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        out = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 (the process owns it)
        proc = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        self.procs[name] = proc
        return proc

    def wait_port(self, name: str, port_file: Path, timeout_s: float = START_TIMEOUT_S) -> int:
        """The port `name` wrote to `port_file`; RuntimeError with its log if it died or timed out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if port_file.exists() and port_file.read_text().strip():
                return int(port_file.read_text())
            self.check_alive()
            time.sleep(0.05)
        raise RuntimeError(f"{name} wrote no port within {timeout_s:.0f} s\n{self.log_tail()}")

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}\n{self.log_tail()}")

    def wait_serving(self, target: str, timeout_s: float = START_TIMEOUT_S) -> None:
        """Poll the standard health service of `target` until "" is SERVING."""
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                with contextlib.suppress(grpc.RpcError):
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                self.check_alive()
                time.sleep(0.1)
        raise RuntimeError(f"{target} not SERVING within {timeout_s:.0f} s\n{self.log_tail()}")

    def add_gateway(self, name: str, flags: Sequence[str] = ()) -> str:
        """Start a gateway process `name` in front of this mesh; its address (not yet SERVING)."""
        port_file = self.logs.parent / f"{name}.port"
        port_file.unlink(missing_ok=True)
        self.start(name, ["gateway.cli", "gateway", "--coordinator", self.coordinator, "--model",
                          str(self.model_dir), "--port", "0", "--port-file", str(port_file),
                          "--exit-with-parent", *flags])
        return f"127.0.0.1:{self.wait_port(name, port_file)}"

    def kill(self, name: str) -> None:
        """SIGKILL one process (a crash, not a graceful stop)."""
        proc = self.procs[name]
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    def terminate(self, name: str, timeout_s: float = 15.0) -> int:
        """SIGTERM one process and wait for it (SIGKILL after `timeout_s`); its exit status."""
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        return proc.returncode

    def stop(self) -> None:
        """SIGTERM every process (gateway, workers, coordinator), SIGKILL what does not exit."""
        order = sorted(self.procs, key=lambda n: (not n.startswith("gateway"), n == "coordinator", n))
        for name in order:
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name in order:
            proc = self.procs[name]
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def log_tail(self, lines: int = 30) -> str:
        parts = []
        for path in sorted(self.logs.glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name} ---\n" + "\n".join(text))
        return "\n".join(parts)


@contextlib.contextmanager
def running_mesh(
    tmp: Path, *, workers: int = 2, gateway_flags: Sequence[str] = (), worker_flags: Sequence[str] = (),
    spec: TinySpec = TINY,
) -> Iterator[Mesh]:
    """Start coordinator, gateway and `workers` workers; yield when the gateway is SERVING."""
    tmp.mkdir(parents=True, exist_ok=True)
    model_dir = tmp / "model"
    if not (model_dir / "config.json").exists():
        write_tiny_model(model_dir, spec)
    logs = tmp / "logs"
    logs.mkdir(exist_ok=True)
    mesh = Mesh(model_dir=model_dir, logs=logs)
    try:
        port = _start_coordinator(mesh, tmp, workers)
        mesh.coordinator = f"127.0.0.1:{port}"
        # The gateway starts before any worker: it must wait for the world by itself.
        mesh.gateway = mesh.add_gateway("gateway", gateway_flags)
        for i in range(workers):
            mesh.start(f"worker{i}", ["moemesh.cli", "worker", "--coordinator", mesh.coordinator, "--port", "0",
                                      "--worker-id", f"w{i}", "--threads", "1", "--max-seqs", "8",
                                      "--exit-with-parent", *worker_flags])
        mesh.wait_serving(mesh.gateway)
        yield mesh
    finally:
        mesh.stop()


def _start_coordinator(mesh: Mesh, tmp: Path, workers: int) -> int:
    port_file = tmp / "coordinator.port"
    port_file.unlink(missing_ok=True)
    mesh.start("coordinator", ["coordinator.cli", "coordinator", "--model", str(mesh.model_dir),
                               "--workers", str(workers), "--port", "0", "--port-file", str(port_file),
                               "--exit-with-parent"])
    return mesh.wait_port("coordinator", port_file)

