"""A whole mesh on this machine: one coordinator, N workers and one or more gateways, as processes.

`moemesh up`, the end-to-end tests and the benchmarks all start meshes through `Mesh`:

    with running(MeshSpec(model=DIR, workers=2, state_dir=tmp, log_dir=tmp / "logs")) as mesh:
        ...  # mesh.gateway / mesh.coordinator are HOST:PORT; mesh.kill("worker1") crashes one

Every service binds port 0 and publishes its port in `state_dir/NAME.port` (a gateway's HTTP API's
in `NAME.http.port`; `mesh.http` is the first gateway's HTTP address); `start()` returns once
every gateway reports SERVING (a gateway started before the workers waits for the world itself).
Processes are named "coordinator", "worker0".."workerN-1", "gateway" (then "gateway1", ...).
Every process binds loopback (gateways: `gateway_host`), unless the spec places the coordinator and
the workers elsewhere (`coordinator_host`, `worker_hosts`, `worker_prefix`: emulated nodes,
moemesh.launch.netns). With `certs` (a folder `moemesh certs`
wrote) every process runs mTLS with its role's certificate and the launcher itself checks health
with the admin one (`Mesh.tls(role)` gives any role's files to a caller).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moemesh.certs import role_files
from moemesh.errors import MoemeshError, UnavailableError
from moemesh.launch.processes import Processes
from moemesh.launch.progress import StartupWatch
from moemesh.retry import Backoff, retry_sync
from moemesh.tls import TlsFiles

GATEWAY_SERVICE = "moemesh.v1.Gateway"
STATE_FLAG = "--state-file"  # a coordinator started with it can be restarted (coordinator/durable.py)
HEALTH_CALL_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class MeshSpec:
    """What to start. Flags are passed to every process of that kind; `per_worker_flags[i]` only
    to worker i."""

    model: Path
    workers: int
    state_dir: Path  # port files
    log_dir: Path | None = None  # one NAME.log per process; None = the launcher's stderr
    gateways: int = 1
    gateway_first: bool = False  # start the gateways before any worker (they must wait for the world)
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 0  # the first gateway's port (0 = any free port); others always take a free one
    gateway_http_port: int = 0  # the first gateway's HTTP API port (0 = any free port, -1 = no HTTP API)
    coordinator_flags: tuple[str, ...] = ()
    worker_flags: tuple[str, ...] = ()
    per_worker_flags: tuple[tuple[str, ...], ...] = ()
    # Emulated nodes (moemesh.launch.netns): where the coordinator binds (every worker must reach it),
    # worker i's bind and advertised address and what runs its command (`ip netns exec NS`).
    coordinator_host: str = "127.0.0.1"
    worker_hosts: tuple[str, ...] = ()  # empty: every worker on 127.0.0.1
    worker_prefix: tuple[tuple[str, ...], ...] = ()
    gateway_flags: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)  # added to every child's environment
    certs: Path | None = None  # mTLS: a folder written by `moemesh certs` (moemesh.certs); None = plaintext
    start_timeout_s: float = 180.0
    stop_timeout_s: float = 15.0

    def __post_init__(self) -> None:
        if self.workers < 1 or self.gateways < 0:
            raise MoemeshError(f"a mesh needs >= 1 worker and >= 0 gateways, got {self.workers}, {self.gateways}")
        for what in ("per_worker_flags", "worker_hosts", "worker_prefix"):
            if len(getattr(self, what)) > self.workers:
                raise MoemeshError(f"{what} names {len(getattr(self, what))} workers; the mesh has {self.workers}")

    def worker_host(self, i: int) -> str:
        return self.worker_hosts[i] if i < len(self.worker_hosts) else "127.0.0.1"


class Mesh:
    """The processes of one mesh and their addresses; `stop()` is idempotent and reaps them all."""

    def __init__(self, spec: MeshSpec):
        self.spec = spec
        self.processes = Processes(spec.log_dir, spec.env)
        self.coordinator = ""
        self.gateways: dict[str, str] = {}  # name -> HOST:PORT
        self.http_gateways: dict[str, str] = {}  # name -> HOST:PORT of its HTTP API (gateways that serve one)

    @property
    def model_dir(self) -> Path:
        return self.spec.model

    def tls(self, role: str = "admin") -> TlsFiles | None:
        """`role`'s certificate, key and CA when the mesh runs mTLS (`spec.certs`); None otherwise."""
        if self.spec.certs is None:
            return None
        files = role_files(self.spec.certs, role)
        return TlsFiles(files.cert, files.key, files.ca)

    def _tls_flags(self, role: str) -> tuple[str, ...]:
        return role_files(self.spec.certs, role).flags() if self.spec.certs is not None else ()

    @property
    def gateway(self) -> str:
        """The first gateway's address."""
        return next(iter(self.gateways.values()))

    @property
    def http(self) -> str:
        """The first gateway's HTTP API address, HOST:PORT (its OpenAI base URL is http://HOST:PORT/v1)."""
        return next(iter(self.http_gateways.values()))

    @property
    def procs(self) -> dict[str, subprocess.Popen]:
        return self.processes.procs

    def start(self, progress: Callable[[str], None] | None = None) -> Mesh:
        """Coordinator, then workers and gateways (in `gateway_first` order); returns once every
        gateway serves. `progress` hears each worker's start-up stages meanwhile (moemesh.launch.progress).
        On failure the caller still owns `stop()` (`running` does that)."""
        s = self.spec
        s.state_dir.mkdir(parents=True, exist_ok=True)
        port = self._start_and_wait("coordinator", ["coordinator", "--model", str(s.model), "--workers",
                                                    str(s.workers), "--host", s.coordinator_host, "--port", "0",
                                                   *self._tls_flags("coordinator"), *self._metrics_flags("coordinator"),
                                                   *s.coordinator_flags])
        self.coordinator = f"{s.coordinator_host}:{port}"
        if s.gateway_first:
            self._start_gateways()
        for i in range(s.workers):
            own = s.per_worker_flags[i] if i < len(s.per_worker_flags) else ()
            self.processes.start(f"worker{i}", ["worker", "--coordinator", self.coordinator, "--port", "0",
                                                "--host", s.worker_host(i), "--worker-id", f"worker-{i}",
                                                *self._tls_flags("worker"), *self._metrics_flags(f"worker{i}"),
                                                *s.worker_flags, *own],
                                 prefix=s.worker_prefix[i] if i < len(s.worker_prefix) else ())
        if not s.gateway_first:
            self._start_gateways()
        watch = None
        if progress is not None:
            watch = StartupWatch(lambda: {n: a for n, a in self.metrics().items() if n.startswith("worker")}, progress)
        for address in self.gateways.values():
            self.wait_serving(address, on_poll=watch.poll if watch is not None else None)
        if watch is not None:
            watch.poll_now()
        return self

    def add_gateway(self, name: str, flags: Sequence[str] = (), port: int = 0, http_port: int = 0) -> str:
        """Start gateway `name` in front of this mesh; its gRPC address once bound (not yet SERVING).
        Its HTTP API (`http_port`: 0 = any free port, -1 = none) is in `http_gateways[name]`."""
        s = self.spec
        http_file = s.state_dir / f"{name}.http.port"
        http_file.unlink(missing_ok=True)
        http_flags = ("--http-port", str(http_port), *(("--http-port-file", str(http_file)) if http_port >= 0 else ()))
        port = self._start_and_wait(name, ["gateway", "--coordinator", self.coordinator, "--model", str(s.model),
                                           "--host", s.gateway_host, "--port", str(port), *http_flags,
                                           *self._tls_flags("gateway"), *self._metrics_flags(name), *flags])
        self.gateways[name] = f"{s.gateway_host}:{port}"
        if http_port >= 0:  # the gateway writes this file before its gRPC port file
            bound = self.processes.wait_port(name, http_file, s.start_timeout_s)
            self.http_gateways[name] = f"{s.gateway_host}:{bound}"
        return self.gateways[name]

    def wait_serving(self, address: str, timeout_s: float | None = None,
                     on_poll: Callable[[], None] | None = None) -> None:
        """Poll `address`'s health service until the Gateway service is SERVING; MoemeshError with
        the logs if a process dies or the time runs out."""
        timeout_s = self.spec.start_timeout_s if timeout_s is None else timeout_s
        tls = self.tls("admin")
        with (grpc.insecure_channel(address) if tls is None
              else grpc.secure_channel(address, tls.channel_credentials())) as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            def check() -> None:
                self.processes.check_alive()
                if on_poll is not None:
                    on_poll()
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=GATEWAY_SERVICE),
                                       timeout=HEALTH_CALL_TIMEOUT_S)
                except grpc.RpcError as exc:
                    raise UnavailableError(
                        f"{address} not SERVING within {timeout_s:.0f} s ({exc.code().name})") from exc
                if reply.status != health_pb2.HealthCheckResponse.SERVING:
                    raise UnavailableError(f"{address} not SERVING within {timeout_s:.0f} s")

            try:
                retry_sync(check, lambda exc: isinstance(exc, UnavailableError),
                           backoff=Backoff(first_s=0.05, cap_s=0.5, deadline_s=timeout_s))
            except UnavailableError as exc:
                raise MoemeshError(f"{exc}\n{self.processes.log_tail()}") from None

    def check_alive(self) -> None:
        self.processes.check_alive()

    def supervise(self, max_restarts: int) -> list[str]:
        """Restart every worker that exited (a crash, or evicted from its world): the new process
        registers as a new incarnation of the same worker id and joins the next world generation.
        Restart a coordinator that exited when it keeps its state (`--state-file`): on the port
        it had, with the same file, so it resumes the running world while the workers and the
        gateways serve on. Returns the names restarted. MoemeshError (with the logs) if a process
        exited more than `max_restarts` times, if a coordinator without a state file exited (a
        fresh one would not know the running world), or if a gateway exited."""
        restarted = []
        for child in self.processes.exited():
            if child.role == "gateway" or (child.role == "coordinator" and STATE_FLAG not in child.argv):
                raise MoemeshError(f"{child.name} exited with code {child.proc.returncode}\n"
                                   f"{self.processes.log_tail()}")
            if child.restarts >= max_restarts:
                raise MoemeshError(f"{child.name} exited (code {child.proc.returncode}) after {child.restarts} "
                                   f"restarts; giving up\n{self.processes.log_tail()}")
            print(f"moemesh: {child.name} exited with code {child.proc.returncode}; restarting it "
                  f"(restart {child.restarts + 1} of at most {max_restarts})", file=sys.stderr, flush=True)
            argv = child.argv
            if child.role == "coordinator" and self.coordinator:
                argv = with_flag(argv, "--port", self.coordinator.rsplit(":", 1)[1])
            self.processes.restart(child.name, argv)
            restarted.append(child.name)
        return restarted

    def metrics(self) -> dict[str, str]:
        """HOST:PORT of the metrics endpoint of each process that published one, by name (every
        service serves one on a free port unless its flags say `--metrics-port -1`)."""
        out = {}
        for name in self.procs:
            port_file = self.spec.state_dir / f"{name}.metrics.port"
            if port_file.exists():
                host = (self.spec.gateway_host if name.startswith("gateway") else self.spec.coordinator_host
                        if name == "coordinator" else self.spec.worker_host(int(name.removeprefix("worker"))))
                out[name] = f"{host}:{port_file.read_text().strip()}"
        return out

    def log_tail(self, lines: int = 30) -> str:
        return self.processes.log_tail(lines)

    def kill(self, name: str) -> None:
        """SIGKILL one process (a crash)."""
        self.processes.kill(name)

    def terminate(self, name: str, timeout_s: float = 15.0) -> int:
        """SIGTERM one process, SIGKILL after `timeout_s`; its exit status. The mesh forgets it (a
        gateway leaves `gateways` and `http_gateways`)."""
        self.gateways.pop(name, None)
        self.http_gateways.pop(name, None)
        return self.processes.terminate(name, timeout_s)

    def stop(self) -> None:
        """Gateways, then workers, then the coordinator; SIGKILL whatever outlives the bound."""
        self.processes.stop(self.spec.stop_timeout_s)

    def _start_gateways(self) -> None:
        s = self.spec
        for i in range(s.gateways):
            self.add_gateway("gateway" if i == 0 else f"gateway{i}", s.gateway_flags,
                             port=s.gateway_port if i == 0 else 0, http_port=s.gateway_http_port if i == 0 else 0)

    def _metrics_flags(self, name: str) -> tuple[str, ...]:
        """Metrics on a free port, published in state_dir/NAME.metrics.port (flags given later win)."""
        port_file = self.spec.state_dir / f"{name}.metrics.port"
        port_file.unlink(missing_ok=True)
        return ("--metrics-port", "0", "--metrics-port-file", str(port_file))

    def _start_and_wait(self, name: str, argv: list[str]) -> int:
        port_file = self.spec.state_dir / f"{name}.port"
        port_file.unlink(missing_ok=True)
        self.processes.start(name, [*argv, "--port-file", str(port_file)])
        return self.processes.wait_port(name, port_file, self.spec.start_timeout_s)


def with_flag(argv: Sequence[str], flag: str, value: str) -> tuple[str, ...]:
    """`argv` with every `flag VALUE` pair's value replaced by `value` (appended when absent)."""
    out = list(argv)
    at = [i for i, arg in enumerate(out[:-1]) if arg == flag]
    for i in at:
        out[i + 1] = value
    return tuple(out) if at else (*out, flag, value)


@contextlib.contextmanager
def running(spec: MeshSpec, progress: Callable[[str], None] | None = None) -> Iterator[Mesh]:
    """A started mesh (`progress`: as `Mesh.start`); every process is stopped on exit, also when starting failed."""
    mesh = Mesh(spec)
    try:
        yield mesh.start(progress)
    finally:
        mesh.stop()
