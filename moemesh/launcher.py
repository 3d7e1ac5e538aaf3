"""`moemesh up`: a whole mesh on this machine (coordinator, N workers, gateway) as local processes.

Each service is the same `moemesh <service>` command a multi-node or compose deployment runs;
`up` only picks free ports (services bind port 0 and publish it in a port file), splits this
machine's cores between workers, prints one `ready` line once the gateway serves, and stops
every process it started on Ctrl-C or SIGTERM (children also exit if `up` itself dies). The
processes are started by the one launcher, moemesh.launch.

`UpProcess` runs `moemesh up` itself as a subprocess and reads its ready line: what tests of `up`
and the measurements that drive a mesh from outside (moemesh.simulate.cpu_check, benchmarks) use.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moemesh.errors import MoemeshError
from moemesh.launch import Mesh, MeshSpec

DEFAULT_MODEL_SPEC: dict[str, Any] = dict(arch="mixtral", layers=4, experts=8, top_k=2, hidden=256, intermediate=512,
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


def mesh_spec(s: UpSettings) -> MeshSpec:
    """The mesh `up` starts: one gateway on the requested address; children log to stderr."""
    common = ("--max-model-len", str(s.max_model_len))
    return MeshSpec(
        model=s.model, workers=s.workers, state_dir=s.state_dir, gateway_host=s.host, gateway_port=s.port,
        coordinator_flags=("--policy", s.policy, "--expert-shards", str(s.expert_shards),
                           *(("--placement", str(s.placement)) if s.placement else ())),
        worker_flags=("--threads", str(s.threads_per_worker), "--max-seqs", str(s.max_seqs),
                      "--micro-batches", str(s.micro_batches), *common),
        gateway_flags=common, start_timeout_s=s.start_timeout_s, stop_timeout_s=s.stop_timeout_s,
    )


def run_up(s: UpSettings) -> int:
    """Start the mesh, print the ready line, watch it until Ctrl-C / SIGTERM, stop it."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    mesh = Mesh(mesh_spec(s))
    try:
        mesh.start()
        print(f"moemesh ready: gateway at {mesh.gateway}; coordinator at {mesh.coordinator}; {s.workers} workers; "
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


READY = re.compile(r"gateway at (\S+); coordinator at (\S+);")


class UpProcess:
    """`moemesh up --port 0` as a subprocess, returned once its ready line is read.

    `stop()` sends SIGINT (Ctrl-C), waits, and returns the processes of the mesh that outlived it
    (killed then; should be none). `up`'s stderr (its children's logs too) goes to this process's
    stderr, or with `quiet` to a temporary file whose tail is quoted if up does not become ready."""

    def __init__(self, model: Path, workers: int, extra: Sequence[str] = (), *, max_model_len: int = 256,
                 quiet: bool = False):
        cmd = [sys.executable, "-m", "moemesh.cli", "up", "--model", str(model), "--workers", str(workers),
               "--port", "0", "--max-model-len", str(max_model_len), *extra]
        with tempfile.TemporaryFile("w+") if quiet else contextlib.nullcontext() as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, stderr=err, text=True)
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline()  # blocks until ready (or up dies)
            match = READY.search(line)
            if not match:
                self.proc.kill()
                self.proc.wait()
                tail = "".join(_tail(err, 15)) if err is not None else ""
                raise MoemeshError(f"moemesh up with {workers} workers did not become ready: {line!r}\n{tail}")
        self.gateway, self.coordinator = match.group(1), match.group(2)
        self.workers = workers

    def processes(self) -> list:
        """`up` and every process under it (psutil.Process)."""
        import psutil

        up = psutil.Process(self.proc.pid)
        return [up, *up.children(recursive=True)]

    def stop(self, timeout_s: float = 30.0) -> list:
        """SIGINT, wait up to `timeout_s`; returns the processes that survived (then killed)."""
        import psutil

        if self.proc.poll() is not None:
            return []
        procs = self.processes()
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        _, alive = psutil.wait_procs(procs, timeout=5)
        for p in alive:
            p.kill()
        return alive


def _tail(file, lines: int) -> list[str]:
    file.seek(0)
    return file.readlines()[-lines:]
