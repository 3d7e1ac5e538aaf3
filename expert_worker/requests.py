"""The worker's data plane for Serve streams: the request table and its failure policy.

The servicer converts protos and calls this; the engine thread (expert_worker.runner) runs what
is sent to it. This module owns:
- the table of live requests (`_Route`: which stream, its counts), one entry per submitted id;
- submit validation (worker leaving its mesh, duplicate id, the engine's limits);
- turning one engine step's events into ONE list of outcomes per stream (the servicer sends each
  list as one WorkerEvent: a Batch when it holds more than one event);
- cancelling a stream's requests when the stream ends;
- the contract's choice between Rejected and Finished{ERROR}, in `_failure` only.

Outcomes (`Tokens`, `Finished`, `Rejected`) mirror worker.proto's WorkerEvent kinds. All methods
run on the event loop; `deliver` is handed the engine thread's events by the server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from expert_worker.errors import DuplicateRequestError, NotReadyError
from expert_worker.runner import Cancel, Event, Submit
from expert_worker.runner import Rejected as EngineRejected
from moemesh.engine.engine import FinishReason, TokenEvent
from moemesh.engine.logprobs import TokenLogprob
from moemesh.engine.sampling import SamplingParams
from moemesh.errors import MoemeshError, UnavailableError


@dataclass(frozen=True)
class Tokens:
    """New tokens of a request (one engine step's)."""

    request_id: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token, when the request asked
    prompt_logprobs: tuple[TokenLogprob, ...] = ()  # with its first tokens, when the request asked


@dataclass(frozen=True)
class Finished:
    """A request ended; `reason` None means it failed after generating tokens (see `error`)."""

    request_id: str
    reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int  # in total, tokens generated before a resubmission included
    error: str = ""


@dataclass(frozen=True)
class Rejected:
    """A request was refused before this worker generated anything for it (safe to send elsewhere)."""

    request_id: str
    error: MoemeshError


Outcome = Tokens | Finished | Rejected


@dataclass(frozen=True)
class Submission:
    """A Submit message, as the data plane takes it."""

    request_id: str
    prompt: tuple[int, ...]
    params: SamplingParams
    generated: tuple[int, ...] = ()  # tokens a lost worker made already (a resubmission)


@dataclass(eq=False)
class Stream:
    """One Serve stream: where its outcomes go (one list per engine step) and its live requests."""

    out: asyncio.Queue = field(default_factory=asyncio.Queue)  # of list[Outcome]
    requests: set[str] = field(default_factory=set)


@dataclass(eq=False)
class _Route:
    """A live request: its stream and its counts (the worker side's one token count)."""

    stream: Stream
    prompt_tokens: int
    resumed_at: int  # tokens generated before this worker got it (Submission.generated)
    completion_tokens: int  # in total, resumed_at included


class RequestTable:
    """Every live request on this worker, by id, and the streams they came from.

    `to_engine` hands a Submit / Cancel to the engine thread (MeshRunner.submit), `accepting`
    says whether it still takes work (MeshRunner.accepting), `validate` raises InvalidRequestError
    for a request that can never run here (Engine.validate).
    """

    def __init__(self, to_engine: Callable[[Submit | Cancel], None], accepting: Callable[[], bool],
                 validate: Callable[[list[int], SamplingParams], None]):
        self._to_engine = to_engine
        self._accepting = accepting
        self._validate = validate
        self._routes: dict[str, _Route] = {}

    def __len__(self) -> int:
        return len(self._routes)

    def open_stream(self) -> Stream:
        """A new Serve stream's share of the table."""
        return Stream()

    def submit(self, stream: Stream, item: Submission) -> None:
        """Start `item` on the engine, or answer Rejected on `stream` at once."""
        route = _Route(stream, len(item.prompt), resumed_at=len(item.generated),
                       completion_tokens=len(item.generated))
        prompt = list(item.prompt) + list(item.generated)  # a resubmitted request resumes
        params = replace(item.params, max_new_tokens=item.params.max_new_tokens - len(item.generated))
        if item.generated:  # the prompt's log-probabilities went out with the first tokens already
            params = replace(params, prompt_logprobs=False)
        try:
            self._admit(item.request_id, prompt, params)
        except MoemeshError as exc:
            stream.out.put_nowait([_failure(item.request_id, route, exc)])
            return
        self._routes[item.request_id] = route
        stream.requests.add(item.request_id)
        self._to_engine(Submit(item.request_id, prompt, params))

    def cancel(self, stream: Stream, request_id: str) -> None:
        """Cancel one of `stream`'s live requests (the engine answers Finished{CANCELLED});
        an unknown, finished or other stream's id is ignored."""
        if request_id in stream.requests:
            self._to_engine(Cancel(request_id))

    def close_stream(self, stream: Stream) -> None:
        """The stream ended: forget its requests and cancel them on the engine."""
        for request_id in stream.requests:
            if self._routes.pop(request_id, None) is not None:
                self._to_engine(Cancel(request_id))
        stream.requests.clear()

    def deliver(self, events: list[Event]) -> None:
        """One engine step's events: ONE list of outcomes per stream, in event order."""
        per_stream: dict[int, tuple[Stream, list[Outcome]]] = {}
        for event in events:
            route = self._routes.get(event.request_id)
            if route is None:
                continue  # its stream is gone; the request was cancelled
            outcomes, ended = _outcomes(event, route)
            per_stream.setdefault(id(route.stream), (route.stream, []))[1].extend(outcomes)
            if ended:
                del self._routes[event.request_id]
                route.stream.requests.discard(event.request_id)
        for stream, outcomes in per_stream.values():
            stream.out.put_nowait(outcomes)

    def _admit(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        if not self._accepting():
            raise NotReadyError("worker is leaving its mesh (stopping or failed); send this elsewhere")
        if request_id in self._routes:
            raise DuplicateRequestError(f"request id {request_id!r} is already running on this worker")
        self._validate(prompt, params)


def _outcomes(event: Event, route: _Route) -> tuple[list[Outcome], bool]:
    """(outcomes, ended) for one engine event; the route's count follows the tokens."""
    if isinstance(event, EngineRejected):
        return [_failure(event.request_id, route, event.error)], True
    assert isinstance(event, TokenEvent), f"unexpected engine event {event!r}"
    if event.finish is FinishReason.ERROR:  # the engine failed this request alone: no resend helps
        return [Finished(event.request_id, None, route.prompt_tokens, route.completion_tokens, event.error)], True
    outcomes: list[Outcome] = []
    if event.token_id is not None:
        route.completion_tokens += 1
        logprobs = (event.logprob,) if event.logprob is not None else ()
        outcomes.append(Tokens(event.request_id, (event.token_id,), logprobs, event.prompt_logprobs))
    if event.finish is not None:
        outcomes.append(Finished(event.request_id, event.finish, route.prompt_tokens, route.completion_tokens))
    return outcomes, event.finish is not None


def _failure(request_id: str, route: _Route, error: MoemeshError) -> Outcome:
    """THE contract (worker.proto): a request this worker made no token for is Rejected (the
    gateway may send it elsewhere); so is one this worker lets go of for a reason that is not the
    request's (UNAVAILABLE: it is leaving its mesh or was evicted), tokens or not: the gateway
    continues it elsewhere from the tokens it has. Any other failure after tokens ends it with
    Finished{ERROR}."""
    if route.completion_tokens == route.resumed_at or isinstance(error, UnavailableError):
        return Rejected(request_id, error)
    return Finished(request_id, None, route.prompt_tokens, route.completion_tokens, error=str(error))
