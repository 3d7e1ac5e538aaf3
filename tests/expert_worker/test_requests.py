"""The worker's request table: submit validation, one outcome list per stream per engine step,
the Rejected / Finished{ERROR} contract, cancellation of a stream's requests. The engine thread's
inbox is a list (what the table hands it), validation is the engine's real `validate_request`."""

from __future__ import annotations

from functools import partial

import grpc

from expert_worker.errors import DuplicateRequestError, NotReadyError
from expert_worker.requests import Finished, Rejected, RequestTable, Submission, Tokens
from expert_worker.runner import Cancel, Submit
from expert_worker.runner import Rejected as EngineRejected
from expert_worker.servicer import _message
from moemesh.engine.engine import FinishReason, TokenEvent, validate_request
from moemesh.engine.sampling import SamplingParams
from moemesh.errors import CapacityError, InvalidRequestError, UnavailableError
from moemesh.v1 import common_pb2

LENGTH, CANCELLED = FinishReason.LENGTH, FinishReason.CANCELLED


class EngineInbox:
    """What the table talks to: the engine thread's inbox and its accepting flag."""

    def __init__(self) -> None:
        self.inbox: list[Submit | Cancel] = []
        self.accepting = True

    def table(self) -> RequestTable:
        validate = partial(validate_request, vocab_size=100, max_len=64, max_new_tokens_limit=50)
        return RequestTable(self.inbox.append, lambda: self.accepting, validate)


def item(rid: str, prompt=(1, 2, 3), max_new_tokens: int = 10, generated=()) -> Submission:
    return Submission(rid, tuple(prompt), SamplingParams(max_new_tokens=max_new_tokens), tuple(generated))


def drain(stream) -> list[list]:
    out = []
    while not stream.out.empty():
        out.append(stream.out.get_nowait())
    return out


def test_a_valid_submit_goes_to_the_engine_and_a_resubmission_resumes():
    engine = EngineInbox()
    table = engine.table()
    stream = table.open_stream()
    table.submit(stream, item("a"))
    table.submit(stream, item("b", prompt=(4,), max_new_tokens=10, generated=(7, 8)))
    assert engine.inbox == [Submit("a", [1, 2, 3], SamplingParams(max_new_tokens=10)),
                            Submit("b", [4, 7, 8], SamplingParams(max_new_tokens=8))]
    assert len(table) == 2 and stream.requests == {"a", "b"} and drain(stream) == []


def test_a_bad_submit_is_rejected_at_once_and_never_reaches_the_engine():
    engine = EngineInbox()
    table = engine.table()
    stream = table.open_stream()
    table.submit(stream, item("a"))
    table.submit(stream, item("a"))  # duplicate
    table.submit(stream, item("c", prompt=(1, 500)))  # token id out of range
    table.submit(stream, item("d", max_new_tokens=60))  # over the limit
    engine.accepting = False
    table.submit(stream, item("e"))
    outcomes = [one for (one,) in drain(stream)]
    assert [(o.request_id, type(o.error)) for o in outcomes] == [
        ("a", DuplicateRequestError), ("c", InvalidRequestError), ("d", InvalidRequestError), ("e", NotReadyError)]
    assert all(isinstance(o, Rejected) for o in outcomes)
    assert [s.request_id for s in engine.inbox] == ["a"] and stream.requests == {"a"}


def test_one_step_is_one_outcome_list_per_stream_and_finished_counts_every_token():
    engine = EngineInbox()
    table = engine.table()
    one, two = table.open_stream(), table.open_stream()
    table.submit(one, item("a"))
    table.submit(one, item("b", generated=(5,)))
    table.submit(two, item("c"))
    table.deliver([TokenEvent("a", 11), TokenEvent("c", 31), TokenEvent("b", 21)])
    table.deliver([TokenEvent("a", 12, LENGTH), TokenEvent("b", 22, LENGTH), TokenEvent("gone", 1)])
    assert drain(one) == [
        [Tokens("a", (11,)), Tokens("b", (21,))],
        [Tokens("a", (12,)), Finished("a", LENGTH, 3, 2), Tokens("b", (22,)), Finished("b", LENGTH, 3, 3)],
    ]
    assert drain(two) == [[Tokens("c", (31,))]]
    assert one.requests == set() and two.requests == {"c"} and len(table) == 1  # ended ones are forgotten


def test_an_engine_rejection_is_rejected_before_this_workers_first_token_and_finished_error_after():
    engine = EngineInbox()
    table = engine.table()
    stream = table.open_stream()
    for rid, generated in (("fresh", ()), ("resumed", (5, 6)), ("streaming", ())):
        table.submit(stream, item(rid, generated=generated))
    table.deliver([TokenEvent("streaming", 40)])
    full = CapacityError("no free slot")
    table.deliver([EngineRejected("fresh", full), EngineRejected("resumed", full), EngineRejected("streaming", full)])
    assert drain(stream)[-1] == [
        Rejected("fresh", full), Rejected("resumed", full),  # nothing made here: safe to send elsewhere
        Finished("streaming", None, 3, 1, error="no free slot"),
    ]
    assert len(table) == 0


def test_cancel_reaches_the_engine_only_for_the_streams_own_live_requests():
    engine = EngineInbox()
    table = engine.table()
    one, two = table.open_stream(), table.open_stream()
    table.submit(one, item("a"))
    table.submit(two, item("b"))
    table.cancel(one, "b")  # another stream's
    table.cancel(one, "zzz")  # unknown
    table.cancel(one, "a")
    table.deliver([TokenEvent("a", None, CANCELLED)])
    table.cancel(one, "a")  # ended already
    assert engine.inbox[2:] == [Cancel("a")]
    assert drain(one) == [[Finished("a", CANCELLED, 3, 0)]]


def test_closing_a_stream_cancels_its_live_requests_and_drops_their_later_events():
    engine = EngineInbox()
    table = engine.table()
    one, two = table.open_stream(), table.open_stream()
    for rid in ("a", "b"):
        table.submit(one, item(rid))
    table.submit(two, item("c"))
    table.deliver([TokenEvent("a", 1, LENGTH)])
    drain(one)
    table.close_stream(one)
    assert engine.inbox[3:] == [Cancel("b")]
    table.deliver([TokenEvent("b", None, CANCELLED), TokenEvent("c", 9)])
    assert drain(one) == [] and drain(two) == [[Tokens("c", (9,))]]
    assert len(table) == 1


def test_the_servicer_sends_one_message_per_list_with_the_errors_status_code():
    single = _message([Tokens("a", (1,))])
    assert single.WhichOneof("kind") == "tokens" and list(single.tokens.token_ids) == [1]
    many = _message([Tokens("a", (2,)), Finished("a", None, 3, 2, "boom"),
                     Rejected("b", DuplicateRequestError("dup"))])
    assert many.WhichOneof("kind") == "batch"
    _, fin, rej = many.batch.events
    assert fin.finished.reason == common_pb2.FINISH_REASON_ERROR and fin.finished.error == "boom"
    assert (fin.finished.prompt_tokens, fin.finished.completion_tokens) == (3, 2)
    assert rej.rejected.code == grpc.StatusCode.ALREADY_EXISTS.value[0] and rej.rejected.message == "dup"


def test_a_request_the_worker_lets_go_of_after_tokens_is_rejected_unavailable_so_it_continues_elsewhere():
    """Leaving its mesh (SIGTERM) or evicted, the worker gives back what it holds as Rejected
    UNAVAILABLE, tokens or not: the gateway resubmits each elsewhere from the tokens it has."""
    engine = EngineInbox()
    table = engine.table()
    stream = table.open_stream()
    table.submit(stream, item("streaming"))
    table.deliver([TokenEvent("streaming", 40), TokenEvent("streaming", 41)])
    leaving = UnavailableError("worker rank 1 is shutting down")
    table.deliver([EngineRejected("streaming", leaving)])
    assert drain(stream)[-1] == [Rejected("streaming", leaving)]
    (message,) = [_message([Rejected("streaming", leaving)])]
    assert message.rejected.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert len(table) == 0


def test_an_engine_error_for_one_request_is_finished_error_with_its_message_and_others_go_on():
    """FinishReason.ERROR (the engine failed that request alone, e.g. non-finite logits) is
    Finished{ERROR, error} on the wire (`_message`), before or after tokens: resending would fail
    the same way. The other request of the step gets its token."""
    engine = EngineInbox()
    table = engine.table()
    stream = table.open_stream()
    for rid in ("a", "b", "c"):
        table.submit(stream, item(rid))
    table.deliver([TokenEvent("a", 5), TokenEvent("c", None, FinishReason.ERROR, "logits not finite")])
    table.deliver([TokenEvent("a", None, FinishReason.ERROR, "boom"), TokenEvent("b", 7)])
    first, second = drain(stream)
    assert first == [Tokens("a", (5,)), Finished("c", None, 3, 0, "logits not finite")]
    assert second == [Finished("a", None, 3, 1, "boom"), Tokens("b", (7,))]
    wire = _message(second).batch.events[0].finished
    assert (wire.reason, wire.error, wire.completion_tokens) == (common_pb2.FINISH_REASON_ERROR, "boom", 1)
    assert len(table) == 1  # only b is still live
