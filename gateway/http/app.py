"""The OpenAI-compatible routes (Starlette): thin handlers, body in -> domain call -> JSON / SSE out.

    POST /v1/completions         prompt (text or token ids) -> completion, streamed or not
    POST /v1/chat/completions    messages -> the chat template -> completion, streamed or not
    GET  /v1/models              the served model (its id is ModelInfo's ModelSpec.name)
    GET  /health                 200 while serving, 503 otherwise (the truth gRPC health reports)
    POST /tokenize, /detokenize  vLLM's shapes
    GET  /metrics                the gateway's Prometheus registry (gateway/metrics.py), when given

Every handler runs inside `_answering`: an exception becomes its OpenAI-shaped error
(gateway.http.errors). A streamed completion waits for its first delta before the response
starts, so every failure before the first token (bad input, the gateway full, no worker, a
worker's rejection) is an HTTP status, as in the gRPC API; a failure after it is an error event in
the stream. A client that disconnects has its generation cancelled on the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.http import sse
from gateway.http.chat import ChatTemplate
from gateway.http.completion import Delta, End, Reply, collect, run_completion
from gateway.http.errors import BadParamError, UnknownModelError, error_body, http_error
from gateway.http.params import Sampled, chat_params, completion_params, generate_request, tokens_param
from gateway.metrics import GatewayMetrics
from gateway.served_model import INLINE_TOKENIZE_CHARS, ServedModel
from gateway.workers import WorkerPool
from moemesh.auth import KeyGuard

T = TypeVar("T")
Handler = Callable[[Request], Awaitable[Response]]
BODY_SLACK_BYTES = 64 * 1024  # a body may hold its prompt (bounded by --max-prompt-bytes) and this much more


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def _answering(handler: Handler) -> Handler:
    """The one place an exception becomes an answer."""
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except ClientGone:
            return Response(status_code=499)  # nobody reads it
        except Exception as exc:
            error = http_error(exc)
            return JSONResponse(error.body, error.status, headers=error.headers)

    return wrapped


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body was read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result; ClientGone (and `work` cancelled, which releases its request) if the
    client disconnects first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientGone()
    return task.result()


class _Stream(StreamingResponse):
    """A streamed response that closes its body's generator however it ends: a disconnect cancels
    the response while it may wait in `send`, outside the generator, which would otherwise stay
    open until collected (and its request with it)."""

    body_iterator: AsyncGenerator[bytes, None]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


class _Asgi:
    """An ASGI callable as a Route endpoint (Starlette treats a plain function as a request handler)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


class OpenAIApi:
    """The handlers, over the gateway's ServedModel and WorkerPool; `health()` is why the gateway
    does not serve now ("" while it serves). With `keys` (--api-keys-file) every route needs
    `Authorization: Bearer <key>` and a generation is charged to the key's limits, by the same
    KeyGuard as the gRPC API; /health (and /metrics) too only with `guard_health`."""

    def __init__(self, model: ServedModel, pool: WorkerPool, health: Callable[[], str],
                 keys: KeyGuard | None = None, guard_health: bool = False, metrics: GatewayMetrics | None = None):
        self.model = model
        self.metrics = metrics
        self.pool = pool
        self.health = health
        self.keys = keys
        self.guard_health = guard_health
        self.name = model.spec().name
        self.chat_template = ChatTemplate.load(model.model_dir, add_bos=model.codec.bos is not None)
        self.max_body_bytes = model.max_prompt_bytes * 4 + BODY_SLACK_BYTES  # JSON may escape each byte

    # --- routes ----------------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        params = completion_params(await self._json(request), self.model.default_max_new_tokens)
        return await self._generate(request, params.prompt, params.common, chat=False, echo=params.echo)

    async def chat_completions(self, request: Request) -> Response:
        params = chat_params(await self._json(request), self.model.default_max_new_tokens)
        self._check_model(params.common.model)
        prompt = self.chat_template.prompt(params.messages, params.add_generation_prompt)
        return await self._generate(request, prompt, params.common, chat=True)

    async def models(self, request: Request) -> Response:
        self._authenticate(request)
        card = {"id": self.name, "object": "model", "created": 0, "owned_by": "moemesh",
                "root": self.name, "max_model_len": self.model.context}
        return JSONResponse({"object": "list", "data": [card]})

    async def health_check(self, request: Request) -> Response:
        if self.guard_health:
            self._authenticate(request)
        reason = self.health()
        if reason:
            return JSONResponse({"status": "NOT_SERVING", "reason": reason}, 503)
        return JSONResponse({"status": "SERVING"})

    async def tokenize(self, request: Request) -> Response:
        """vLLM's: {prompt, add_special_tokens=true} or {messages, add_generation_prompt=true}
        -> {count, max_model_len, tokens}; the ids a completion's prompt would get."""
        self._authenticate(request)
        body = await self._json(request)
        self._check_model(body.get("model"))
        if "messages" in body:
            params = chat_params({"messages": body["messages"],
                                  "add_generation_prompt": body.get("add_generation_prompt", True)}, 1)
            text, add_special = self.chat_template.prompt(params.messages, params.add_generation_prompt), True
        else:
            prompt, add_special = body.get("prompt"), body.get("add_special_tokens", True)
            if not isinstance(prompt, str) or not isinstance(add_special, bool):
                raise BadParamError("prompt", "prompt must be a string (add_special_tokens a boolean)")
            text = prompt
        ids = await self._tokenize(text)
        if not add_special and ids and ids[0] == self.model.codec.bos:
            ids = ids[1:]
        return JSONResponse({"count": len(ids), "max_model_len": self.model.context, "tokens": ids})

    async def detokenize(self, request: Request) -> Response:
        """vLLM's: {tokens} -> {prompt}."""
        self._authenticate(request)
        body = await self._json(request)
        self._check_model(body.get("model"))
        ids = tokens_param(body.get("tokens"), "tokens")
        vocab = self.model.config.vocab_size
        if any(t >= vocab for t in ids):
            raise BadParamError("tokens", f"token ids must be < the vocabulary size {vocab}")
        return JSONResponse({"prompt": self.model.codec.decode(list(ids))})

    # --- one generation --------------------------------------------------------------------------

    async def _generate(self, request: Request, prompt: str | tuple[int, ...], common: Sampled,
                        chat: bool, echo: bool = False) -> Response:
        self._check_model(common.model)
        if self.keys is not None:
            self.keys.admit(request.headers.get("authorization"), time.monotonic(), requests=1,
                            max_tokens=common.sampling.max_new_tokens)
        request_id = uuid.uuid4().hex[:16]
        prepared = await self.model.prepare_off_loop(generate_request(prompt, common.sampling), request_id)
        echo_text = (prompt if isinstance(prompt, str) else self.model.codec.decode(list(prompt))) if echo else None
        outputs = run_completion(self.pool, self.model, prepared, common.stop, self.metrics, echo_text)
        reply = Reply.new(request_id, self.name, chat)
        if not common.stream:
            whole, end = await _unless_disconnected(request, collect(outputs))
            return JSONResponse(reply.full(whole.text, end, reply.logprobs(whole, self._token_text)))
        try:  # failures before the first token are HTTP statuses
            first = await _unless_disconnected(request, anext(outputs))
        except BaseException:
            await outputs.aclose()
            raise
        return _Stream(_events(reply, first, outputs, common.include_usage, self._token_text),
                       media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def _token_text(self, token: int) -> str:
        """One token's text, as OpenAI's logprobs name it (a lone byte of a longer character: U+FFFD)."""
        return self.model.codec.decode([token])

    def _authenticate(self, request: Request) -> None:
        if self.keys is not None:
            self.keys.authenticate(request.headers.get("authorization"))

    def _check_model(self, name: Any) -> None:
        if name is not None and name != self.name:
            raise UnknownModelError(f"the model {name!r} does not exist: this gateway serves {self.name!r}")

    async def _tokenize(self, text: str) -> list[int]:
        if len(text) <= INLINE_TOKENIZE_CHARS or len(text) > self.model.max_prompt_bytes:
            return self.model.tokenize(text)
        return await asyncio.to_thread(self.model.tokenize, text)

    async def _json(self, request: Request) -> dict[str, Any]:
        """The body as a JSON object, read up to the size limit."""
        size = 0
        parts: list[bytes] = []
        async for part in request.stream():
            size += len(part)
            if size > self.max_body_bytes:
                raise BadParamError("body", f"the request body is over this gateway's limit of "
                                            f"{self.max_body_bytes} bytes (--max-prompt-bytes x 4 + 64 KiB)")
            parts.append(part)
        try:
            body = json.loads(b"".join(parts))
        except ValueError as exc:
            raise BadParamError("body", f"the request body is not valid JSON: {exc}") from None
        except RecursionError:  # json's decoder refuses deep nesting so; a 500 before the fuzz campaign
            raise BadParamError("body", "the request body is nested too deeply") from None
        if not isinstance(body, dict):
            raise BadParamError("body", "the request body must be a JSON object")
        return body


async def _events(reply: Reply, first: Delta | End, outputs: AsyncGenerator[Delta | End, None],
                  include_usage: bool, token_text: Callable[[int], str]) -> AsyncIterator[bytes]:
    """The SSE stream of a completion whose first item is `first`; a failure after the response
    started is an error event; `data: [DONE]` last. A disconnect cancels this (and so the request)."""
    async with contextlib.aclosing(outputs):
        try:
            if reply.chat:
                yield sse.event(reply.chunk("", role=True, include_usage=include_usage))
            item, offset = first, 0
            while isinstance(item, Delta):
                logprobs = reply.logprobs(item, token_text, offset)
                yield sse.event(reply.chunk(item.text, include_usage=include_usage, logprobs=logprobs))
                offset += len(item.text)
                item = await anext(outputs)
            yield sse.event(reply.chunk(None, item.finish_reason, include_usage=include_usage))
            if include_usage:
                yield sse.event(reply.usage_chunk(item))
        except Exception as exc:
            yield sse.event(http_error(exc).body)
    yield sse.DONE


def _metrics_behind(keys: KeyGuard | None, app: ASGIApp) -> Handler:
    """/metrics as a handler that authenticates first, then lets `app` answer."""
    async def handler(request: Request) -> Response:
        assert keys is not None
        keys.authenticate(request.headers.get("authorization"))
        return _AsgiResponse(app)

    return handler


class _AsgiResponse(Response):
    """A Response whose sending is an ASGI app's answer to the same request."""

    def __init__(self, app: ASGIApp):
        super().__init__()
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


async def _not_found(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 404
    detail = exc.detail if isinstance(exc, HTTPException) else "Not Found"
    return JSONResponse(error_body(f"{request.method} {request.url.path}: {detail}", "invalid_request_error"),
                        status)


def create_app(model: ServedModel, pool: WorkerPool, health: Callable[[], str],
               metrics: GatewayMetrics | None = None, keys: KeyGuard | None = None,
               guard_health: bool = False) -> Starlette:
    """The ASGI app of the OpenAI-compatible API; with `metrics` its requests are counted as the
    gRPC API's are, and its registry is served at /metrics (behind the API keys only with
    `guard_health`)."""
    api = OpenAIApi(model, pool, health, keys, guard_health, metrics)
    metrics_app = metrics.asgi_app() if metrics is not None else None
    routes = [
        Route("/v1/completions", _answering(api.completions), methods=["POST"]),
        Route("/v1/chat/completions", _answering(api.chat_completions), methods=["POST"]),
        Route("/v1/models", _answering(api.models), methods=["GET"]),
        Route("/health", _answering(api.health_check), methods=["GET"]),
        Route("/tokenize", _answering(api.tokenize), methods=["POST"]),
        Route("/detokenize", _answering(api.detokenize), methods=["POST"]),
    ]
    if metrics_app is not None:
        guarded = keys is not None and guard_health
        endpoint = _answering(_metrics_behind(keys, metrics_app)) if guarded else _Asgi(metrics_app)
        routes.append(Route("/metrics", endpoint))
    return Starlette(routes=routes, exception_handlers={404: _not_found, 405: _not_found})
