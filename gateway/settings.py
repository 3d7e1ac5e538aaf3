"""The gateway's settings: one frozen dataclass, built once by the CLI from flags and environment."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moemesh.errors import MoemeshError

ENV_PREFIX = "MOEMESH_GATEWAY_"


@dataclass(frozen=True)
class GatewaySettings:
    """Everything `gateway.server.serve` needs; nothing downstream reads the environment."""

    coordinator: str  # HOST:PORT of the coordinator
    model_dir: Path  # checkpoint folder: tokenizer.json + config.json (no weights are read)
    host: str = "127.0.0.1"
    port: int = 50051  # 0 = any free port (see port_file)
    port_file: Path | None = None  # where to publish the bound port
    max_model_len: int = 2048  # the workers' context; effective = min(this, max_position_embeddings)
    max_new_tokens_limit: int = 4096
    default_max_new_tokens: int = 16  # when a request leaves `sampling` unset
    max_inflight: int = 1024  # prompts in flight before RESOURCE_EXHAUSTED
    exit_with_parent: bool = False  # stop when the parent process goes away
    call_timeout_s: float = 10.0  # deadline of every unary call to the coordinator / workers
    grace_s: float = 5.0  # how long in-flight calls may finish on SIGINT / SIGTERM

    def __post_init__(self) -> None:
        if not self.coordinator or ":" not in self.coordinator:
            raise MoemeshError(f"coordinator must be HOST:PORT, got {self.coordinator!r}")
        for name in ("max_model_len", "max_new_tokens_limit", "default_max_new_tokens", "max_inflight"):
            if getattr(self, name) <= 0:
                raise MoemeshError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.port < 65536:
            raise MoemeshError(f"port must be in 0..65535, got {self.port}")
        if self.call_timeout_s <= 0 or self.grace_s < 0:
            raise MoemeshError("call_timeout_s must be > 0 and grace_s >= 0")

    @property
    def address(self) -> str:
        """HOST:PORT as configured (the bound port may differ when port is 0)."""
        return f"{self.host}:{self.port}"
