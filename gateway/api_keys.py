"""The gateway's gRPC front door for API keys: a moemesh.rpc gate over moemesh.auth.KeyGuard.

Every Gateway call must carry `authorization: Bearer <key>` metadata naming a key of
`--api-keys-file` (UNAUTHENTICATED otherwise); the key's limits apply per call (RESOURCE_EXHAUSTED,
with `retry-after` trailing metadata when over its rate). Health and reflection stay open unless
`--api-keys-guard-health`. The rules themselves are moemesh.auth's, shared with the HTTP API.
"""

from __future__ import annotations

import time
from typing import Any

import grpc

from moemesh.auth import KeyGuard
from moemesh.v1 import gateway_pb2

OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class ApiKeyGate:
    """`gate(method, request, context)`: admit the call by its API key or raise a typed error."""

    def __init__(self, guard: KeyGuard, default_max_new_tokens: int, guard_health: bool = False):
        self.guard = guard
        self.default_max_new_tokens = default_max_new_tokens
        self.guard_health = guard_health

    def __call__(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> None:
        if not self.guard_health and method.startswith(OPEN_PREFIXES):
            return
        authorization = None
        for name, value in context.invocation_metadata() or ():
            if name == "authorization":
                authorization = value if isinstance(value, str) else value.decode("latin-1")
                break
        prompts = self._prompts(request)
        tokens = max((self._tokens(p) for p in prompts), default=0)
        self.guard.admit(authorization, time.monotonic(), requests=max(1, len(prompts)), max_tokens=tokens)

    @staticmethod
    def _prompts(request: Any) -> list[gateway_pb2.GenerateRequest]:
        if isinstance(request, gateway_pb2.GenerateRequest):
            return [request]
        if isinstance(request, gateway_pb2.GenerateBatchRequest):
            return list(request.requests)
        return []  # ModelInfo, or a request that did not parse (refused after authentication)

    def _tokens(self, request: gateway_pb2.GenerateRequest) -> int:
        """Its max_new_tokens; unset sampling means the gateway's default (gateway.served_model)."""
        return request.sampling.max_new_tokens if request.HasField("sampling") else self.default_max_new_tokens
