"""CoordinatorSettings: every knob of one coordinator process, built once by the CLI.

Nothing in the coordinator reads the environment; `coordinator.cli` resolves flags with their
MOEMESH_COORDINATOR_* fallbacks into this dataclass (moemesh.settings) and passes it down.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from coordinator.gating import GATING_RULES
from moemesh.errors import ConfigError
from moemesh.metrics import METRICS_PORT_HELP, check_metrics_port
from moemesh.settings import option, parse_bool
from moemesh.tls import ca_option, cert_option, key_option, tls_of

TRANSPORTS = ("gloo", "auto", "nccl")
_WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


def _absolute(text: str) -> Path:
    return Path(text).resolve()


@dataclass(frozen=True)
class CoordinatorSettings:
    """One coordinator's configuration; `__post_init__` rejects inconsistent values. Each field's
    flag, help and MOEMESH_COORDINATOR_* variable are declared with it (moemesh.settings)."""

    ENV_PREFIX: ClassVar[str] = "MOEMESH_COORDINATOR_"

    # checkpoint folder (absolute); its config.json names experts and MoE layers
    model_dir: Path = option("--model", "checkpoint folder (config.json) the deployment serves", _absolute)
    workers: int = option("--workers", "number of workers the first world waits for", int)
    host: str = option("--host", "interface to bind", default="127.0.0.1")
    port: int = option("--port", "gRPC port; 0 = any free port", int, default=50050)
    port_file: Path | None = option("--port-file", "write the bound gRPC port to this file", Path, default=None)
    metrics_port: int = option("--metrics-port", f"{METRICS_PORT_HELP}; default 0 (the log and "
                               "--metrics-port-file say which)", int, default=0)
    metrics_port_file: Path | None = option("--metrics-port-file", "write the bound metrics port to this file", Path,
                                            default=None)
    transport: str = option("--transport", f"data-plane transport handed to workers: {', '.join(TRANSPORTS)}",
                            default="gloo")
    heartbeat_interval_s: float = option("--heartbeat-interval", "seconds between worker heartbeats", float,
                                         default=1.0)
    heartbeat_timeout_s: float = option("--heartbeat-timeout", "silence (s) before a worker is evicted", float,
                                        default=10.0)
    placement_file: Path | None = option("--placement", "initial placement file (YAML or JSON)", Path, default=None)
    exit_with_parent: bool = option("--exit-with-parent", "stop when the parent process exits", parse_bool,
                                    default=False)
    advertise_host: str | None = option("--advertise-host", "host workers use to reach the TCPStore (default: "
                                        "--host unless it is a wildcard)", default=None)
    load_window_reports: int = option("--load-window", "load reports kept per worker (the statistics window)", int,
                                      default=32)
    shutdown_grace_s: float = option("--shutdown-grace", "seconds in-flight RPCs get on stop", float, default=2.0)
    max_concurrent_rpcs: int = option("--max-concurrent-rpcs", "calls in progress at once (heartbeats, long polls of "
                                      "every worker and gateway) before grpc answers RESOURCE_EXHAUSTED", int,
                                      default=1024)
    policy: str = option("--policy", "balancing policy: auto (replicate when workers > experts, else none), none, "
                         "gating, replicate, split (hot experts split over two workers)", default="auto")
    gating_rule: str = option("--gating-rule", "policy gating's update rule: ours (corrections multiply the factors) "
                              "or paper (the paper's rule as written, to compare; coordinator/gating.py)",
                              default="ours", choices=GATING_RULES)
    rebalance_every_tokens: int = option("--rebalance-every", "routed tokens between balancing updates "
                                         "(the paper: 100)", int, default=100)
    topology: str = option("--topology", "planner topology (preset or YAML) for policy replicate", default="local")
    expert_shards: int = option("--expert-shards", "split every expert over this many ranks (expert tensor "
                                "parallelism); 0 = the fewest that fit the memory workers report", int, default=1)
    redundant_experts: int = option("--redundant-experts", "extra replicas of every expert on distinct workers, "
                                    "where workers and their memory allow (1 = every expert on two workers)",
                                    int, default=0)
    registration_probe: bool = option("--no-registration-probe", "admit a registering worker without first checking "
                                      "that its address answers grpc.health (for tests that register addresses "
                                      "nobody serves)", parse_bool, default=True)
    probe_timeout_s: float = option("--probe-timeout", "deadline (s) of the health probe that tells a dead member "
                                    "from a live one before a new world forms (a killed one answers at once; a loaded "
                                    "machine may need a second to answer)", float, default=2.0)
    state_file: Path | None = option("--state-file", "durable state (world, members, placement, TCPStore port), "
                                     "rewritten on every change; a coordinator started with an existing one "
                                     "resumes that mesh", _absolute, default=None)
    reform_settle_s: float = option("--reform-settle", "seconds a new world waits for further joins and losses "
                                    "to fold into it", float, default=0.2)
    tls_cert: Path | None = cert_option()  # mTLS: all three or none (moemesh.tls)
    tls_key: Path | None = key_option()
    tls_ca: Path | None = ca_option()

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
            raise ConfigError(
                f"--expert-shards {self.expert_shards} needs at least as many workers, got {self.workers}")
        if self.redundant_experts < 0:
            raise ConfigError(f"--redundant-experts must not be negative, got {self.redundant_experts}")
        if self.probe_timeout_s <= 0:
            raise ConfigError(f"--probe-timeout must be positive, got {self.probe_timeout_s}")
        if self.reform_settle_s < 0:
            raise ConfigError(f"--reform-settle must not be negative, got {self.reform_settle_s}")
        if self.shutdown_grace_s < 0:
            raise ConfigError(f"--shutdown-grace must not be negative, got {self.shutdown_grace_s}")
        if self.max_concurrent_rpcs < 1:
            raise ConfigError(f"--max-concurrent-rpcs must be at least 1, got {self.max_concurrent_rpcs}")
        tls_of(self)  # all three TLS files or none
        check_metrics_port(self.metrics_port)

    @property
    def store_host(self) -> str:
        """Host workers dial for the TCPStore: advertise_host, else host unless it is a wildcard."""
        if self.advertise_host:
            return self.advertise_host
        if self.host in _WILDCARD_HOSTS:
            return socket.getfqdn()
        return self.host
