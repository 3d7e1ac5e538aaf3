"""`moemesh up`: a whole mesh on this machine (coordinator, N workers, gateway) as local processes.

Each service is the same `moemesh <service>` command a multi-node or compose deployment runs;
`up` only picks free ports (services bind port 0 and publish it in a port file), splits this
machine's cores between workers, prints one `ready` line once the gateway serves, and stops
every process it started on Ctrl-C or SIGTERM (children also exit if `up` itself dies).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moemesh.errors import MoemeshError

DEFAULT_MODEL_SPEC = dict(arch="mixtral", layers=4, experts=8, top_k=2, hidden=256, intermediate=512,
                          heads=8, kv_heads=4, vocab=512, seed=0)


@dataclass(frozen=True)
class UpSettings:
    model: Path
    workers: int
    host: str
    port: int
    max_seqs: int
    max_model_len: int
    threads_per_worker: int
    state_dir: Path
    micro_batches: int = 1
    policy: str = "auto"
    placement: Path | None = None
    expert_shards: int = 1  # split every expert over this many workers (expert tensor parallelism)
    start_timeout_s: float = 180.0
    stop_timeout_s: float = 15.0


def default_model_dir(cache: Path) -> Path:
    """The embedded default: a tiny random Mixtral-layout checkpoint, written once."""
    from moemesh.model.tiny import TinySpec, write_tiny_model

    out = cache / "tiny-mixtral-8x"
    if not (out / "config.json").is_file():
        print(f"moemesh up: writing the default tiny model to {out}", file=sys.stderr)
        write_tiny_model(out, TinySpec(**DEFAULT_MODEL_SPEC))
    return out


def resolve_workers(num_experts: int, workers: int | None, experts_per_worker: int | None, shards: int = 1) -> int:
    """--workers wins; else enough workers for K experts (or shards of experts) each; else one
    per worker."""
    if workers is not None:
        if workers <= 0:
            raise MoemeshError(f"--workers must be > 0, got {workers}")
        return workers
    k = experts_per_worker or 1
    if k <= 0:
        raise MoemeshError(f"--experts-per-worker must be > 0, got {k}")
    return math.ceil(num_experts * max(shards, 1) / k)


class Mesh:
    """The child processes of one `up`; `stop()` is idempotent and always reaps all of them."""

    def __init__(self, settings: UpSettings):
        self.s = settings
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def spawn(self, name: str, args: list[str]) -> None:
        cmd = [sys.executable, "-m", "moemesh.cli", *args, "--exit-with-parent"]
        # Children log to stderr; stdout carries only `up`'s own ready line (scripts parse it).
        self.procs.append((name, subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=sys.stderr)))

    def wait_port(self, name: str, path: Path) -> int:
        deadline = time.monotonic() + self.s.start_timeout_s
        while time.monotonic() < deadline:
            if path.is_file() and path.read_text().strip():
                return int(path.read_text())
            self.check_alive()
            time.sleep(0.05)
        raise MoemeshError(f"{name} did not start within {self.s.start_timeout_s:.0f} s")

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise MoemeshError(f"{name} exited with code {proc.returncode}")

    def stop(self) -> None:
        for _, proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.s.stop_timeout_s
        for name, proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"moemesh up: {name} did not stop in time; killing it", file=sys.stderr)
                proc.kill()
                proc.wait()


def start(mesh: Mesh) -> tuple[str, str]:
    """Start every service; returns (gateway, coordinator) addresses once the gateway serves."""
    s = mesh.s
    common = ["--max-model-len", str(s.max_model_len)]
    mesh.spawn("coordinator", ["coordinator", "--model", str(s.model), "--workers", str(s.workers),
                               "--host", "127.0.0.1", "--port", "0", "--port-file", str(s.state_dir / "coordinator.port"),
                               "--policy", s.policy, "--expert-shards", str(s.expert_shards),
                               *(["--placement", str(s.placement)] if s.placement else [])])
    coordinator = f"127.0.0.1:{mesh.wait_port('coordinator', s.state_dir / 'coordinator.port')}"
    for i in range(s.workers):
        mesh.spawn(f"worker {i}", ["worker", "--coordinator", coordinator, "--port", "0",
                                   "--worker-id", f"worker-{i}", "--threads", str(s.threads_per_worker),
                                   "--max-seqs", str(s.max_seqs), "--micro-batches", str(s.micro_batches), *common])
    gateway_port_file = s.state_dir / "gateway.port"
    mesh.spawn("gateway", ["gateway", "--coordinator", coordinator, "--model", str(s.model), "--host", s.host,
                           "--port", str(s.port), "--port-file", str(gateway_port_file), *common])
    port = mesh.wait_port("gateway", gateway_port_file)
    address = f"{s.host}:{port}"
    _wait_serving(mesh, address)
    return address, coordinator


def _wait_serving(mesh: Mesh, address: str) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + mesh.s.start_timeout_s
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            mesh.check_alive()
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service="moemesh.v1.Gateway"), timeout=2.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise MoemeshError(f"the gateway at {address} did not become ready within {mesh.s.start_timeout_s:.0f} s")


def run_up(s: UpSettings) -> int:
    mesh = Mesh(s)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        address, coordinator = start(mesh)
        print(f"moemesh ready: gateway at {address}; coordinator at {coordinator}; {s.workers} workers; "
              f"model {s.model}", flush=True)
        while not stop.wait(0.5):
            mesh.check_alive()
        return 0
    finally:
        mesh.stop()


def add_up_command(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    p = sub.add_parser("up", help="start a whole mesh here: coordinator, workers, gateway")
    p.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the tiny default model)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: one per expert)")
    p.add_argument("--experts-per-worker", type=int, default=None, help="experts each worker holds")
    p.add_argument("--host", default="127.0.0.1", help="gateway bind address")
    p.add_argument("--port", type=int, default=50051, help="gateway port (0 = any free port)")
    p.add_argument("--max-seqs", type=int, default=32, help="sequences each worker runs at once")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--micro-batches", type=int, default=1, choices=(1, 2, 3, 4),
                   help="micro-batches per step on every worker (2 = two-batch overlap)")
    p.add_argument("--policy", default="auto", choices=("auto", "none", "gating", "replicate", "split"),
                   help="balancing policy (gating changes outputs; see docs/architecture.md)")
    p.add_argument("--placement", type=Path, default=None, help="initial placement file (YAML or JSON)")
    p.add_argument("--expert-shards", type=int, default=1,
                   help="split every expert over this many workers (tensor parallelism inside an expert)")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "moemesh")

    def run(args: argparse.Namespace) -> int:
        from moemesh.model.config import load_config

        model = args.model or default_model_dir(args.cache_dir)
        cfg = load_config(model)
        workers = resolve_workers(cfg.num_experts, args.workers, args.experts_per_worker, args.expert_shards)
        with tempfile.TemporaryDirectory(prefix="moemesh-up-") as state:
            settings = UpSettings(
                model=model.resolve(), workers=workers, host=args.host, port=args.port, max_seqs=args.max_seqs,
                max_model_len=args.max_model_len, threads_per_worker=max(1, (os.cpu_count() or 1) // workers),
                state_dir=Path(state), micro_batches=args.micro_batches, policy=args.policy,
                placement=args.placement.resolve() if args.placement else None, expert_shards=args.expert_shards,
            )
            return run_up(settings)

    return run
