"""Generate and GenerateBatch through the real gateway servicer (real gRPC on loopback, in-process)
in front of scripted workers: coalesced chunks, one token count, and the failure rule (before
the first token: the call fails with the status; after: Finished{ERROR})."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import pytest

from gateway.coordinator_client import CoordinatorClient
from gateway.events import Tokens
from gateway.generation import coalesce
from gateway.served_model import ServedModel
from gateway.servicer import GatewayServicer
from moemesh import rpc
from moemesh.engine.sampling import SamplingParams
from moemesh.engine.sampling_wire import sampling_to_proto
from moemesh.model.tiny import TinySpec, write_tiny_model
from moemesh.text import StreamDecoder, TextCodec
from moemesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.gateway.scripted import (
    BREAK,
    HANG_BOUND_S,
    ScriptedWorker,
    batch,
    finished,
    rejected,
    scripted_pool,
    tokens,
)

SPEC = TinySpec(hidden=64, intermediate=64, layers=2, experts=8, heads=4, kv_heads=2, vocab=512,
                max_position_embeddings=256)
LENGTH, ERROR = common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_ERROR


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> ServedModel:
    ckpt = write_tiny_model(tmp_path_factory.mktemp("generation") / "tiny", SPEC)
    return ServedModel(Path(ckpt), max_model_len=256, max_new_tokens_limit=100, default_max_new_tokens=16)


@contextlib.asynccontextmanager
async def gateway(model: ServedModel, workers: Sequence[ScriptedWorker], max_inflight: int = 16,
                  **pool_settings) -> AsyncIterator[gateway_pb2_grpc.GatewayStub]:
    """The gateway servicer on a loopback port, its pool connected to `workers`; a stub to it."""
    async with gateway_channel(model, workers, max_inflight, **pool_settings) as ch:
        yield gateway_pb2_grpc.GatewayStub(ch)


@contextlib.asynccontextmanager
async def gateway_channel(model: ServedModel, workers: Sequence[ScriptedWorker], max_inflight: int = 16,
                          **pool_settings) -> AsyncIterator[grpc.aio.Channel]:
    """`gateway`, as a channel to it (for raw bytes no client would serialize)."""
    async with scripted_pool(workers, max_inflight, **pool_settings) as pool:
        coordinator = CoordinatorClient("127.0.0.1:1", HANG_BOUND_S)  # ModelInfo is not called here
        server = rpc.Server(["moemesh.v1.Gateway"])
        gateway_pb2_grpc.add_GatewayServicer_to_server(GatewayServicer(model, pool, coordinator), server.grpc)
        port = await server.start("127.0.0.1", 0)
        try:
            async with rpc.channel(f"127.0.0.1:{port}") as ch:
                yield ch
        finally:
            await server.stop(0)
            await coordinator.close()


def req(*ids: int, max_new_tokens: int = 8) -> gateway_pb2.GenerateRequest:
    r = gateway_pb2.GenerateRequest()
    r.token_ids.ids.extend(ids)
    r.sampling.CopyFrom(sampling_to_proto(SamplingParams(max_new_tokens=max_new_tokens)))
    return r


def by_first_prompt_token(scripts: dict):
    """A script choosing the worker's answer by the prompt's first token."""
    return lambda s: scripts[s.prompt_token_ids[0]](s.request_id)


async def generate(stub, request) -> list[gateway_pb2.GenerateResponse]:
    return [m async for m in stub.Generate(request, timeout=HANG_BOUND_S)]


async def read_rest(call) -> list[gateway_pb2.GenerateResponse]:
    """The remaining messages of a call read with read() (iteration may not be mixed with it)."""
    messages = []
    while (msg := await call.read()) is not grpc.aio.EOF:
        messages.append(msg)
    return messages


def test_tokens_waiting_together_become_one_chunk_and_finished_counts_them(model):
    script = by_first_prompt_token({
        7: lambda rid: [batch(tokens(rid, 1), tokens(rid, 2, 3), tokens(rid, 4)), finished(rid, LENGTH, 99)],
    })

    async def scenario():
        async with gateway(model, [ScriptedWorker(0, script)]) as stub:
            return await generate(stub, req(7, 8, max_new_tokens=4))

    chunk, last = asyncio.run(scenario())
    assert list(chunk.chunk.token_ids) == [1, 2, 3, 4] and chunk.chunk.offset == 0
    fin = last.finished
    assert (fin.reason, fin.completion_tokens, fin.prompt_tokens, fin.error) == (LENGTH, 4, 2, "")
    assert fin.request_id and 0 < fin.ttft_seconds <= fin.latency_seconds


def test_coalescing_merges_each_tags_consecutive_tokens_only():
    items = [(0, Tokens((1,), 0)), (1, Tokens((5,), 0)), (0, Tokens((2, 3), 1)), (1, "end"), (1, Tokens((6,), 1))]
    assert coalesce(items) == [(0, Tokens((1, 2, 3), 0)), (1, Tokens((5,), 0)), (1, "end"), (1, Tokens((6,), 1))]


FAILURES = {
    1: lambda rid: [rejected(rid, grpc.StatusCode.INVALID_ARGUMENT, "prompt exceeds 256")],
    2: lambda rid: [rejected(rid, grpc.StatusCode.RESOURCE_EXHAUSTED, "no free slot")],
    3: lambda rid: [tokens(rid, 10), tokens(rid, 11), finished(rid, ERROR, 2, "engine blew up")],
    4: lambda rid: [tokens(rid, 10), rejected(rid, grpc.StatusCode.INTERNAL, "late refusal")],
    5: lambda rid: [finished(rid, LENGTH)],
}


def test_a_failure_before_the_first_token_fails_generate_with_its_status(model):
    async def scenario():
        async with gateway(model, [ScriptedWorker(0, by_first_prompt_token(FAILURES))]) as stub:
            errors = []
            for first in (1, 2):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await generate(stub, req(first))
                errors.append(info.value)
            return errors

    invalid, exhausted = asyncio.run(scenario())
    assert invalid.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "worker rank 0" in invalid.details() and "rejected the request: prompt exceeds 256" in invalid.details()
    assert exhausted.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "no free slot" in exhausted.details()


def _with_bad_utf8(request: gateway_pb2.GenerateRequest) -> bytes:
    """`request` serialized, its text's bytes replaced by bytes that are not UTF-8."""
    return request.SerializeToString().replace(request.text.encode(), b"\xff\xfe")


def test_bad_utf8_and_a_text_over_the_byte_limit_are_invalid_argument_and_never_reach_a_worker(model):
    small = ServedModel(model.model_dir, max_model_len=256, max_new_tokens_limit=100, default_max_new_tokens=16,
                        max_prompt_bytes=64)
    worker = ScriptedWorker(0, lambda s: [finished(s.request_id, LENGTH)])
    text = gateway_pb2.GenerateRequest(text="ab")

    async def scenario():
        async with gateway_channel(small, [worker]) as ch:
            generate_raw = ch.unary_stream("/moemesh.v1.Gateway/Generate")
            batch_raw = ch.unary_stream("/moemesh.v1.Gateway/GenerateBatch")
            stub = gateway_pb2_grpc.GatewayStub(ch)
            calls = [generate_raw(_with_bad_utf8(text), timeout=HANG_BOUND_S),
                     batch_raw(gateway_pb2.GenerateBatchRequest(requests=[req(5), text]).SerializeToString()
                               .replace(b"ab", b"\xff\xfe"), timeout=HANG_BOUND_S),
                     stub.Generate(gateway_pb2.GenerateRequest(text="é" * 33), timeout=HANG_BOUND_S)]  # 66 bytes
            errors = []
            for call in calls:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    _ = [m async for m in call]
                errors.append(info.value)
            fine = await generate(stub, gateway_pb2.GenerateRequest(text="é" * 32))  # 64 bytes: within
            return errors, fine

    errors, fine = asyncio.run(scenario())
    assert [e.code() for e in errors] == [grpc.StatusCode.INVALID_ARGUMENT] * 3  # grpc alone: UNKNOWN for bad bytes
    for e in errors[:2]:
        assert "does not parse" in e.details() and "String field had bad UTF-8" in e.details()
    assert "over this gateway's limit of 64 bytes of UTF-8 (--max-prompt-bytes)" in errors[2].details()
    assert fine[-1].finished.reason == LENGTH and fine[-1].finished.prompt_tokens == 65  # BOS + 64 bytes
    assert len(worker.submits) == 1  # only the prompt within every limit reached the worker


def test_a_failure_after_tokens_is_finished_error_counting_what_was_streamed(model):
    async def scenario():
        async with gateway(model, [ScriptedWorker(0, by_first_prompt_token(FAILURES))]) as stub:
            return [await generate(stub, req(first)) for first in (3, 4)]

    for messages, error in zip(asyncio.run(scenario()), ["engine blew up", "INTERNAL: "]):
        fin = messages[-1].finished
        streamed = sum(len(m.chunk.token_ids) for m in messages[:-1])
        assert fin.reason == ERROR and error in fin.error
        assert fin.completion_tokens == streamed >= 1


def test_in_a_batch_every_failure_is_finished_error_and_the_others_run(model):
    async def scenario():
        async with gateway(model, [ScriptedWorker(0, by_first_prompt_token(FAILURES))]) as stub:
            request = gateway_pb2.GenerateBatchRequest(requests=[req(i) for i in (1, 2, 3, 5)])
            return [r async for r in stub.GenerateBatch(request, timeout=HANG_BOUND_S)]

    replies = asyncio.run(scenario())
    fins = {r.index: r.response.finished for r in replies if r.response.WhichOneof("event") == "finished"}
    assert sorted(fins) == [0, 1, 2, 3] and replies[-1].response.WhichOneof("event") == "finished"
    assert fins[0].reason == ERROR and "INVALID_ARGUMENT" in fins[0].error and fins[0].completion_tokens == 0
    assert fins[1].reason == ERROR and "RESOURCE_EXHAUSTED" in fins[1].error
    assert fins[2].reason == ERROR and fins[2].completion_tokens == 2
    assert fins[3].reason == LENGTH and fins[3].completion_tokens == 0


def test_a_lost_worker_is_unavailable_before_tokens_and_finished_error_after(model):
    """Prompt 1 waits, prompt 2 streams a token, prompt 3 breaks the worker's stream; migrations
    are off (--max-migrations 0), so the lost worker's requests fail."""
    worker = ScriptedWorker(0, by_first_prompt_token({1: lambda rid: [], 2: lambda rid: [tokens(rid, 9)],
                                                      3: lambda rid: [BREAK]}))

    async def scenario():
        async with gateway(model, [worker], max_migrations=0) as stub:
            waiting = stub.Generate(req(1), timeout=HANG_BOUND_S)
            streaming = stub.Generate(req(2), timeout=HANG_BOUND_S)
            first = await streaming.read()
            await worker.wait_for(lambda: len(worker.submits) == 2)
            breaker = stub.Generate(req(3), timeout=HANG_BOUND_S)
            rest = await read_rest(streaming)
            errors = []
            for call in (waiting, breaker):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    [m async for m in call]
                errors.append(info.value)
            return first, rest, errors

    first, rest, errors = asyncio.run(scenario())
    assert list(first.chunk.token_ids) == [9]
    (last,) = rest
    assert last.finished.reason == ERROR and last.finished.completion_tokens == 1
    assert "UNAVAILABLE" in last.finished.error and "worker rank 0" in last.finished.error
    for error in errors:
        assert error.code() == grpc.StatusCode.UNAVAILABLE and "Serve stream broke" in error.details()


def test_a_migrated_request_streams_on_without_a_duplicate_or_missing_token(model):
    """Worker 0 streams 5, 6 and then its stream breaks; worker 1 resumes after them (it is sent
    them) and streams 7, 8: the client reads 5, 6, 7, 8 at contiguous offsets, one Finished."""
    def breaking(s):
        return [tokens(s.request_id, 5), tokens(s.request_id, 6), BREAK]

    def resuming(s):
        assert list(s.generated_token_ids) == [5, 6]
        return [tokens(s.request_id, 7), tokens(s.request_id, 8), finished(s.request_id, LENGTH, 4)]

    async def scenario():
        async with gateway(model, [ScriptedWorker(0, breaking), ScriptedWorker(1, resuming)]) as stub:
            return await generate(stub, req(3, max_new_tokens=4))

    messages = asyncio.run(scenario())
    ids: list[int] = []
    for message in messages[:-1]:
        assert list(message.chunk.token_ids) and message.chunk.offset == len(ids)
        ids.extend(message.chunk.token_ids)
    fin = messages[-1].finished
    assert ids == [5, 6, 7, 8] and fin.reason == LENGTH and fin.completion_tokens == 4 and fin.error == ""


def test_the_inflight_limit_is_resource_exhausted_and_a_cancelled_call_cancels_on_the_worker(model):
    worker = ScriptedWorker(0, by_first_prompt_token({1: lambda rid: [tokens(rid, 5)],
                                                      2: lambda rid: [tokens(rid, 6), finished(rid, LENGTH)]}))

    async def scenario():
        async with gateway(model, [worker], max_inflight=1) as stub:
            running = stub.Generate(req(1), timeout=HANG_BOUND_S)
            await running.read()
            with pytest.raises(grpc.aio.AioRpcError) as full:
                await generate(stub, req(2))
            running.cancel()
            await worker.wait_for(lambda: len(worker.cancels) == 1)
            return full.value, worker.cancels, worker.submits[0].request_id

    full, cancels, running_id = asyncio.run(scenario())
    assert full.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "1 requests in flight" in full.details()
    assert cancels == [running_id]


POISONED = 13  # the token whose text the broken tokenizer below cannot make


class BrokenText(TextCodec):
    """A tokenizer with a bug: decoding POISONED raises. The real one never raises on ids in the
    vocabulary, so this stands in for such a bug; everything else is the real gateway."""

    def decode(self, ids: list[int]) -> str:
        if POISONED in ids:
            raise ValueError("no text for token 13")
        return super().decode(ids)


class BrokenTextModel(ServedModel):
    def decoder(self) -> StreamDecoder:
        return StreamDecoder(BrokenText(self.model_dir, self.config))


def test_a_detokenizing_failure_ends_only_its_request_and_cancels_it_on_the_worker(model):
    """Prompt 1 streams a good token, then POISONED, then would run on (nothing more scripted):
    it ends with Finished{ERROR} counting what was streamed, and its worker is told to cancel; in
    a batch, prompt 2 runs to its end."""
    broken = BrokenTextModel(model.model_dir, 256, 100, 16)
    worker = ScriptedWorker(0, by_first_prompt_token({
        1: lambda rid: [tokens(rid, 40), tokens(rid, POISONED)],
        2: lambda rid: [tokens(rid, 41), tokens(rid, 42), finished(rid, LENGTH, 2)],
    }))

    def texted(*ids: int) -> gateway_pb2.GenerateRequest:
        r = req(*ids)
        r.include_text = True
        return r

    async def scenario():
        async with gateway(broken, [worker]) as stub:
            single = await generate(stub, texted(1))
            await worker.wait_for(lambda: len(worker.cancels) == 1)
            request = gateway_pb2.GenerateBatchRequest(requests=[texted(1), texted(2)])
            replies = [r async for r in stub.GenerateBatch(request, timeout=HANG_BOUND_S)]
            await worker.wait_for(lambda: len(worker.cancels) == 2)
            return single, replies

    single, replies = asyncio.run(scenario())
    fin = single[-1].finished
    streamed = sum(len(m.chunk.token_ids) for m in single[:-1])
    assert fin.reason == ERROR and "could not decode tokens [" in fin.error and "13] to text" in fin.error
    assert fin.completion_tokens == streamed <= 1  # 40 alone streams, unless it arrived with 13 (coalesced)
    fins = {r.index: r.response.finished for r in replies if r.response.WhichOneof("event") == "finished"}
    assert fins[0].reason == ERROR and "ValueError: no text for token 13" in fins[0].error
    assert fins[1].reason == LENGTH and fins[1].completion_tokens == 2
    zeros = [r.response.WhichOneof("event") for r in replies if r.index == 0]
    assert zeros[-1] == "finished" and "finished" not in zeros[:-1]  # nothing after its end
