"""CoordinatorSettings: every knob of one coordinator process, built once by the CLI.

Nothing in the coordinator reads the environment; `coordinator.cli` resolves flags with their
MOEMESH_COORDINATOR_* fallbacks into this dataclass and passes it down.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from moemesh.errors import ConfigError

TRANSPORTS = ("gloo", "auto", "nccl")
_WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


@dataclass(frozen=True)
class CoordinatorSettings:
    """One coordinator's configuration; `__post_init__` rejects inconsistent values."""

    model_dir: Path  # checkpoint folder (absolute); its config.json names experts and MoE layers
    workers: int  # workers the first world waits for
    host: str = "127.0.0.1"  # interface the gRPC server binds
    port: int = 50050  # gRPC port; 0 = any free port (see port_file)
    port_file: Path | None = None  # where the bound gRPC port is written once serving
    transport: str = "gloo"  # data-plane transport handed to workers in World.transport
    heartbeat_interval_s: float = 1.0  # how often workers heartbeat
    heartbeat_timeout_s: float = 10.0  # silence after which a worker is reported (later: removed)
    placement_file: Path | None = None  # optional initial placement (YAML / JSON)
    exit_with_parent: bool = False  # stop when the parent process goes away
    advertise_host: str | None = None  # host workers use to reach the TCPStore; None = derived
    load_window_reports: int = 32  # load reports kept per worker (the statistics window)
    shutdown_grace_s: float = 2.0  # how long in-flight RPCs may finish on stop
    policy: str = "auto"  # auto (replicate with spare workers, else none) | none | gating | replicate | split
    rebalance_every_tokens: int = 100  # routed tokens between balancing updates (the paper: 100)
    topology: str = "local"  # planner topology for policy replicate: preset name or YAML file
    expert_shards: int = 1  # initial placement splits every expert over this many ranks; 0 = fit memory

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in 0..65535, got {self.port}")
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"--transport must be one of {', '.join(TRANSPORTS)}, got {self.transport!r}")
        if self.heartbeat_interval_s <= 0:
            raise ConfigError(f"--heartbeat-interval must be positive, got {self.heartbeat_interval_s}")
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ConfigError(
                f"--heartbeat-timeout ({self.heartbeat_timeout_s}s) must exceed "
                f"--heartbeat-interval ({self.heartbeat_interval_s}s)"
            )
        if self.load_window_reports < 1:
            raise ConfigError(f"--load-window must be at least 1, got {self.load_window_reports}")
        if self.expert_shards < 0:
            raise ConfigError(f"--expert-shards must be >= 0 (0 = fit the workers' memory), got {self.expert_shards}")
        if self.expert_shards > 1 and self.policy == "replicate":
            raise ConfigError("--policy replicate places whole experts; it cannot be combined with --expert-shards > 1")
        if self.expert_shards > self.workers:
            raise ConfigError(f"--expert-shards {self.expert_shards} needs at least as many workers, got {self.workers}")
        if self.shutdown_grace_s < 0:
            raise ConfigError(f"--shutdown-grace must not be negative, got {self.shutdown_grace_s}")

    @property
    def store_host(self) -> str:
        """Host workers dial for the TCPStore: advertise_host, else host unless it is a wildcard."""
        if self.advertise_host:
            return self.advertise_host
        if self.host in _WILDCARD_HOSTS:
            return socket.getfqdn()
        return self.host
