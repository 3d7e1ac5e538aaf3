"""A small client for the moemesh Gateway API (grpc.aio).

    async with Client("127.0.0.1:50051") as client:
        async for event in client.generate(prompt="Hello", params=SamplingParams(max_new_tokens=32)):
            if isinstance(event, TokenChunk):
                print(event.text, end="", flush=True)
        done = await client.generate_text(prompt="Hello")      # Completion(token_ids, text, finished)
        info = await client.model_info()                        # moemesh.v1 ModelInfoResponse

Errors: a call failing with a status code of moemesh.status's table (INVALID_ARGUMENT, NOT_FOUND,
RESOURCE_EXHAUSTED, UNAVAILABLE, FAILED_PRECONDITION) raises its typed error (InvalidRequestError,
NotFoundError, CapacityError, UnavailableError, MoemeshError) with the server's message (the
grpc.aio.AioRpcError is the __cause__); other codes raise the grpc.aio.AioRpcError itself.
A generation that ended with FINISH_REASON_ERROR is a `Finished(reason="error")` event from
`generate` and a GenerationError from `generate_text`. `generate_remote` is the synchronous helper
the `moemesh generate --target` command uses; it raises only MoemeshError.

Security: `tls` (moemesh.tls.TlsFiles: this client's certificate, its key, the CA) dials the gateway
over mTLS; `api_key` is sent as `authorization: Bearer <key>` metadata on every call (the gateway's
--api-keys-file). Neither: plaintext without a key, as a gateway without either expects.

Every call has a deadline (`timeout`, seconds). Leaving an `async for` over `generate` early
cancels the call, and the gateway cancels the generation on its worker.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import NoReturn

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moemesh import rpc
from moemesh.engine.logprobs import TokenLogprob
from moemesh.engine.sampling import SamplingParams
from moemesh.engine.sampling_wire import logprob_from_proto, sampling_to_proto
from moemesh.errors import InvalidRequestError, MoemeshError, UnavailableError
from moemesh.retry import Backoff, retry
from moemesh.status import error_for
from moemesh.tls import TlsFiles
from moemesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

GATEWAY_SERVICE = "moemesh.v1.Gateway"
DEFAULT_TIMEOUT_S = 120.0
REASONS = {
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_CANCELLED: "cancelled",
    common_pb2.FINISH_REASON_ERROR: "error",
}


class GenerationError(MoemeshError):
    """A generation started but ended with FINISH_REASON_ERROR; the message is the server's."""


@dataclass(frozen=True)
class TokenChunk:
    """New tokens; `text` is their decoded text (empty unless include_text)."""

    token_ids: tuple[int, ...]
    text: str
    offset: int  # tokens of the completion streamed before this chunk
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token, when SamplingParams.logprobs is set
    prompt_logprobs: tuple[TokenLogprob, ...] = ()  # prompt tokens 1.., in the first chunk, when asked


@dataclass(frozen=True)
class Finished:
    """End of one generation: reason is "length", "stop", "cancelled" or "error"."""

    reason: str
    prompt_tokens: int
    completion_tokens: int
    ttft_seconds: float
    latency_seconds: float
    request_id: str
    error: str = ""


@dataclass(frozen=True)
class Completion:
    """A whole generation: every token, the decoded text, and how it ended."""

    token_ids: tuple[int, ...]
    text: str
    finished: Finished
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token, when SamplingParams.logprobs is set
    prompt_logprobs: tuple[TokenLogprob, ...] = ()  # prompt tokens 1.., when asked


Event = TokenChunk | Finished


def build_request(
    prompt: str | None = None, token_ids: Sequence[int] | None = None, params: SamplingParams | None = None,
    include_text: bool = True, request_id: str = "",
) -> gateway_pb2.GenerateRequest:
    """A GenerateRequest; exactly one of `prompt` (text) and `token_ids` must be given.
    InvalidRequestError for sampling values the server would refuse or the wire would change
    (never sent as something else: a top_p of 0 is not turned into "off")."""
    if (prompt is None) == (token_ids is None):
        raise InvalidRequestError("give exactly one of prompt (text) and token_ids")
    params = params or SamplingParams()
    params.validate()  # the ranges; the server's own limits are its to check
    req = gateway_pb2.GenerateRequest(
        sampling=sampling_to_proto(params), include_text=include_text, request_id=request_id
    )
    if prompt is not None:
        req.text = prompt
    else:
        req.token_ids.ids.extend(token_ids)
    return req


def event_from_proto(msg: gateway_pb2.GenerateResponse) -> Event:
    """TokenChunk or Finished for one GenerateResponse."""
    if msg.WhichOneof("event") == "chunk":
        c = msg.chunk
        return TokenChunk(tuple(c.token_ids), c.text, c.offset,
                          tuple(logprob_from_proto(lp) for lp in c.logprobs),
                          tuple(logprob_from_proto(lp) for lp in c.prompt_logprobs))
    f = msg.finished
    return Finished(REASONS.get(f.reason, "unspecified"), f.prompt_tokens, f.completion_tokens,
                    f.ttft_seconds, f.latency_seconds, f.request_id, f.error)


def typed_error(exc: grpc.aio.AioRpcError) -> Exception:
    """The moemesh error for a failed call's status code (moemesh.status), else the AioRpcError itself."""
    error = error_for(exc.code(), exc.details() or "")
    if error is None:
        return exc
    error.__cause__ = exc
    return error


def _reraise(exc: grpc.aio.AioRpcError) -> NoReturn:
    typed = typed_error(exc)
    if typed is exc:
        raise exc
    raise typed from exc


class Client:
    """Async client of one gateway; use as `async with Client(target) as client:`."""

    def __init__(self, target: str, timeout: float = DEFAULT_TIMEOUT_S, *, tls: TlsFiles | None = None,
                 api_key: str | None = None):
        self.target = target
        self.timeout = timeout
        self.tls = tls
        # every call's metadata: the API key, when there is one
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._channel: grpc.aio.Channel | None = None
        self._stub: gateway_pb2_grpc.GatewayStub | None = None

    async def __aenter__(self) -> Client:
        self._channel = rpc.channel(self.target, self.tls)  # inside the running loop
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; the client can be entered again afterwards."""
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

    @property
    def stub(self) -> gateway_pb2_grpc.GatewayStub:
        """The raw gRPC stub, for anything this client does not wrap."""
        if self._stub is None:
            raise RuntimeError("use the client as `async with Client(target) as client:`")
        return self._stub

    async def generate(
        self, prompt: str | None = None, *, token_ids: Sequence[int] | None = None,
        params: SamplingParams | None = None, include_text: bool = True, request_id: str = "",
        timeout: float | None = None,
    ) -> AsyncIterator[Event]:
        """Stream one generation: TokenChunk events as tokens are made, then one Finished."""
        req = build_request(prompt, token_ids, params, include_text, request_id)
        call = self.stub.Generate(req, timeout=timeout or self.timeout, metadata=self.metadata)
        try:
            async for msg in call:
                yield event_from_proto(msg)
        except grpc.aio.AioRpcError as exc:
            _reraise(exc)
        finally:
            call.cancel()  # no-op once the call has ended; cancels it if the caller stopped early

    async def generate_text(
        self, prompt: str | None = None, *, token_ids: Sequence[int] | None = None,
        params: SamplingParams | None = None, request_id: str = "", timeout: float | None = None,
    ) -> Completion:
        """A whole generation; GenerationError if it ended with an error."""
        ids: list[int] = []
        parts: list[str] = []
        logprobs: list[TokenLogprob] = []
        scored: tuple[TokenLogprob, ...] = ()  # the prompt's, from the first chunk
        async for event in self.generate(prompt, token_ids=token_ids, params=params, include_text=True,
                                         request_id=request_id, timeout=timeout):
            if isinstance(event, TokenChunk):
                ids.extend(event.token_ids)
                parts.append(event.text)
                logprobs.extend(event.logprobs)
                scored = scored or event.prompt_logprobs
            else:
                if event.reason == "error":
                    raise GenerationError(event.error or "generation failed")
                return Completion(tuple(ids), "".join(parts), event, tuple(logprobs), scored)
        raise UnavailableError(f"gateway {self.target} ended the stream without a Finished message")

    async def generate_batch(
        self, requests: Sequence[gateway_pb2.GenerateRequest], *, timeout: float | None = None
    ) -> AsyncIterator[tuple[int, Event]]:
        """Stream many generations at once: (index into `requests`, event), interleaved.
        Build each request with `build_request`."""
        call = self.stub.GenerateBatch(gateway_pb2.GenerateBatchRequest(requests=list(requests)),
                                       timeout=timeout or self.timeout, metadata=self.metadata)
        try:
            async for msg in call:
                yield msg.index, event_from_proto(msg.response)
        except grpc.aio.AioRpcError as exc:
            _reraise(exc)
        finally:
            call.cancel()

    async def model_info(self, timeout: float = 10.0) -> gateway_pb2.ModelInfoResponse:
        """The model and the deployment serving it."""
        try:
            return await self.stub.ModelInfo(gateway_pb2.ModelInfoRequest(), timeout=timeout, metadata=self.metadata)
        except grpc.aio.AioRpcError as exc:
            _reraise(exc)

    async def wait_until_serving(self, timeout: float = 60.0, service: str = GATEWAY_SERVICE) -> None:
        """Poll the standard health service until `service` is SERVING; UnavailableError on timeout."""
        stub = health_pb2_grpc.HealthStub(self._channel)

        async def check() -> None:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0,
                                         metadata=self.metadata)
            except grpc.aio.AioRpcError as exc:
                raise UnavailableError(f"{exc.code().name}: {exc.details()}") from exc
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                raise UnavailableError(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

        try:
            await retry(check, lambda exc: isinstance(exc, UnavailableError),
                        backoff=Backoff(first_s=0.1, cap_s=0.5, deadline_s=timeout))
        except UnavailableError as last:
            raise UnavailableError(f"gateway {self.target} not SERVING after {timeout:.0f} s ({last})") from None


def generate_remote(
    target: str, prompt: str | None, token_ids: Sequence[int] | None, params: SamplingParams, timeout_s: float,
    *, tls: TlsFiles | None = None, api_key: str | None = None,
) -> tuple[list[int], str]:
    """Synchronous one-shot generation through a gateway: (token ids, text). Raises MoemeshError."""

    async def once() -> Completion:
        """One generation on a channel made inside this loop."""
        async with Client(target, timeout=timeout_s, tls=tls, api_key=api_key) as client:
            return await client.generate_text(prompt, token_ids=token_ids, params=params)

    try:
        completion = asyncio.run(once())
    except grpc.aio.AioRpcError as exc:
        raise MoemeshError(f"gateway {target}: {exc.code().name}: {exc.details()}") from exc
    return list(completion.token_ids), completion.text
