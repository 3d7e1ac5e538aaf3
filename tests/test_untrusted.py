"""Untrusted clients (issue 13): the fuzz campaign and the overload test, against ONE real mesh
(coordinator + 2 gloo workers + gateway with its HTTP API, API keys and --max-inflight 256,
subprocesses on loopback), nothing mocked.

Every input gets a typed answer: a gRPC status other than UNKNOWN or INTERNAL (grpc's codes for an
unhandled exception), an HTTP status below 500; no service exits; afterwards a valid request still
gets the reference tokens, and the world and the placement are the ones from before. Hypothesis runs
derandomized (the same inputs on every run) with fixed example counts, so CI is reproducible and the
campaign stays bounded (about 40 s on 2 cores); the number of inputs tried is printed.

Methods that legitimately change the mesh are neutralised, not skipped. Plaintext mode has no
cluster credential, so a well-formed RegisterWorker is a legitimate new member: the campaign checks
each RegisterWorker payload in process with the coordinator's own rules (Membership.admit) and
never sends one they would admit (counted as "not sent"); every other one must be refused. The
other worker calls' seeds name a worker id that is no member ("fuzz-worker", incarnation 7), so a
mutation would have to rewrite it into a member's id to act on the world; SetPlacement's seed is the current
placement with three independent guards broken (epoch 7 where 0 is required, a world generation
and an expected epoch 1000 ahead), so no few-byte mutation makes it a valid admin call. The final
check that the world generation and the placement epoch are unchanged keeps that honest.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import expert_worker.server  # noqa: F401  (the mesh runs it: a broken import fails here, never a skip)
from coordinator.membership import Membership
from coordinator.wire import worker_info
from moemesh.auth import new_key
from moemesh.engine.engine import Engine, generate
from moemesh.engine.sampling import SamplingParams
from moemesh.errors import InvalidRequestError
from moemesh.launch import Mesh
from moemesh.model.config import load_config
from moemesh.model.decoder import RuntimeShape, build_model
from moemesh.rpc import channel
from moemesh.tensor_wire import PROTO_TO_DTYPE, from_proto, to_proto
from moemesh.v1 import common_pb2, coordinator_pb2, gateway_pb2, gateway_pb2_grpc, worker_pb2
from tests.gateway.mesh import running_mesh

pytestmark = pytest.mark.slow  # starts a mesh of real processes

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


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    tmp = tmp_path_factory.mktemp("fuzz")
    key, line = new_key()
    (tmp / "keys").write_text(line + "\n")
    flags = ("--max-inflight", "256", "--max-new-tokens-limit", str(MAX_NEW_TOKENS_LIMIT),
             "--api-keys-file", str(tmp / "keys"))
    with running_mesh(tmp, gateway_flags=flags) as m, grpc.insecure_channel(m.coordinator) as ch:
        world = _call(ch, "/moemesh.v1.Coordinator/WaitForWorld", coordinator_pb2.WaitForWorldRequest(),
                      coordinator_pb2.World)
        placement = _call(ch, "/moemesh.v1.Coordinator/GetPlacement", coordinator_pb2.GetPlacementRequest(),
                          coordinator_pb2.GetPlacementResponse)
        yield Fuzzed(m, key, tuple(w.address for w in world.members), world.generation, placement)
        m.check_alive()


def _call(ch: grpc.Channel, method: str, request, reply_type, metadata=()):
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


# --- the campaign -------------------------------------------------------------------------------


def _campaign(target: str, seeds: dict[str, tuple[str, float, list[bytes]]], examples: int, metadata=()) -> None:
    methods = sorted(seeds)
    with grpc.insecure_channel(target) as ch:

        @fuzz_settings(examples)
        @given(st.sampled_from(methods).flatmap(lambda m: st.tuples(st.just(m), payloads(*seeds[m][2]))))
        def one(case: tuple[str, bytes]) -> None:
            method, payload = case
            kind, timeout, _ = seeds[method]
            send_raw(ch, method, kind, payload, timeout, metadata)

        for method in methods:  # every method at least with its valid seeds
            for seed in seeds[method][2]:
                send_raw(ch, method, seeds[method][0], seed, seeds[method][1], metadata)
        one()


def test_gateway_grpc_answers_random_and_mutated_messages_with_typed_statuses(fuzzed):
    _campaign(fuzzed.mesh.gateway, gateway_seeds(), 150, fuzzed.bearer)
    fuzzed.mesh.check_alive()


def test_coordinator_answers_random_and_mutated_messages_with_typed_statuses(fuzzed):
    _campaign(fuzzed.mesh.coordinator, coordinator_seeds(fuzzed), 200)
    fuzzed.mesh.check_alive()


def test_workers_answer_random_and_mutated_messages_with_typed_statuses(fuzzed):
    for address in fuzzed.workers:
        _campaign(address, worker_seeds(), 60)
    fuzzed.mesh.check_alive()


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


def test_random_field_values_through_the_message_classes_get_typed_statuses(fuzzed):
    method = "/moemesh.v1.Gateway/Generate"
    with grpc.insecure_channel(fuzzed.mesh.gateway) as ch:

        @fuzz_settings(120)
        @given(GENERATE)
        def one(request: gateway_pb2.GenerateRequest) -> None:
            send_raw(ch, method, "stream", request.SerializeToString(), CALL_S, fuzzed.bearer)

        one()
    with grpc.insecure_channel(fuzzed.workers[0]) as ch:

        @fuzz_settings(60)
        @given(st.builds(worker_pb2.WorkerRequest.Submit, request_id=st.text(max_size=8),
                         prompt_token_ids=st.lists(U32 | st.integers(0, 600), max_size=5), sampling=SAMPLING,
                         generated_token_ids=st.lists(U32 | st.integers(0, 600), max_size=3)))
        def submit(msg: worker_pb2.WorkerRequest.Submit) -> None:
            request = worker_pb2.WorkerRequest(submit=msg)
            send_raw(ch, "/moemesh.v1.Worker/Serve", "bidi", request.SerializeToString(), CALL_S)

        submit()
    fuzzed.mesh.check_alive()


# --- Tensor messages ----------------------------------------------------------------------------

TENSORS = st.builds(
    common_pb2.Tensor,
    dtype=st.sampled_from(sorted(PROTO_TO_DTYPE)) | st.integers(-5, 40),
    shape=st.lists(st.integers(-3, 9) | st.integers(-(2**63), 2**63 - 1), max_size=4),
    data=st.binary(max_size=80),
)


@fuzz_settings(400)
@given(TENSORS)
def test_any_tensor_message_decodes_exactly_or_is_invalid_argument(msg: common_pb2.Tensor):
    """In process: the codec itself. A message either decodes to a tensor whose encoding is the
    message (lengths that lie never pass) or raises InvalidRequestError."""
    TRIED["tensor_wire.from_proto"] += 1
    try:
        t = from_proto(msg)
    except InvalidRequestError:
        return
    back = to_proto(t)
    assert (back.dtype, list(back.shape)) == (msg.dtype, list(msg.shape))
    if t.dtype != torch.bool:
        assert back.data == msg.data
    assert len(back.data) == len(msg.data)


def test_random_tensors_in_load_reports_get_typed_statuses(fuzzed):
    """Over the wire: the coordinator decodes ReportLoad's tensors before it looks at the sender."""
    method = "/moemesh.v1.Coordinator/ReportLoad"
    with grpc.insecure_channel(fuzzed.mesh.coordinator) as ch:

        @fuzz_settings(80)
        @given(TENSORS, st.none() | TENSORS)
        def one(counts: common_pb2.Tensor, links: common_pb2.Tensor | None) -> None:
            request = coordinator_pb2.ReportLoadRequest(worker_id=FUZZ_WORKER, incarnation=7, expert_counts=counts)
            if links is not None:
                request.link_counts.CopyFrom(links)
            send_raw(ch, method, "unary", request.SerializeToString(), CALL_S)

        one()


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


def _nested(depth: int) -> bytes:
    return ("[" * depth + "]" * depth).encode() if depth % 2 else ('{"a":' * depth + "1" + "}" * depth).encode()


def http_bodies(path: str) -> st.SearchStrategy[bytes]:
    valid = json.dumps(VALID_BODIES.get(path, {})).encode()
    return st.one_of(
        st.binary(max_size=64), JSON.map(lambda v: json.dumps(v).encode()), mutated(valid), _wrong_typed(path),
        st.sampled_from([10, 1000, 100_000]).map(_nested), st.just(valid),
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


def test_http_answers_random_bodies_and_headers_never_with_500(fuzzed):
    statuses: Counter[int] = Counter()

    @fuzz_settings(300)
    @given(http_cases(fuzzed.key))
    def one(case: HttpCase) -> None:
        TRIED[f"HTTP {case.method} {case.path}"] += 1
        status = http_send(fuzzed.mesh.http, case)
        statuses[status] += 1
        assert status != 500, f"{case.method} {case.path} answered {status} to {case.body[:200]!r} {case.headers}"

    one()
    assert statuses[200] and statuses[401] and statuses[400], statuses  # the campaign reached past each gate
    fuzzed.mesh.check_alive()


def test_a_deeply_nested_body_is_400_not_a_traceback(fuzzed):
    """Found by this campaign: json's decoder raises RecursionError (not ValueError) on deep nesting."""
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        for depth in (1000, 1001, 100_000):
            case = HttpCase("POST", path, _nested(depth), {"Authorization": f"Bearer {fuzzed.key}"})
            assert http_send(fuzzed.mesh.http, case) == 400, (path, depth)


# --- overload (issue 13, Deliver item 6) -------------------------------------------------------

STREAMS = 2000  # concurrent Generate streams against --max-inflight 256
HTTP_REQUESTS = 400
OVERLOAD_TOKENS = 4
LEAK_BOUND = 256 * 2**20  # the gateway's RSS may grow this much over the burst: only a leak breaks it
OVERLOAD_HANG_S = 300.0  # hang bound of a whole burst


@dataclass
class Burst:
    """What the clients saw: completed token lists, refusal codes (or HTTP statuses), and for each
    refusal how long after its call started it came (clock differences: reported, never compared)."""

    tokens: list[list[int]]
    refused: Counter
    refusal_times: list[float]
    completion_times: list[float]
    rss_before: int
    rss_peak: int
    rss_after: int

    def summary(self, what: str) -> str:
        times, done = sorted(self.refusal_times) or [0.0], sorted(self.completion_times) or [0.0]
        return (f"{what}: {len(self.tokens)} completed, refused {dict(self.refused)}; time to a refusal: first "
                f"{1e3 * times[0]:.0f} ms, "
                f"median {1e3 * times[len(times) // 2]:.0f} ms, max {1e3 * times[-1]:.0f} ms; to a completion "
                f"median {1e3 * done[len(done) // 2]:.0f} ms, max {1e3 * done[-1]:.0f} ms; gateway RSS "
                f"{self.rss_before / 2**20:.0f} MiB before, {self.rss_peak / 2**20:.0f} MiB peak, "
                f"{self.rss_after / 2**20:.0f} MiB after")


async def _sampling_rss(pid: int, stop: asyncio.Event) -> int:
    process, peak = psutil.Process(pid), 0
    while not stop.is_set():
        peak = max(peak, process.memory_info().rss)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.02)
    return peak


async def _burst(f: Fuzzed, calls: Callable[[], Awaitable[list[tuple[str, object, float]]]]) -> Burst:
    process = psutil.Process(f.mesh.procs["gateway"].pid)
    before = process.memory_info().rss
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sampling_rss(process.pid, stop))
    outcomes = await asyncio.wait_for(calls(), OVERLOAD_HANG_S)  # hang bound
    stop.set()
    peak = await sampler
    burst = Burst([], Counter(), [], [], before, peak, process.memory_info().rss)
    for kind, value, took in outcomes:
        if kind == "ok":
            burst.tokens.append(value)  # type: ignore[arg-type]
            burst.completion_times.append(took)
        else:
            burst.refused[value] += 1
            burst.refusal_times.append(took)
    return burst


async def _grpc_streams(f: Fuzzed) -> list[tuple[str, object, float]]:
    request = gateway_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=PROMPT), sampling=common_pb2.SamplingParams(
        max_new_tokens=OVERLOAD_TOKENS, ignore_eos=True))

    async def one(stub: gateway_pb2_grpc.GatewayStub) -> tuple[str, object, float]:
        started = time.monotonic()
        ids: list[int] = []
        try:
            async for msg in stub.Generate(request, timeout=OVERLOAD_HANG_S, metadata=f.bearer):
                ids.extend(msg.chunk.token_ids)
        except grpc.aio.AioRpcError as exc:
            return "refused", exc.code().name, time.monotonic() - started
        return "ok", ids, time.monotonic() - started

    async with channel(f.mesh.gateway) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        return await asyncio.gather(*(one(stub) for _ in range(STREAMS)))


def test_2000_streams_against_256_admitted_get_fast_refusals_and_the_rest_complete(fuzzed):
    burst = asyncio.run(_burst(fuzzed, lambda: _grpc_streams(fuzzed)))
    print("\n" + burst.summary(f"overload gRPC, {STREAMS} streams, --max-inflight 256"))
    reference = local_greedy(fuzzed.mesh.model_dir, PROMPT, OVERLOAD_TOKENS)
    assert len(burst.tokens) + sum(burst.refused.values()) == STREAMS
    assert set(burst.refused) == {"RESOURCE_EXHAUSTED"}, burst.refused  # the excess: refused, nothing else
    assert len(burst.tokens) >= 256  # a refusal means 256 were in flight, and each admitted one completed:
    assert all(ids == reference for ids in burst.tokens)
    assert burst.rss_after - burst.rss_before < LEAK_BOUND
    fuzzed.mesh.check_alive()


async def _http_requests(f: Fuzzed) -> list[tuple[str, object, float]]:
    host, port = f.mesh.http.rsplit(":", 1)
    body = json.dumps({"model": "model", "prompt": PROMPT, "max_tokens": OVERLOAD_TOKENS, "temperature": 0,
                       "ignore_eos": True}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {f.key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()

    async def one() -> tuple[str, object, float]:
        started = time.monotonic()
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(head + body)
            reply = await reader.read()
        finally:
            writer.close()
        status = int(reply.split(b" ", 2)[1])
        if status != 200:
            return "refused", status, time.monotonic() - started
        completion = json.loads(reply.split(b"\r\n\r\n", 1)[1])
        return "ok", completion["choices"][0]["text"], time.monotonic() - started

    return await asyncio.gather(*(one() for _ in range(HTTP_REQUESTS)))


def test_an_http_flood_gets_429s_for_the_excess_and_the_rest_complete(fuzzed):
    burst = asyncio.run(_burst(fuzzed, lambda: _http_requests(fuzzed)))
    print("\n" + burst.summary(f"overload HTTP, {HTTP_REQUESTS} requests, --max-inflight 256"))
    assert len(burst.tokens) + sum(burst.refused.values()) == HTTP_REQUESTS
    assert set(burst.refused) == {429}, burst.refused  # the excess: refused, nothing else
    assert len(set(map(str, burst.tokens))) == 1  # greedy: every completed request has the same text
    assert burst.rss_after - burst.rss_before < LEAK_BOUND
    fuzzed.mesh.check_alive()


# --- afterwards ---------------------------------------------------------------------------------


def local_greedy(model_dir: Path, prompt: list[int], n: int) -> list[int]:
    """The same checkpoint in this process (all experts local): the reference tokens."""
    cfg = load_config(model_dir)
    model = build_model(model_dir, RuntimeShape(max_seqs=1, max_model_len=min(cfg.max_position_embeddings, 256)))
    return generate(Engine(model), [prompt], SamplingParams(max_new_tokens=n, ignore_eos=True))[0]


def generate_ids(f: Fuzzed, prompt: list[int], n: int) -> list[int]:
    request = gateway_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=prompt),
                                          sampling=common_pb2.SamplingParams(max_new_tokens=n, ignore_eos=True))
    ids: list[int] = []
    with grpc.insecure_channel(f.mesh.gateway) as ch:
        call = ch.unary_stream("/moemesh.v1.Gateway/Generate", request_serializer=lambda m: m.SerializeToString(),
                               response_deserializer=gateway_pb2.GenerateResponse.FromString)
        for msg in call(request, timeout=CALL_S * 6, metadata=f.bearer):
            if msg.WhichOneof("event") == "chunk":
                ids.extend(msg.chunk.token_ids)
            else:
                assert msg.finished.reason == common_pb2.FINISH_REASON_LENGTH, msg
    return ids


def test_afterwards_the_mesh_is_the_same_and_serves_the_reference_tokens(fuzzed):
    n = MAX_NEW_TOKENS_LIMIT
    assert generate_ids(fuzzed, PROMPT, n) == local_greedy(fuzzed.mesh.model_dir, PROMPT, n)
    with grpc.insecure_channel(fuzzed.mesh.coordinator) as ch:
        world = _call(ch, "/moemesh.v1.Coordinator/WaitForWorld", coordinator_pb2.WaitForWorldRequest(),
                      coordinator_pb2.World)
        now = _call(ch, "/moemesh.v1.Coordinator/GetPlacement", coordinator_pb2.GetPlacementRequest(),
                    coordinator_pb2.GetPlacementResponse)
    assert world.generation == fuzzed.generation
    assert now.placement.epoch == fuzzed.placement.placement.epoch
    assert tuple(m.address for m in world.members) == fuzzed.workers
    fuzzed.mesh.check_alive()
    print(f"\nfuzz campaign: {sum(TRIED.values())} inputs tried: "
          + ", ".join(f"{name} {n}" for name, n in sorted(TRIED.items())))

