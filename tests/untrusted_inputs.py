"""Untrusted inputs for tests/test_untrusted.py: the strategies (random bytes, mutated valid
messages, random field values, Tensor messages, HTTP bodies and headers), the valid seeds of every
method (with the neutralised forms of the calls that change the mesh) and the senders that assert
every answer is typed. The mesh itself is test_untrusted.py's fixture."""

from __future__ import annotations

import http.client
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import grpc
import torch
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from coordinator.membership import Membership
from coordinator.wire import worker_info
from moemesh.errors import InvalidRequestError
from moemesh.launch import Mesh
from moemesh.tensor_wire import PROTO_TO_DTYPE, to_proto
from moemesh.v1 import common_pb2, coordinator_pb2, gateway_pb2, worker_pb2

CALL_S = 10.0  # hang bound of one fuzzed call (a mutated valid Generate makes at most 32 tokens)
MAX_NEW_TOKENS_LIMIT = 32
UNTYPED = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
PROMPT = [5, 6, 7, 8, 9]
FUZZ_WORKER = "fuzz-worker"
TRIED: Counter[str] = Counter()


def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=True)


@dataclass(frozen=True)
class Fuzzed:
    mesh: Mesh
    key: str
    workers: tuple[str, ...]  # the workers' gRPC addresses
    generation: int
    placement: coordinator_pb2.GetPlacementResponse

    @property
    def bearer(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.key}"),)




def call_unary(ch: grpc.Channel, method: str, request, reply_type, metadata=()):
    return ch.unary_unary(method, request_serializer=lambda m: m.SerializeToString(),
                          response_deserializer=reply_type.FromString)(request, timeout=CALL_S, metadata=metadata)




# --- answers ------------------------------------------------------------------------------------


def _typed(exc: grpc.RpcError, what: str) -> grpc.StatusCode:
    code = exc.code()
    assert code not in UNTYPED, f"{what}: untyped answer {code.name}: {exc.details()}"
    return code


def _check_rejection(method: str, reply: bytes) -> None:
    """A worker's Rejected event carries a status code number: typed too."""
    if not method.startswith("/moemesh.v1.Worker/Serve"):
        return
    event = worker_pb2.WorkerEvent.FromString(reply)
    events = event.batch.events if event.WhichOneof("kind") == "batch" else [event]
    for e in events:
        if e.WhichOneof("kind") == "rejected":
            assert e.rejected.code not in (2, 13), f"untyped rejection: {e.rejected}"


def is_valid_registration(method: str, payload: bytes) -> bool:
    """A RegisterWorker the coordinator would admit (the same rules, in process): a legitimate change
    of the mesh in plaintext mode (no cluster credential), so the campaign never sends one."""
    if not method.endswith("/RegisterWorker"):
        return False
    try:
        Membership(1).admit(worker_info(coordinator_pb2.RegisterWorkerRequest.FromString(payload)))
    except (DecodeError, InvalidRequestError):
        return False
    return True


def send_raw(ch: grpc.Channel, method: str, kind: str, payload: bytes, timeout: float, metadata=()) -> None:
    """`payload` to `method` unparsed (identity serializers); asserts the answer is typed."""
    if is_valid_registration(method, payload):
        TRIED["RegisterWorker valid, not sent"] += 1
        return
    TRIED[method] += 1
    try:
        if kind == "unary":
            ch.unary_unary(method)(payload, timeout=timeout, metadata=metadata)
            return
        if kind == "stream":
            call = ch.unary_stream(method)(payload, timeout=timeout, metadata=metadata)
        else:
            call = ch.stream_stream(method)(iter([payload]), timeout=timeout, metadata=metadata)
        for i, reply in enumerate(call):
            _check_rejection(method, reply)
            if i >= 2 * MAX_NEW_TOKENS_LIMIT:  # a watch never ends by itself
                call.cancel()
                return
    except grpc.RpcError as exc:
        _typed(exc, method)


def mutated(seed: bytes) -> st.SearchStrategy[bytes]:
    """`seed` with a few bytes flipped, inserted or deleted."""
    edit = st.tuples(st.sampled_from(("flip", "insert", "delete")), st.integers(0, max(0, len(seed))),
                     st.integers(0, 255))
    return st.lists(edit, min_size=1, max_size=4).map(lambda edits: _apply(seed, edits))


def _apply(seed: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    data = bytearray(seed)
    for op, at, value in edits:
        at = min(at, len(data))
        if op == "insert" or not data:
            data.insert(at, value)
        elif op == "flip":
            data[min(at, len(data) - 1)] ^= value or 1
        else:
            del data[min(at, len(data) - 1)]
    return bytes(data)


def payloads(*seeds: bytes) -> st.SearchStrategy[bytes]:
    """Random bytes, or a mutation of a valid message."""
    return st.one_of(st.binary(max_size=96), *(mutated(s) for s in seeds))


# --- seeds: valid messages (see the module docstring for the neutralised ones) --------------------


def _sampling(**kw) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(max_new_tokens=4, ignore_eos=True, **kw)


def gateway_seeds() -> dict[str, tuple[str, float, list[bytes]]]:
    one = gateway_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=PROMPT), sampling=_sampling())
    text = gateway_pb2.GenerateRequest(text="héllo wörld", sampling=_sampling(temperature=0.7, top_p=0.9, seed=3),
                                       include_text=True)
    batch = gateway_pb2.GenerateBatchRequest(requests=[one, text])
    return {
        "/moemesh.v1.Gateway/Generate": ("stream", CALL_S, [one.SerializeToString(), text.SerializeToString()]),
        "/moemesh.v1.Gateway/GenerateBatch": ("stream", CALL_S, [batch.SerializeToString()]),
        "/moemesh.v1.Gateway/ModelInfo": ("unary", CALL_S, [b""]),
        "/grpc.health.v1.Health/Check": ("unary", CALL_S, [b"\n\x12moemesh.v1.Gateway"]),
    }


def coordinator_seeds(f: Fuzzed) -> dict[str, tuple[str, float, list[bytes]]]:
    pb = coordinator_pb2
    who: dict[str, Any] = {"worker_id": FUZZ_WORKER, "incarnation": 7}
    counts = to_proto(torch.zeros(2, 8, dtype=torch.int64))
    blocked = pb.Placement()
    blocked.CopyFrom(f.placement.placement)
    blocked.epoch, blocked.world_generation = 7, f.generation + 1000
    seeds = {
        "RegisterWorker": ("unary", pb.RegisterWorkerRequest(address="127.0.0.1:1:", device="cpu", node="n", **who)),
        "Heartbeat": ("unary", pb.HeartbeatRequest(world_generation=f.generation, **who)),
        "ReportLoad": ("unary", pb.ReportLoadRequest(rank=0, world_generation=f.generation, window_tokens=4,
                                                     expert_counts=counts, link_counts=counts, **who)),
        "WatchPlacement": ("stream", pb.WatchPlacementRequest(after_epoch=1)),
        "GetPlacement": ("unary", pb.GetPlacementRequest(epoch=1)),
        "SetPlacement": ("unary", pb.SetPlacementRequest(placement=blocked,
                                                         expected_epoch=f.placement.placement.epoch + 1000)),
        "WaitForWorld": ("unary", pb.WaitForWorldRequest(after_generation=f.generation, **who)),
        "ReportWorldLost": ("unary", pb.ReportWorldLostRequest(world_generation=f.generation, reason="x", **who)),
        "LeaveWorld": ("unary", pb.LeaveWorldRequest(**who)),
    }
    # WaitForWorld answers DEADLINE_EXCEEDED a second before its caller's deadline: give it none to wait.
    waits = {"WaitForWorld": 0.5, "WatchPlacement": 1.0}
    return {f"/moemesh.v1.Coordinator/{name}": (kind, waits.get(name, CALL_S), [msg.SerializeToString()])
            for name, (kind, msg) in seeds.items()}


def worker_seeds() -> dict[str, tuple[str, float, list[bytes]]]:
    submit = worker_pb2.WorkerRequest(submit=worker_pb2.WorkerRequest.Submit(
        request_id="fuzz-1", prompt_token_ids=PROMPT, sampling=_sampling(), generated_token_ids=[3]))
    cancel = worker_pb2.WorkerRequest(cancel=worker_pb2.WorkerRequest.Cancel(request_id="fuzz-1"))
    return {
        "/moemesh.v1.Worker/Serve": ("bidi", CALL_S, [submit.SerializeToString(), cancel.SerializeToString()]),
        "/moemesh.v1.Worker/Status": ("unary", CALL_S, [b""]),
    }




# Field values through the real message classes: every value the wire can carry.
U32, U64 = st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)
FLOATS = st.floats(width=32, allow_nan=True, allow_infinity=True)
SAMPLING = st.builds(common_pb2.SamplingParams, temperature=FLOATS, top_p=FLOATS, top_k=U32, seed=st.none() | U64,
                     max_new_tokens=st.sampled_from([0, 1, 4, MAX_NEW_TOKENS_LIMIT + 1]) | U32,
                     stop_token_ids=st.lists(U32, max_size=3), ignore_eos=st.booleans())
GENERATE = st.builds(
    gateway_pb2.GenerateRequest, sampling=SAMPLING, request_id=st.text(max_size=8), include_text=st.booleans(),
).flatmap(lambda r: st.one_of(st.text(max_size=24), st.lists(U32 | st.integers(0, 600), max_size=6)).map(
    lambda p: _with_prompt(r, p)))


def _with_prompt(request: gateway_pb2.GenerateRequest, prompt: str | list[int]) -> gateway_pb2.GenerateRequest:
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    return request




# --- Tensor messages ----------------------------------------------------------------------------

TENSORS = st.builds(
    common_pb2.Tensor,
    dtype=st.sampled_from(sorted(PROTO_TO_DTYPE)) | st.integers(-5, 40),
    shape=st.lists(st.integers(-3, 9) | st.integers(-(2**63), 2**63 - 1), max_size=4),
    data=st.binary(max_size=80),
)




# --- HTTP ---------------------------------------------------------------------------------------

ROUTES = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
          ("GET", "/health"), ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/metrics"),
          ("POST", "/v1/models"), ("GET", "/nowhere")]
VALID_BODIES: dict[str, dict[str, Any]] = {
    "/v1/completions": {"model": "model", "prompt": "hello", "max_tokens": 4, "temperature": 0},
    "/v1/chat/completions": {"model": "model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                             "stream": True},
    "/tokenize": {"model": "model", "prompt": "hello"},
    "/detokenize": {"model": "model", "tokens": [5, 6, 7]},
}
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(10**300, 10**400) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _wrong_typed(path: str) -> st.SearchStrategy[bytes]:
    """A valid body with one field replaced by any JSON value."""
    body = VALID_BODIES.get(path, {"model": "model"})
    return st.tuples(st.sampled_from(sorted(body)), JSON).map(
        lambda kv: json.dumps({**body, kv[0]: kv[1]}).encode())


def nested_json(depth: int) -> bytes:
    return ("[" * depth + "]" * depth).encode() if depth % 2 else ('{"a":' * depth + "1" + "}" * depth).encode()


def http_bodies(path: str) -> st.SearchStrategy[bytes]:
    valid = json.dumps(VALID_BODIES.get(path, {})).encode()
    return st.one_of(
        st.binary(max_size=64), JSON.map(lambda v: json.dumps(v).encode()), mutated(valid), _wrong_typed(path),
        st.sampled_from([10, 1000, 100_000]).map(nested_json), st.just(valid),
    )


HEADER_VALUE = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)


@dataclass(frozen=True)
class HttpCase:
    method: str
    path: str
    body: bytes
    headers: dict[str, str]


def http_cases(key: str) -> st.SearchStrategy[HttpCase]:
    def case(route: tuple[str, str]) -> st.SearchStrategy[HttpCase]:
        method, path = route
        auth = st.sampled_from([f"Bearer {key}"]) | HEADER_VALUE | st.just(f"Bearer {key}x") | st.just("")
        headers = st.fixed_dictionaries(
            {"Authorization": auth},
            optional={"Content-Type": st.sampled_from(["application/json", "text/plain", "x/y; charset=nope"])
                      | HEADER_VALUE, "Accept": HEADER_VALUE, "X-Fuzz": HEADER_VALUE})
        return st.builds(HttpCase, st.just(method), st.just(path), http_bodies(path), headers)

    return st.sampled_from(ROUTES).flatmap(case)


def http_send(address: str, case: HttpCase) -> int:
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=CALL_S)
    try:
        conn.request(case.method, case.path, body=case.body, headers=case.headers)
        reply = conn.getresponse()
        reply.read()
        return reply.status
    finally:
        conn.close()
