"""One OpenAI completion over the gateway's one generation path, and its JSON shapes.

`run_completion` drives `gateway.generation.generate_one` (the gRPC API's path: admission, the
least-loaded worker, migration, the one token count, the one failure rule `Progress.failed`) and
turns its responses into text deltas and one `End`, cutting at the first stop string
(gateway.http.stops). Leaving early (a stop string, the client gone) closes `generate_one`, whose
`finally` releases the request: the worker is told to cancel it, the same path as a gRPC cancel.

With `echo`, the prompt comes first as a Delta of its own (with its tokens' log-probabilities when
asked: the first token has none, as in OpenAI's API); `logprobs_json` writes OpenAI's completion
logprobs object for a run of deltas.

Usage counts are the gateway's: `Finished.prompt_tokens` / `completion_tokens`; a completion cut by a
stop string counts the tokens streamed up to the chunk that completed it (the same number the
request's Handle holds then).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.generation import generate_one
from gateway.http.errors import GenerationFailedError
from gateway.http.stops import StopCutter
from gateway.metrics import GatewayMetrics
from gateway.served_model import Prepared, ServedModel
from gateway.workers import WorkerPool
from moemesh.engine.logprobs import TokenLogprob
from moemesh.engine.sampling_wire import logprob_from_proto
from moemesh.v1 import common_pb2

FINISH_REASONS = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length"}


@dataclass(frozen=True)
class Delta:
    """New completion text, the tokens it came from, and their log-probabilities when asked (one
    per token; None for a prompt's first token)."""

    text: str
    tokens: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob | None, ...] = ()


@dataclass(frozen=True)
class End:
    """The completion ended: OpenAI's finish_reason ("stop" / "length") and the usage."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


async def run_completion(pool: WorkerPool, model: ServedModel, prepared: Prepared, stops: Sequence[str],
                         metrics: GatewayMetrics | None = None, echo: str | None = None,
                         ) -> AsyncGenerator[Delta | End, None]:
    """Deltas of text (never empty, but for an empty `echo` or a last one of textless tokens), then
    exactly one End. `echo`: the
    prompt's text, sent first. Errors before the first token raise what the gRPC API fails with
    (CapacityError, NoWorkerError, WorkerFailedError); a generation that fails after it started
    raises GenerationFailedError."""
    cutter = StopCutter(stops)
    streamed = 0
    held: list[int] = []
    scored: list[TokenLogprob | None] = []
    responses = generate_one(pool, model, prepared, time.monotonic(), metrics=metrics)  # an async generator
    async with contextlib.aclosing(responses):  # type: ignore[type-var]
        async for response in responses:
            if response.WhichOneof("event") == "chunk":
                chunk = response.chunk
                if echo is not None and streamed == 0:
                    scores = tuple(logprob_from_proto(lp) for lp in chunk.prompt_logprobs)
                    yield Delta(echo, prepared.prompt, (None, *scores) if prepared.params.logprobs is not None else ())
                streamed += len(chunk.token_ids)
                held.extend(chunk.token_ids)  # tokens whose text a stop string may still hold back
                scored.extend(logprob_from_proto(lp) for lp in chunk.logprobs)
                text, stopped = cutter.push(chunk.text)
                if text:
                    yield Delta(text, tuple(held), tuple(scored))
                    held, scored = [], []
                if stopped:
                    yield End("stop", len(prepared.prompt), streamed)
                    return
                continue
            done = response.finished
            if done.reason not in FINISH_REASONS:
                raise GenerationFailedError(done.error or common_pb2.FinishReason.Name(done.reason))
            rest = cutter.flush()
            if rest or held:  # held: tokens without text of their own (specials), kept for their logprobs
                yield Delta(rest, tuple(held), tuple(scored))
            yield End(FINISH_REASONS[done.reason], done.prompt_tokens, done.completion_tokens)
            return


async def collect(outputs: AsyncGenerator[Delta | End, None]) -> tuple[Delta, End]:
    """The whole completion as one Delta, and its End (a non-streamed request)."""
    parts: list[Delta] = []
    async with contextlib.aclosing(outputs):
        async for item in outputs:
            if isinstance(item, End):
                return Delta("".join(d.text for d in parts), tuple(t for d in parts for t in d.tokens),
                             tuple(lp for d in parts for lp in d.logprobs)), item
            parts.append(item)
    raise AssertionError("a completion ends with End")


def logprobs_json(delta: Delta, token_text: Callable[[int], str], offset: int = 0) -> dict[str, Any] | None:
    """OpenAI's completion logprobs object for `delta`'s tokens (None when none were asked):
    tokens, token_logprobs, top_logprobs, text_offset (from `offset`, in characters)."""
    if not delta.logprobs:
        return None
    texts = [token_text(t) for t in delta.tokens]
    starts = [offset + sum(len(t) for t in texts[:i]) for i in range(len(texts))]
    return {
        "tokens": texts,
        "token_logprobs": [lp.logprob if lp is not None else None for lp in delta.logprobs],
        "top_logprobs": [_top(lp, token_text) if lp is not None else None for lp in delta.logprobs],
        "text_offset": starts,
    }


@dataclass(frozen=True)
class Reply:
    """The OpenAI JSON of one completion (`chat`: a chat.completion) in its two forms."""

    id: str
    model: str
    chat: bool
    created: int

    @classmethod
    def new(cls, request_id: str, model: str, chat: bool) -> Reply:
        return cls(("chatcmpl-" if chat else "cmpl-") + request_id, model, chat, int(time.time()))

    def full(self, text: str, end: End, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        """The answer to a non-streamed request."""
        choice: dict[str, Any] = {"index": 0, "logprobs": logprobs, "finish_reason": end.finish_reason}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {**self._head(False), "choices": [choice], "usage": end.usage()}

    def chunk(self, text: str | None, finish_reason: str | None = None, *, role: bool = False,
              include_usage: bool = False, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        """One streamed chunk: new text, or (text None) the one that carries the finish_reason."""
        choice: dict[str, Any] = {"index": 0, "logprobs": logprobs, "finish_reason": finish_reason}
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        return {**self._head(True), "choices": [choice], **({"usage": None} if include_usage else {})}

    def logprobs(self, delta: Delta, token_text: Callable[[int], str], offset: int = 0) -> dict[str, Any] | None:
        """The logprobs object of `delta` in this reply's form (`offset`: a completion's text before it)."""
        return chat_logprobs_json(delta, token_text) if self.chat else logprobs_json(delta, token_text, offset)

    def usage_chunk(self, end: End) -> dict[str, Any]:
        """The last chunk when stream_options.include_usage: no choices, the usage."""
        return {**self._head(True), "choices": [], "usage": end.usage()}

    def _head(self, streamed: bool) -> dict[str, Any]:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if streamed and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def chat_logprobs_json(delta: Delta, token_text: Callable[[int], str]) -> dict[str, Any] | None:
    """OpenAI's chat logprobs object for `delta`'s tokens (None when none were asked): per token its
    text, log-probability, UTF-8 bytes and top alternatives."""
    if not delta.logprobs:
        return None

    def entry(token: int, value: float) -> dict[str, Any]:
        text = token_text(token)
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for token, lp in zip(delta.tokens, delta.logprobs) if lp is not None]}


def _top(lp: TokenLogprob, token_text: Callable[[int], str]) -> dict[str, float]:
    """token text -> log-probability, most likely first; where two tokens share a text (specials, lone
    bytes) the likelier one's value is kept."""
    out: dict[str, float] = {}
    for token, value in lp.top:
        out.setdefault(token_text(token), value)
    return out
