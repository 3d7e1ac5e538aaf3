"""moemesh.client: the async Client, the sync generate_remote and `moemesh generate --target`,
against a real gateway in front of a real mesh (subprocesses; see tests/gateway/mesh.py)."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys

import grpc
import pytest

from moemesh.client import (
    Client,
    Completion,
    Finished,
    TokenChunk,
    build_request,
    event_from_proto,
    generate_remote,
    typed_error,
)
from moemesh.engine.sampling import SamplingParams
from moemesh.errors import (
    CapacityError,
    InvalidRequestError,
    MoemeshError,
    UnavailableError,
)
from moemesh.v1 import common_pb2, gateway_pb2
from tests.gateway.mesh import running_mesh, settled, workers_seen

pytestmark = pytest.mark.slow  # the module's mesh, and the CLI as a subprocess


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory):
    with running_mesh(tmp_path_factory.mktemp("client-e2e")) as m:
        yield m


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- pure ---------------------------------------------------------------------------------------

def test_a_request_needs_exactly_one_prompt():
    with pytest.raises(InvalidRequestError, match="exactly one"):
        build_request()
    with pytest.raises(InvalidRequestError, match="exactly one"):
        build_request("text", token_ids=[1])
    r = build_request(token_ids=[4, 5], params=SamplingParams(max_new_tokens=3, seed=7), request_id="r")
    assert (list(r.token_ids.ids), r.sampling.max_new_tokens, r.sampling.seed, r.request_id) == ([4, 5], 3, 7, "r")
    assert build_request("hi").text == "hi"


@pytest.mark.parametrize("fields, message", [
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),  # 0 on the wire would mean "off"
    ({"top_p": 1e-50}, r"top_p=1e-50 is 0 in float32"),
    ({"top_p": float("nan")}, r"top_p must be in \(0, 1\]"),
    ({"temperature": 1e-40}, r"temperature must be 0 \(greedy\) or in \[0.01, 100\]"),
    ({"temperature": float("nan")}, r"temperature .*got nan"),
    ({"top_k": -1}, r"top_k must be an integer >= 0"),
    ({"seed": -1}, r"seed must be in \[0, 2\^64\)"),
    ({"max_new_tokens": 0}, r"max_new_tokens must be > 0"),
])
def test_a_bad_sampling_value_is_refused_never_sent_as_another(fields, message):
    with pytest.raises(InvalidRequestError, match=message):
        build_request(token_ids=[1], params=SamplingParams(**{"temperature": 1.0, **fields}))


def test_messages_become_plain_events():
    chunk = gateway_pb2.GenerateResponse(chunk=gateway_pb2.GenerateResponse.TokenChunk(token_ids=[1, 2], text="ab",
                                                                                        offset=3))
    assert event_from_proto(chunk) == TokenChunk((1, 2), "ab", 3)
    fin = gateway_pb2.GenerateResponse(finished=gateway_pb2.GenerateResponse.Finished(
        reason=common_pb2.FINISH_REASON_STOP, prompt_tokens=4, completion_tokens=5, request_id="x"))
    assert event_from_proto(fin) == Finished("stop", 4, 5, 0.0, 0.0, "x")


@pytest.mark.parametrize("code, kind", [
    (grpc.StatusCode.INVALID_ARGUMENT, InvalidRequestError),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, CapacityError),
    (grpc.StatusCode.UNAVAILABLE, UnavailableError),
    (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.AioRpcError),
])
def test_status_codes_map_to_typed_errors_with_the_server_message(code, kind):
    rpc_error = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="the reason")
    err = typed_error(rpc_error)
    assert isinstance(err, kind) and "the reason" in str(err.details() if err is rpc_error else err)


def test_an_unreachable_gateway_is_unavailable():
    target = f"127.0.0.1:{_free_port()}"

    async def scenario():
        async with Client(target, timeout=3) as client:
            return await client.generate_text(token_ids=[1], params=SamplingParams(max_new_tokens=2))

    with pytest.raises(UnavailableError):
        asyncio.run(scenario())
    with pytest.raises(MoemeshError):
        generate_remote(target, None, [1], SamplingParams(max_new_tokens=2), 3.0)


# ---- against a real gateway --------------------------------------------------------------------

def test_generate_streams_chunks_then_finished_and_generate_text_agrees(mesh):
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)

    async def scenario():
        async with Client(mesh.gateway) as client:
            await client.wait_until_serving(timeout=10)
            events = [e async for e in client.generate("The mesh", params=params)]
            whole = await client.generate_text("The mesh", params=params)
            info = await client.model_info()
        return events, whole, info

    events, whole, info = asyncio.run(scenario())
    chunks, fin = events[:-1], events[-1]
    assert all(isinstance(c, TokenChunk) for c in chunks) and isinstance(fin, Finished)
    ids = tuple(t for c in chunks for t in c.token_ids)
    assert fin.reason == "length" and fin.completion_tokens == len(ids) == 10
    assert isinstance(whole, Completion) and whole.token_ids == ids  # greedy: the same tokens
    assert whole.text == "".join(c.text for c in chunks)
    assert info.num_workers == 2 and info.model.vocab_size == 512


def test_bad_input_raises_the_servers_message_and_leaving_early_cancels(mesh):
    async def scenario():
        async with Client(mesh.gateway) as client:
            with pytest.raises(InvalidRequestError, match="token id 600 out of range") as bad:
                await client.generate_text(token_ids=[600], params=SamplingParams(max_new_tokens=2))
            before = await workers_seen(mesh.coordinator)
            async for event in client.generate(token_ids=[3], params=SamplingParams(max_new_tokens=1900,
                                                                                    ignore_eos=True)):
                assert isinstance(event, TokenChunk)
                break  # closes the generator: the call is cancelled
            stopped = await settled(mesh.coordinator)
            after = await client.generate_text(token_ids=[3], params=SamplingParams(max_new_tokens=2))
        return bad.value, before, stopped, after

    bad, before, stopped, after = asyncio.run(scenario())
    assert isinstance(bad.__cause__, grpc.aio.AioRpcError)
    assert bad.__cause__.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The worker stopped the request: nothing left on it, after fewer steps than its 1900 tokens need.
    assert stopped.load == 0 and stopped.steps - before.steps < 1900
    assert after.finished.completion_tokens <= 2 and after.finished.reason in ("length", "stop")


def test_generate_batch_tags_events_by_prompt(mesh):
    requests = [build_request(token_ids=[8, 9], params=SamplingParams(max_new_tokens=n, ignore_eos=True))
                for n in (3, 5)]

    async def scenario():
        async with Client(mesh.gateway) as client:
            return [pair async for pair in client.generate_batch(requests)]

    pairs = asyncio.run(scenario())
    for index, n in enumerate((3, 5)):
        events = [e for i, e in pairs if i == index]
        assert isinstance(events[-1], Finished) and events[-1].completion_tokens == n
        assert sum(len(e.token_ids) for e in events[:-1]) == n


def _local_greedy(model_dir, prompt: str, params: SamplingParams):
    """The same checkpoint in this process (all experts local): (token ids, the text codec)."""
    from moemesh.engine.engine import Engine, generate
    from moemesh.model.config import load_config
    from moemesh.model.decoder import RuntimeShape, build_model
    from moemesh.text import TextCodec

    cfg = load_config(model_dir)
    codec = TextCodec(model_dir, cfg)
    model = build_model(model_dir, RuntimeShape(max_seqs=1, max_model_len=256))
    return generate(Engine(model), [codec.encode(prompt)], params)[0], codec


def test_generate_remote_and_the_cli(mesh):
    params = SamplingParams(max_new_tokens=6)  # what the CLI sends (EOS may end it early)
    ids, text = generate_remote(mesh.gateway, "abc", None, params, 30.0)
    assert len(ids) in range(1, 7)  # greedy; EOS may end it early
    expected, codec = _local_greedy(mesh.model_dir, "abc", params)
    assert ids == expected  # the same checkpoint in this process
    whole = codec.decode(ids)  # the streamed text holds back a trailing incomplete character
    assert whole.startswith(text) and len(whole) - len(text) <= 1
    assert generate_remote(mesh.gateway, "abc", None, params, 30.0) == (ids, text)

    cli = [sys.executable, "-m", "moemesh.cli", "generate", "--target", mesh.gateway, "--prompt", "abc",
           "--max-new-tokens", "6", "--json", "--timeout", "30"]
    done = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["token_ids"] == ids

    bad = subprocess.run([*cli[:-4], "0", "--json"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "max_new_tokens must be > 0" in bad.stderr
