"""Coordinator lifecycle: model config -> TCPStore -> state -> gRPC server -> stop.

`serve()` is the process's main coroutine (run under uvloop by the CLI); `CoordinatorServer` is
the same lifecycle as start/stop steps, for tests and embedding. Every gRPC object is created
inside the running loop.

The TCPStore is the data-plane rendezvous: a torch.distributed store served from this process
(it outlives any worker), on a port the OS picks. torch's store binds every interface whatever
host it is given, so `_store` binds the listening socket itself on `--host` and hands torch its
descriptor (`master_listen_fd`). Workers meet under a per-generation key prefix. The store has no
authentication of its own (docs/security.md): keep `--host` on the cluster's trusted network.

With `--state-file`, every change is written there (coordinator/durable.py) and a coordinator
started with an existing file resumes it: the TCPStore on the same port, the same world, members
and placement (the gRPC port is the caller's to keep: `Mesh.supervise` restarts on the same one).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

import torch.distributed as dist

from coordinator import durable
from coordinator.gating import GatingSettings
from coordinator.metrics import CoordinatorMetrics
from coordinator.policies import ModelFacts, RebalanceSettings, resolve_policy
from coordinator.probe import HealthProbe
from coordinator.reformation import reform_worlds
from coordinator.servicer import CoordinatorServicer
from coordinator.settings import CoordinatorSettings
from coordinator.state import CoordinatorState
from coordinator.worlds import DataPlane, roster
from moemesh.errors import ConfigError
from moemesh.mesh.placement_file import load_placement
from moemesh.metrics import MetricsServer, model_name, new_registry, serve_metrics
from moemesh.model.config import load_config
from moemesh.model.spec import model_spec
from moemesh.rpc import Server, exit_with_parent, stop_event_on_signals, write_port_file
from moemesh.tls import tls_of
from moemesh.v1 import coordinator_pb2
from moemesh.v1 import coordinator_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name
_RPC = f"/{SERVICE_NAME}/"
# Who may call what, by the caller's certificate role (enforced with mTLS only: moemesh.rpc.RoleGate).
# Membership is the workers'; placement changes are the admin's; reading worlds, placements and the
# routing statistics (traces: GetPlacement, which workers and the gateway also need) is the mesh's
# services' and the admin's, never a client certificate's.
ACCESS: dict[str, tuple[str, ...]] = {
    _RPC: ("worker", "gateway", "admin"),
    **{_RPC + rpc: ("worker",) for rpc in ("RegisterWorker", "Heartbeat", "ReportLoad", "LeaveWorld",
                                          "ReportWorldLost")},
    _RPC + "SetPlacement": ("admin",),
}


class CoordinatorServer:
    """One running coordinator: its TCPStore, domain state, gRPC server and background tasks."""

    def __init__(self, settings: CoordinatorSettings):
        self.settings = settings
        self.state: CoordinatorState | None = None
        self.store: dist.TCPStore | None = None
        self.server: Server | None = None
        self.metrics: MetricsServer | None = None
        self.port = 0
        self._tasks: list[asyncio.Task] = []

    @property
    def store_port(self) -> int:
        assert self.store is not None, "not started"
        return int(self.store.port)

    async def start(self) -> int:
        """Load the model config, start the store and the gRPC server; return the gRPC port."""
        s = self.settings
        cfg = load_config(s.model_dir)
        if s.expert_shards > 1 and cfg.expert_intermediate_size % s.expert_shards:
            raise ConfigError(f"--expert-shards {s.expert_shards}: the expert hidden size "
                              f"{cfg.expert_intermediate_size} does not split into {s.expert_shards} equal shards")
        initial = None
        if s.placement_file is not None:
            initial = load_placement(s.placement_file, cfg.moe_layer_ids, default_world_size=s.workers)
        restored = durable.read(s.state_file) if s.state_file is not None else None
        store_port = restored.store_port if restored is not None else 0
        self.store = _store(s.host, store_port)
        try:
            self.state = CoordinatorState(
                num_experts=cfg.num_experts, moe_layer_ids=cfg.moe_layer_ids, expected_workers=s.workers,
                data_plane=DataPlane(s.transport, s.store_host, self.store_port), initial=initial,
                load_window=s.load_window_reports,
                rebalance=RebalanceSettings(policy=resolve_policy(s.policy, s.workers, cfg.num_experts,
                                                                  s.expert_shards),
                                            update_every_tokens=s.rebalance_every_tokens,
                                            gating=GatingSettings(rule=s.gating_rule), topology=s.topology),
                facts=ModelFacts(cfg.top_k, cfg.hidden_size, cfg.expert_intermediate_size, dtype_bytes=4),
                expert_shards=s.expert_shards, redundancy=s.redundant_experts,
            )
            if restored is not None:
                self.state.restore(restored)
                _log_restored(restored, s)
            if s.state_file is not None:
                path = s.state_file
                self.state.on_change = lambda snapshot: durable.write(path, snapshot)
                durable.write(path, self.state.snapshot())
            spec = model_spec(cfg, s.model_dir.name)
            probe = HealthProbe(s.probe_timeout_s, tls_of(s))
            servicer = CoordinatorServicer(self.state, spec, s.model_dir, s.heartbeat_interval_s,
                                           probe if s.registration_probe else None)
            self.server = Server([SERVICE_NAME], s.max_concurrent_rpcs, tls=tls_of(s), roles=ACCESS)
            pb_grpc.add_CoordinatorServicer_to_server(servicer, self.server.grpc)
            self.port = await self.server.start(s.host, s.port)
            self._serve_metrics()
        except BaseException:
            self.store = None  # dropping the last reference closes the store's socket
            raise
        write_port_file(s.port_file, self.port)
        self._tasks.append(asyncio.create_task(self._watch_heartbeats(), name="heartbeat-monitor"))
        self._tasks.append(asyncio.create_task(reform_worlds(self.state, probe, s.reform_settle_s),
                                               name="re-formation"))
        await self.server.set_ready()
        log.info(
            "coordinator serving on %s:%d; expecting %d workers; TCPStore on %s:%d; transport %s; policy %s; "
            "%d redundant replicas per expert; model %s",
            s.host, self.port, s.workers, s.store_host, self.store_port, s.transport, self.state.policy,
            s.redundant_experts, s.model_dir,
        )
        return self.port

    async def stop(self) -> None:
        """Graceful stop: NOT_SERVING, end watches and waits, stop(grace), close the store."""
        if self.state is not None:
            self.state.close()
        if self.server is not None:
            await self.server.stop(self.settings.shutdown_grace_s)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.stop)
            self.metrics = None
        self.store = None
        log.info("coordinator stopped")

    def _serve_metrics(self) -> None:
        assert self.state is not None
        registry = new_registry()
        registry.register(CoordinatorMetrics(self.state, model_name(self.settings.model_dir)))
        self.metrics = serve_metrics(registry, self.settings.host, self.settings.metrics_port)
        if self.metrics is not None:
            write_port_file(self.settings.metrics_port_file, self.metrics.port)
            log.info("metrics on http://%s/metrics", self.metrics.address)

    async def _watch_heartbeats(self) -> None:
        assert self.state is not None
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            self.state.check_heartbeats(self.settings.heartbeat_timeout_s)


def _store(host: str, port: int) -> dist.TCPStore:
    """The rendezvous TCPStore listening on `host` only (a wildcard host: every interface), on `port`
    (0: one the OS picks)."""
    family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restarted coordinator takes its port back
        sock.bind(address)
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot bind the TCPStore on {host}:{port}: {exc.strerror or exc}") from exc
    bound = sock.getsockname()[1]
    # torch owns the descriptor from here (it closes it with the store)
    return dist.TCPStore(host or "0.0.0.0", port=bound, is_master=True, wait_for_workers=False,
                         master_listen_fd=sock.detach())


def _log_restored(r: durable.Snapshot, s: CoordinatorSettings) -> None:
    m = r.membership
    if m.generation == 0:
        log.info("restored from %s: no world yet, %d workers registered", s.state_file, len(m.registered))
        return
    assert r.placement is not None
    log.warning("restored from %s: world generation %d (%s), placement epoch %d; members that do not heartbeat "
                "within %.1f s are evicted", s.state_file, m.generation, roster(m.members), r.placement.epoch,
                s.heartbeat_timeout_s)


async def serve(
    settings: CoordinatorSettings,
    ready: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run a coordinator until SIGINT/SIGTERM (or `stop` is set, or the parent exits).

    `ready(port)` is called once the gRPC server is serving on `port`.
    """
    stop = stop if stop is not None else stop_event_on_signals()
    server = CoordinatorServer(settings)
    watchdog = asyncio.create_task(exit_with_parent(stop)) if settings.exit_with_parent else None
    try:
        port = await server.start()
        if ready is not None:
            ready(port)
        await stop.wait()
    finally:
        if watchdog is not None:
            watchdog.cancel()
        await server.stop()

