"""The gateway's settings: one frozen dataclass, built once by the CLI from flags and environment.

Each field's flag, help and MOEMESH_GATEWAY_* variable are declared with it (moemesh.settings).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from moemesh.errors import MoemeshError
from moemesh.metrics import METRICS_PORT_HELP, check_metrics_port
from moemesh.settings import option, parse_bool
from moemesh.tls import ca_option, cert_option, key_option, tls_of

ENV_PREFIX = "MOEMESH_GATEWAY_"


@dataclass(frozen=True)
class GatewaySettings:
    """Everything `gateway.server.serve` needs; nothing downstream reads the environment."""

    ENV_PREFIX: ClassVar[str] = ENV_PREFIX

    coordinator: str = option("--coordinator", "coordinator HOST:PORT")
    # checkpoint folder: tokenizer.json + config.json (no weights are read)
    model_dir: Path = option("--model", "checkpoint folder with config.json and tokenizer.json", Path)
    host: str = option("--host", "address to bind", default="127.0.0.1")
    port: int = option("--port", "port to bind; 0 = any free port (see --port-file)", int, default=50051)
    port_file: Path | None = option("--port-file", "write the bound port to this file", Path, default=None)
    http_port: int = option("--http-port", "port of the OpenAI-compatible HTTP API, bound on --host; 0 = any free "
                            "port (see --http-port-file), -1 = no HTTP API", int, default=8000)
    http_port_file: Path | None = option("--http-port-file", "write the bound HTTP port to this file", Path,
                                         default=None)
    metrics_port: int = option("--metrics-port", f"{METRICS_PORT_HELP}; default 0 (the log and "
                               "--metrics-port-file say which)", int, default=0)
    metrics_port_file: Path | None = option("--metrics-port-file", "write the bound metrics port to this file", Path,
                                            default=None)
    max_model_len: int = option("--max-model-len", "the workers' context in tokens; effective = min(this, "
                                "max_position_embeddings)", int, default=2048)
    max_new_tokens_limit: int = option("--max-new-tokens-limit", "largest max_new_tokens accepted", int,
                                       default=4096)
    default_max_new_tokens: int = option("--default-max-new-tokens", "max_new_tokens for requests that leave "
                                         "sampling unset", int, default=16)
    max_inflight: int = option("--max-inflight", "prompts in flight before RESOURCE_EXHAUSTED", int, default=1024)
    max_prompt_bytes: int = option("--max-prompt-bytes", "largest prompt text in UTF-8 bytes; a longer one is "
                                   "INVALID_ARGUMENT before it is tokenized", int, default=1024 * 1024)
    max_concurrent_rpcs: int | None = option("--max-concurrent-rpcs", "calls in progress at once (health included) "
                                             "before grpc answers RESOURCE_EXHAUSTED; unset = 4 x --max-inflight, "
                                             "must be more than --max-inflight", int, default=None)
    exit_with_parent: bool = option("--exit-with-parent", "stop when the parent process exits (for launchers)",
                                    parse_bool, default=False)
    call_timeout_s: float = option("--call-timeout", "deadline of each coordinator / worker call, s", float,
                                   default=10.0)
    max_migrations: int = option("--max-migrations", "times a request is submitted again to another worker after "
                                 "its worker let go of it (lost, left the world, or gave it back)", int, default=3)
    recovery_wait_s: float = option("--recovery-wait", "seconds a request waits for a live worker while none "
                                    "exists (a world being re-formed), never past its deadline", float,
                                    default=30.0)
    grace_s: float = option("--grace", "seconds in-flight calls may finish on SIGINT / SIGTERM", float, default=5.0)
    log_level: str = option("--log-level", "logging level", default="INFO")
    tls_cert: Path | None = cert_option()  # mTLS: all three or none (moemesh.tls)
    tls_key: Path | None = key_option()
    tls_ca: Path | None = ca_option()
    api_keys_file: Path | None = option("--api-keys-file", "API keys clients must send as 'authorization: Bearer "
                                        "<key>': one SHA-256 hex per line, optional rpm=N max_tokens=N "
                                        "(moemesh.auth; `moemesh api-key` makes one); unset = no keys", Path,
                                        default=None)
    api_keys_guard_health: bool = option("--api-keys-guard-health", "with --api-keys-file, health and reflection "
                                         "need a key too (open by default)", parse_bool, default=False)

    def __post_init__(self) -> None:
        if not self.coordinator or ":" not in self.coordinator:
            raise MoemeshError(f"coordinator must be HOST:PORT, got {self.coordinator!r}")
        for name in ("max_model_len", "max_new_tokens_limit", "default_max_new_tokens", "max_inflight",
                     "max_prompt_bytes"):
            if getattr(self, name) <= 0:
                raise MoemeshError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.port < 65536:
            raise MoemeshError(f"port must be in 0..65535, got {self.port}")
        if not -1 <= self.http_port < 65536:
            raise MoemeshError(f"http_port must be in 0..65535, or -1 for no HTTP API, got {self.http_port}")
        check_metrics_port(self.metrics_port)
        if self.call_timeout_s <= 0 or self.grace_s < 0:
            raise MoemeshError("call_timeout_s must be > 0 and grace_s >= 0")
        if self.max_migrations < 0 or self.recovery_wait_s < 0:
            raise MoemeshError("max_migrations and recovery_wait_s must be >= 0")
        tls_of(self)  # all three TLS files or none
        if self.concurrent_rpcs_limit <= self.max_inflight:  # grpc's refusal would hide the gateway's own
            raise MoemeshError(f"max_concurrent_rpcs must be more than max_inflight ({self.max_inflight}), "
                               f"got {self.max_concurrent_rpcs}")

    @property
    def concurrent_rpcs_limit(self) -> int:
        """max_concurrent_rpcs as given, else room for every request in flight 4 times over (the
        rest: health watches, ModelInfo, calls the gateway refuses with its own clear message)."""
        return 4 * self.max_inflight if self.max_concurrent_rpcs is None else self.max_concurrent_rpcs

    @property
    def http(self) -> bool:
        """Whether the gateway serves the OpenAI-compatible HTTP API."""
        return self.http_port >= 0

    @property
    def address(self) -> str:
        """HOST:PORT as configured (the bound port may differ when port is 0)."""
        return f"{self.host}:{self.port}"
