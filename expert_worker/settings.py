"""The expert worker's settings: one frozen dataclass, built once by `expert_worker.cli` from flags
with MOEMESH_WORKER_* environment fallbacks (moemesh.settings); nothing else reads the environment."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from moemesh.errors import ConfigError
from moemesh.metrics import METRICS_PORT_HELP, check_metrics_port
from moemesh.settings import option, parse_bool
from moemesh.tls import ca_option, cert_option, key_option, tls_of

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'12GiB', '60GB', '1e9' -> bytes."""
    number = text.strip().rstrip("bBiIkKmMgG")
    unit = text.strip()[len(number):].upper()
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 12GiB, 60GB, 1e9)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a size cannot be negative: {text!r}")
    return int(value)


@dataclass(frozen=True)
class WorkerSettings:
    """One worker process's configuration (one worker per device)."""

    ENV_PREFIX: ClassVar[str] = "MOEMESH_WORKER_"

    coordinator: str = option("--coordinator", "coordinator HOST:PORT")
    host: str = option("--host", "address to bind", default="127.0.0.1")
    port: int = option("--port", "port to bind (0 = any free port)", int, default=0)
    advertise_host: str = option("--advertise-host", "address peers use (default --host)", default="")
    port_file: Path | None = option("--port-file", "write the bound port here", Path, default=None)
    metrics_port: int = option("--metrics-port", f"{METRICS_PORT_HELP}; default 0, so that N workers on one host "
                               "never collide (the coordinator lists each worker's)", int, default=0)
    metrics_port_file: Path | None = option("--metrics-port-file", "write the bound metrics port here", Path,
                                            default=None)
    device: str = option("--device", "torch device of this worker: cpu, cuda:N", default="cpu")
    node: str = option("--node", "node name (for topology-aware placement)", default="local")
    worker_id: str = option("--worker-id", "stable worker id (empty = a fresh uuid)", default="")
    threads: int = option("--threads", "torch threads of this process", int, default=1)
    max_seqs: int = option("--max-seqs", "sequences running at once", int, default=32)
    max_model_len: int = option("--max-model-len", "context length in tokens", int, default=2048)
    max_new_tokens_limit: int = option("--max-new-tokens-limit", "largest max_new_tokens accepted", int,
                                       default=4096)
    collective_timeout_s: float = option("--collective-timeout", "seconds a collective may block", float,
                                         default=60.0)
    rpc_timeout_s: float = 10.0  # deadline of each call to the coordinator (no flag)
    world_poll_s: float = 30.0  # deadline of each WaitForWorld long poll; it simply polls again (no flag)
    idle_wait_s: float = 3600.0  # an idle mesh looks again after this long with nothing to do (no flag)
    leave_timeout_s: float = 2.0  # deadline of the LeaveWorld call on SIGTERM; it stops either way (no flag)
    report_every_tokens: int = option("--report-every-tokens", "routed tokens between load reports", int,
                                      default=100)
    chunked_prefill: bool = option("--chunked-prefill", "prefill long prompts in chunks mixed into decode steps, "
                                   "so running requests keep their pace (--max-batched-tokens per step)", parse_bool,
                                   default=False)
    max_batched_tokens: int = option("--max-batched-tokens", "tokens per step: with --chunked-prefill every token "
                                     "of a step, else prompt tokens admitted per step", int, default=4096)
    micro_batches: int = option("--micro-batches", "split each step so exchanges overlap compute (same on every "
                                "worker)", int, default=1, choices=(1, 2, 3, 4))
    dtype: str = option("--dtype", "compute dtype (auto: fp32 on CPU, bf16 on CUDA)", default="auto",
                        choices=("auto", "float32", "bfloat16", "float16"))
    # expert capacity overflow (moemesh/model/overflow.py)
    overflow: str = option("--overflow", "what happens to token copies beyond an expert's capacity",
                           default="dropless", choices=("dropless", "reroute", "drop"))
    capacity_factor: float = option("--capacity-factor", "expert capacity as a multiple of the average load "
                                    "(reroute/drop)", float, default=1.2)
    expert_memory_bytes: int = option("--expert-memory", "memory for expert weights, e.g. 60GB or 12GiB, reported "
                                      "to the coordinator (bounds placement; --expert-shards 0 splits experts to "
                                      "fit); 0 = unknown", parse_size, default=0)
    max_concurrent_rpcs: int = option("--max-concurrent-rpcs", "calls in progress at once (Serve streams of every "
                                      "gateway, status and health calls) before grpc answers RESOURCE_EXHAUSTED",
                                      int, default=1024)
    exit_with_parent: bool = option("--exit-with-parent", "stop when the parent process exits", parse_bool,
                                    default=False)
    log_level: str = option("--log-level", "logging level", default="INFO")
    gil_switch_interval_s: float = 0.0002  # no flag
    tls_cert: Path | None = cert_option()  # mTLS: all three or none (moemesh.tls)
    tls_key: Path | None = key_option()
    tls_ca: Path | None = ca_option()

    def __post_init__(self) -> None:
        if not self.advertise_host:  # peers dial the bind address unless told otherwise
            object.__setattr__(self, "advertise_host", self.host)
        if self.max_batched_tokens < 1:
            raise ConfigError(f"--max-batched-tokens must be at least 1, got {self.max_batched_tokens}")
        if self.max_concurrent_rpcs < 1:
            raise ConfigError(f"--max-concurrent-rpcs must be at least 1, got {self.max_concurrent_rpcs}")
        tls_of(self)  # all three TLS files or none
        check_metrics_port(self.metrics_port)
