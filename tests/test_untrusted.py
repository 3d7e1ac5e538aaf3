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
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import expert_worker.server  # noqa: F401  (the mesh runs it: a broken import fails here, never a skip)
from moemesh.auth import new_key
from moemesh.engine.engine import Engine, generate
from moemesh.engine.sampling import SamplingParams
from moemesh.errors import InvalidRequestError
from moemesh.model.config import load_config
from moemesh.model.decoder import RuntimeShape, build_model
from moemesh.rpc import channel
from moemesh.tensor_wire import from_proto, to_proto
from moemesh.v1 import common_pb2, coordinator_pb2, gateway_pb2, gateway_pb2_grpc, worker_pb2
from tests.gateway.mesh import running_mesh
from tests.untrusted_inputs import (
    CALL_S,
    FUZZ_WORKER,
    GENERATE,
    MAX_NEW_TOKENS_LIMIT,
    PROMPT,
    SAMPLING,
    TENSORS,
    TRIED,
    U32,
    Fuzzed,
    HttpCase,
    call_unary,
    coordinator_seeds,
    fuzz_settings,
    gateway_seeds,
    http_cases,
    http_send,
    nested_json,
    payloads,
    send_raw,
    worker_seeds,
)

pytestmark = pytest.mark.slow  # starts a mesh of real processes

@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    tmp = tmp_path_factory.mktemp("fuzz")
    key, line = new_key()
    (tmp / "keys").write_text(line + "\n")
    flags = ("--max-inflight", "256", "--max-new-tokens-limit", str(MAX_NEW_TOKENS_LIMIT),
             "--api-keys-file", str(tmp / "keys"))
    with running_mesh(tmp, gateway_flags=flags) as m, grpc.insecure_channel(m.coordinator) as ch:
        world = call_unary(ch, "/moemesh.v1.Coordinator/WaitForWorld", coordinator_pb2.WaitForWorldRequest(),
                      coordinator_pb2.World)
        placement = call_unary(ch, "/moemesh.v1.Coordinator/GetPlacement", coordinator_pb2.GetPlacementRequest(),
                          coordinator_pb2.GetPlacementResponse)
        yield Fuzzed(m, key, tuple(w.address for w in world.members), world.generation, placement)
        m.check_alive()


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
            case = HttpCase("POST", path, nested_json(depth), {"Authorization": f"Bearer {fuzzed.key}"})
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
        world = call_unary(ch, "/moemesh.v1.Coordinator/WaitForWorld", coordinator_pb2.WaitForWorldRequest(),
                      coordinator_pb2.World)
        now = call_unary(ch, "/moemesh.v1.Coordinator/GetPlacement", coordinator_pb2.GetPlacementRequest(),
                    coordinator_pb2.GetPlacementResponse)
    assert world.generation == fuzzed.generation
    assert now.placement.epoch == fuzzed.placement.placement.epoch
    assert tuple(m.address for m in world.members) == fuzzed.workers
    fuzzed.mesh.check_alive()
    print(f"\nfuzz campaign: {sum(TRIED.values())} inputs tried: "
          + ", ".join(f"{name} {n}" for name, n in sorted(TRIED.items())))

