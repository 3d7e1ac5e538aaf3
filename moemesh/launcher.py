"""`moemesh up`: a whole mesh on this machine (coordinator, N workers, gateway) as local processes.

Each service is the same `moemesh <service>` command a multi-node or compose deployment runs;
`up` only picks free ports (services bind port 0 and publish it in a port file), splits this
machine's cores between workers, prints one `ready` line once the gateway serves, restarts a
worker that crashes (it rejoins the mesh as a new incarnation; the mesh heals around it
meanwhile) and a coordinator that exits (on its port, from its state file in the state folder:
it resumes the running world while workers and gateway serve on), and stops every process it
started on Ctrl-C or SIGTERM (children also exit if `up` itself dies). The
processes are started by the one launcher, moemesh.launch. Everything binds loopback (the gateway:
--host). With `--tls` up writes a CA and per-role certificates (moemesh.certs) into its run folder,
every service runs mTLS, and the ready line says which files a client passes (--tls-cert ...).

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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from coordinator.gating import GATING_RULES
from expert_worker.settings import WorkerSettings
from moemesh.errors import ConfigError, MoemeshError
from moemesh.launch import Mesh, MeshSpec
from moemesh.launch.netns import ClusterPlan
from moemesh.settings import add_options, option, options, parse_bool, settings_from

# The shipped default: a small Mixtral-layout MoE (8 experts top-2) trained on Shakespeare by `make train`
# (moemesh/train; its recipe and metrics in training.json, a held-out excerpt in held-out.txt).
DEFAULT_MODEL = Path(__file__).resolve().parent / "assets" / "shakespeare-moe"


POLICIES = ("auto", "none", "gating", "replicate", "split")
_WORKER = {f.name: opt for f, opt in options(WorkerSettings)}
# worker flags `up` passes on when given
_TO_WORKERS = ("overflow", "capacity_factor", "dtype", "max_batched_tokens")


def _absolute(text: str) -> Path:
    return Path(text).resolve()


def _worker_option(name: str) -> Any:
    """An `up` flag that is the worker's own (flag, help, parser, choices: WorkerSettings), passed to
    every worker when given; unset, each worker keeps its default (or its MOEMESH_WORKER_* variable)."""
    opt = _WORKER[name]
    return option(opt.flag, f"{opt.help}; passed to every worker (unset: the worker's default)", opt.parse,
                  default=None, choices=opt.choices)


@dataclass(frozen=True)
class UpSettings:
    """`moemesh up`: flags > MOEMESH_UP_* variables > defaults (moemesh.settings). `model` and
    `workers` may be unset here; `resolved()` fills them from the disk before the mesh starts."""

    ENV_PREFIX: ClassVar[str] = "MOEMESH_UP_"

    model: Path | None = option("--model", "checkpoint folder (unset: the shipped default, a small MoE trained on "
                                "Shakespeare)",
                                _absolute, default=None)
    workers: int | None = option("--workers", "worker processes (unset: enough for --experts-per-worker, "
                                 "else one per expert)", int, default=None)
    experts_per_worker: int | None = option("--experts-per-worker", "experts each worker holds", int, default=None)
    host: str = option("--host", "gateway bind address", default="127.0.0.1")
    port: int = option("--port", "gateway port (0 = any free port)", int, default=50051)
    http_port: int = option("--http-port", "the gateway's OpenAI-compatible HTTP port (0 = any free port, "
                            "-1 = no HTTP API)", int, default=8000)
    max_seqs: int = option("--max-seqs", "sequences each worker runs at once", int, default=32)
    max_model_len: int = option("--max-model-len", "context length in tokens (workers and gateway)", int,
                                default=2048)
    micro_batches: int = option("--micro-batches", "micro-batches per step on every worker (2 = two-batch overlap)",
                                int, default=1, choices=_WORKER["micro_batches"].choices)
    policy: str = option("--policy", "balancing policy (gating changes outputs; see docs/architecture.md)",
                         default="auto", choices=POLICIES)
    gating_rule: str = option("--gating-rule", "policy gating's update rule (ours, or the paper's literal one; "
                              "docs/balancing.md measures both)", default="ours", choices=GATING_RULES)
    placement: Path | None = option("--placement", "initial placement file (YAML or JSON)", _absolute, default=None)
    expert_shards: int = option("--expert-shards", "split every expert over this many workers (tensor parallelism "
                                "inside an expert)", int, default=1)
    redundant_experts: int = option("--redundant-experts", "extra replicas of every expert on distinct workers, so "
                                    "a lost worker orphans none (passed to the coordinator)", int, default=0)
    max_restarts: int = option("--max-restarts", "times a crashed worker is restarted before up gives up "
                               "(0 = stop everything at the first crash)", int, default=10)
    overflow: str | None = _worker_option("overflow")
    capacity_factor: float | None = _worker_option("capacity_factor")
    dtype: str | None = _worker_option("dtype")
    chunked_prefill: bool = option("--chunked-prefill", "workers prefill long prompts in chunks mixed into decode "
                                   "steps (passed to every worker)", parse_bool, default=False)
    max_batched_tokens: int | None = _worker_option("max_batched_tokens")
    emulate_nodes: int = option("--emulate-nodes", "emulate this many nodes here (root): one network namespace "
                                "each, shaped links between them (moemesh.launch.netns); 0 = no emulation", int,
                                default=0)
    workers_per_node: int = option("--workers-per-node", "workers in each emulated node", int, default=1)
    inter_node_rate: str = option("--inter-node-rate", "rate of each emulated node's link, each direction (tc "
                                  "units: 200mbit, 1gbit)", default="1gbit")
    topology_file: Path | None = option("--topology-file", "where an emulated cluster's planner topology is written "
                                        "(unset: emulated-topology.yaml here)", _absolute, default=None)
    tls: bool = option("--tls", "mTLS between every service and for clients: certificates are written to the run "
                       "folder, the ready line names them", parse_bool, default=False)
    start_timeout_s: float = 180.0  # no flag
    stop_timeout_s: float = 15.0  # no flag

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers <= 0:
            raise ConfigError(f"--workers must be > 0, got {self.workers}")
        if self.experts_per_worker is not None and self.experts_per_worker <= 0:
            raise ConfigError(f"--experts-per-worker must be > 0, got {self.experts_per_worker}")
        if self.max_restarts < 0:
            raise ConfigError(f"--max-restarts must be >= 0, got {self.max_restarts}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in 0..65535, got {self.port}")
        if not -1 <= self.http_port <= 65535:
            raise ConfigError(f"--http-port must be in 0..65535, or -1 for no HTTP API, got {self.http_port}")
        if self.redundant_experts < 0:
            raise ConfigError(f"--redundant-experts must not be negative, got {self.redundant_experts}")
        if self.emulate_nodes < 0 or self.workers_per_node < 1:
            raise ConfigError(f"--emulate-nodes must be >= 0 and --workers-per-node >= 1, got {self.emulate_nodes}, "
                              f"{self.workers_per_node}")
        slots = self.emulate_nodes * self.workers_per_node
        if self.emulate_nodes and self.workers is not None and self.workers != slots:
            raise ConfigError(f"--workers {self.workers} but --emulate-nodes {self.emulate_nodes} x --workers-per-node "
                              f"{self.workers_per_node} = {slots}")
        if self.emulate_nodes and self.tls:
            raise ConfigError("--tls with --emulate-nodes: certificates name loopback only, not the nodes' addresses")


def default_model_dir() -> Path:
    """The shipped default model's folder (inside the installed package)."""
    if not (DEFAULT_MODEL / "config.json").is_file():
        raise ConfigError(f"the default model is missing from this installation ({DEFAULT_MODEL}); "
                          f"give --model DIR, or write it with `make train OUT={DEFAULT_MODEL}`")
    return DEFAULT_MODEL


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


def resolved(s: UpSettings) -> UpSettings:
    """`s` with the defaults that need the disk filled in: the model (the shipped default) and the
    worker count (from the model's experts)."""
    from moemesh.model.config import load_config

    model = s.model or default_model_dir()
    if s.emulate_nodes:
        return replace(s, model=model, workers=s.emulate_nodes * s.workers_per_node)
    workers = resolve_workers(load_config(model).num_experts, s.workers, s.experts_per_worker, s.expert_shards)
    return replace(s, model=model, workers=workers)


def mesh_spec(s: UpSettings, state_dir: Path, cpus: int) -> MeshSpec:
    """The mesh `up` starts (`s` resolved): one gateway on the requested address, this machine's
    `cpus` split between the workers; children log to stderr."""
    assert s.model is not None and s.workers is not None, "mesh_spec needs resolved() settings"
    common = ("--max-model-len", str(s.max_model_len))
    to_workers = tuple(arg for name in _TO_WORKERS if getattr(s, name) is not None
                       for arg in (_WORKER[name].flag, str(getattr(s, name))))
    to_workers += ("--chunked-prefill",) if s.chunked_prefill else ()
    return MeshSpec(
        model=s.model, workers=s.workers, state_dir=state_dir, gateway_host=s.host, gateway_port=s.port,
        gateway_http_port=s.http_port,
        coordinator_flags=("--policy", s.policy, "--gating-rule", s.gating_rule,
                           "--expert-shards", str(s.expert_shards), "--redundant-experts", str(s.redundant_experts),
                           "--state-file", str(state_dir / "coordinator.state"),
                           *(("--placement", str(s.placement)) if s.placement else ())),
        worker_flags=("--threads", str(max(1, cpus // s.workers)), "--max-seqs", str(s.max_seqs),
                      "--micro-batches", str(s.micro_batches), *common, *to_workers),
        gateway_flags=common, start_timeout_s=s.start_timeout_s, stop_timeout_s=s.stop_timeout_s,
        certs=state_dir / "certs" if s.tls else None,
    )


def on_nodes(spec: MeshSpec, cluster: ClusterPlan) -> MeshSpec:
    """`spec` on an emulated cluster: the coordinator on the bridge's address, worker i inside
    node i // W's namespace, bound to and advertising its address, `--node` its node's name."""
    assert spec.workers == cluster.workers, "one worker per slot of the cluster"
    nodes = [cluster.node_of_worker(i) for i in range(spec.workers)]
    own = [spec.per_worker_flags[i] if i < len(spec.per_worker_flags) else () for i in range(spec.workers)]
    return replace(spec, coordinator_host=cluster.bridge_address, worker_hosts=tuple(n.address for n in nodes),
                   worker_prefix=tuple(cluster.worker_prefix(i) for i in range(spec.workers)),
                   per_worker_flags=tuple(("--node", n.name, *flags) for n, flags in zip(nodes, own)))


def run_up(s: UpSettings, state_dir: Path) -> int:
    """Start the mesh (`s` resolved), print the ready line, watch it until Ctrl-C / SIGTERM, stop it.
    With --emulate-nodes, inside an emulated cluster made first and torn down last."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    spec = mesh_spec(s, state_dir, os.cpu_count() or 1)
    if not s.emulate_nodes:
        return _serve(s, spec, stop)
    from moemesh.launch.netns import emulated_cluster, topology_yaml

    with emulated_cluster(s.emulate_nodes, s.workers_per_node, s.inter_node_rate) as cluster:
        topology = s.topology_file or Path("emulated-topology.yaml").resolve()
        topology.write_text(topology_yaml(cluster.topology()))
        note = (f"; emulated cluster {cluster.run_id}: {len(cluster.nodes)} nodes x {cluster.workers_per_node} "
                f"workers at {cluster.rate_bits / 1e6:g} Mbit/s per node link, each way; topology file {topology}")
        return _serve(s, on_nodes(spec, cluster), stop, note)


def _serve(s: UpSettings, spec: MeshSpec, stop: threading.Event, note: str = "") -> int:
    if spec.certs is not None:
        from moemesh.certs import write_certs

        write_certs(spec.certs)
    mesh = Mesh(spec)
    try:
        mesh.start(progress=lambda line: print(line, file=sys.stderr, flush=True))
        http = f"; OpenAI API at http://{mesh.http}/v1" if mesh.http_gateways else ""
        print(f"moemesh ready: gateway at {mesh.gateway}; coordinator at {mesh.coordinator}; {s.workers} workers; "
              f"model {s.model}{http}{_tls_note(spec.certs)}{note}", flush=True)
        print("moemesh metrics: " + ", ".join(f"{name} http://{address}/metrics"
                                               for name, address in mesh.metrics().items())
              + f"; watch them with `moemesh top --coordinator {mesh.coordinator}`", flush=True)
        while not stop.wait(0.5):
            mesh.supervise(s.max_restarts)
        return 0
    finally:
        mesh.stop()


def _tls_note(certs: Path | None) -> str:
    """The ready line's mTLS part: the folder and the flags clients (and `placement set`, admin) pass."""
    if certs is None:
        return ""
    from moemesh.certs import role_files

    return (f"; mTLS certificates in {certs} (clients: {' '.join(role_files(certs, 'client').flags())}; "
            f"placement set: {' '.join(role_files(certs, 'admin').flags())})")


def add_up_command(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    """Register `up`; its runner builds UpSettings once (flags > MOEMESH_UP_* > defaults)."""
    p = sub.add_parser("up", help="start a whole mesh here: coordinator, workers, gateway")
    add_options(p, UpSettings)

    def run(args: argparse.Namespace) -> int:
        given = settings_from(UpSettings, args, os.environ)
        if given.emulate_nodes:  # before anything is written: a clear error when not root
            from moemesh.launch.netns import unavailable_reason

            reason = unavailable_reason()
            if reason is not None:
                raise ConfigError(f"cannot emulate nodes: {reason}")
        settings = resolved(given)
        with tempfile.TemporaryDirectory(prefix="moemesh-up-") as state:
            return run_up(settings, Path(state))

    return run


READY = re.compile(r"gateway at (\S+); coordinator at (\S+);")
READY_HTTP = re.compile(r"; OpenAI API at http://(\S+)/v1")
READY_CERTS = re.compile(r"mTLS certificates in (\S+) ")
READY_CLUSTER = re.compile(r"; emulated cluster ([0-9a-f]{8}):")


class UpProcess:
    """`moemesh up --port 0 --http-port 0` as a subprocess, returned once its ready line is read.

    `stop()` sends SIGINT (Ctrl-C), waits, and returns the processes of the mesh that outlived it
    (killed then; should be none). `up`'s stderr (its children's logs too) goes to this process's
    stderr, or with `quiet` to a temporary file whose tail is quoted if up does not become ready."""

    def __init__(self, model: Path, workers: int, extra: Sequence[str] = (), *, max_model_len: int = 256,
                 quiet: bool = False):
        cmd = [sys.executable, "-m", "moemesh.cli", "up", "--model", str(model), "--workers", str(workers),
               "--port", "0", "--http-port", "0", "--max-model-len", str(max_model_len), *extra]
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
        http = READY_HTTP.search(line)
        self.http = http.group(1) if http else ""  # HOST:PORT of the OpenAI-compatible API ("" = none)
        certs = READY_CERTS.search(line)
        self.certs = Path(certs.group(1)) if certs else None  # `up --tls`: the certificates' folder
        cluster = READY_CLUSTER.search(line)
        self.cluster_run_id = cluster.group(1) if cluster else ""  # `up --emulate-nodes`: moemesh.launch.netns
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
