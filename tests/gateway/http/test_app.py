"""The OpenAI-compatible API end to end: the official openai client against a real mesh
(coordinator + 2 gloo workers + gateway, subprocesses), nothing mocked.

The client never retries here (max_retries=0), so every typed exception is the gateway's first answer.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
from transformers import AutoTokenizer

import expert_worker.server  # noqa: F401  (the mesh runs it: a broken import fails here, never a skip)
from moemesh.engine.sampling import SamplingParams
from moemesh.engine.sampling_wire import sampling_to_proto
from moemesh.launch import Processes
from moemesh.rpc import channel
from moemesh.v1 import gateway_pb2, gateway_pb2_grpc
from tests.gateway.mesh import START_TIMEOUT_S, running_mesh, settled, workers_seen

pytestmark = pytest.mark.slow  # starts a mesh of real processes

DEADLINE_S = 60.0  # hang bound of every call
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}
MODEL = "model"  # running_mesh writes the checkpoint to <tmp>/model: the served name is the folder's
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory):
    with running_mesh(tmp_path_factory.mktemp("http-e2e")) as m:
        yield m


def client(address: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{address}/v1", api_key="x", max_retries=0, timeout=DEADLINE_S)


def http(address: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """(status, JSON body) of GET `path` (POST `body` when given)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://{address}{path}", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=DEADLINE_S) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def grpc_text(address: str, text: str, max_new_tokens: int) -> tuple[str, gateway_pb2.GenerateResponse.Finished]:
    """The gRPC API's greedy completion of `text` (with its Finished)."""
    async def run():
        request = gateway_pb2.GenerateRequest(text=text, include_text=True, sampling=sampling_to_proto(
            SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)))
        async with channel(address) as ch:
            return [m async for m in gateway_pb2_grpc.GatewayStub(ch).Generate(request, timeout=DEADLINE_S)]

    messages = asyncio.run(run())
    return "".join(m.chunk.text for m in messages[:-1]), messages[-1].finished


def test_models_health_and_tokenize(mesh):
    models = client(mesh.http).models.list().data
    assert [m.id for m in models] == [MODEL] == [mesh.model_dir.name]
    assert http(mesh.http, "/health") == (200, {"status": "SERVING"})
    status, tokens = http(mesh.http, "/tokenize", {"prompt": "Hello"})
    reference = AutoTokenizer.from_pretrained(str(mesh.model_dir))
    assert status == 200 and tokens["tokens"] == [reference.bos_token_id, *reference.encode("Hello")]
    assert tokens["count"] == 6 and tokens["max_model_len"] == 2048
    assert http(mesh.http, "/tokenize", {"prompt": "Hello", "add_special_tokens": False})[1]["tokens"] == \
        reference.encode("Hello")
    chat_ids = reference.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert http(mesh.http, "/tokenize", {"messages": CHAT})[1]["tokens"] == chat_ids
    assert http(mesh.http, "/detokenize", {"tokens": tokens["tokens"]}) == (200, {"prompt": "Hello"})


def test_completion_is_token_identical_to_the_grpc_api(mesh):
    reply = client(mesh.http).completions.create(model=MODEL, prompt="Hello, mesh!", max_tokens=12,
                                                 **GREEDY)
    text, finished = grpc_text(mesh.gateway, "Hello, mesh!", 12)
    assert reply.choices[0].text == text and reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (
        finished.prompt_tokens, 12, finished.prompt_tokens + 12)
    assert reply.object == "text_completion" and reply.model == MODEL
    ids = http(mesh.http, "/tokenize", {"prompt": "Hello, mesh!"})[1]["tokens"]
    by_ids = client(mesh.http).completions.create(model=MODEL, prompt=ids, max_tokens=12, **GREEDY)
    assert by_ids.choices[0].text == text


def test_chat_renders_the_template_and_streams_with_the_usage_chunk(mesh):
    c = client(mesh.http)
    reply = c.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=10, **GREEDY)
    content = reply.choices[0].message.content
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].finish_reason == "length"
    # The same as a completion of the ids transformers' apply_chat_template makes
    reference = AutoTokenizer.from_pretrained(str(mesh.model_dir))
    ids = reference.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert c.completions.create(model=MODEL, prompt=ids, max_tokens=10, **GREEDY).choices[0].text == \
        content
    assert reply.usage.prompt_tokens == len(ids)
    chunks = list(c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == reply.usage.model_dump()
    assert all(ch.usage is None for ch in chunks[:-1])


def test_a_stream_is_server_sent_events_ending_in_done(mesh):
    request = urllib.request.Request(
        f"http://{mesh.http}/v1/completions", headers={"Content-Type": "application/json"},
        data=json.dumps({"prompt": "Hi", "max_tokens": 6, "temperature": 0, "stream": True,
                         "stream_options": {"include_usage": True}}).encode())
    with urllib.request.urlopen(request, timeout=DEADLINE_S) as reply:
        assert reply.headers["Content-Type"].startswith("text/event-stream")
        events = reply.read().decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-2])
    assert payloads[-1]["usage"]["completion_tokens"] == payloads[-1]["usage"]["total_tokens"] - 3


def grpc_scores(address: str, text: str, max_new_tokens: int, top: int) -> list[gateway_pb2.GenerateResponse]:
    """The gRPC API's greedy completion of `text` with its prompt's and tokens' log-probabilities."""
    async def run():
        sampling = sampling_to_proto(SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, logprobs=top,
                                                    prompt_logprobs=True))
        request = gateway_pb2.GenerateRequest(text=text, include_text=True, sampling=sampling)
        async with channel(address) as ch:
            return [m async for m in gateway_pb2_grpc.GatewayStub(ch).Generate(request, timeout=DEADLINE_S)]

    return asyncio.run(run())[:-1]


def test_echo_and_logprobs_score_the_prompt_as_the_grpc_api_does(mesh):
    """OpenAI's completion logprobs object, streamed or not: the prompt's tokens (the first without a
    score) then the completion's, each with its top alternatives, equal to the gRPC API's values."""
    c = client(mesh.http)
    reply = c.completions.create(model=MODEL, prompt="To be, or", max_tokens=4, logprobs=2, echo=True, **GREEDY)
    choice = reply.choices[0]
    chunks = grpc_scores(mesh.gateway, "To be, or", 4, 2)
    completion = "".join(m.chunk.text for m in chunks)
    assert choice.text == "To be, or" + completion
    lp = choice.logprobs
    prompt_ids = http(mesh.http, "/tokenize", {"prompt": "To be, or"})[1]["tokens"]
    assert len(lp.tokens) == len(prompt_ids) + 4 == len(lp.token_logprobs) == len(lp.top_logprobs)
    assert "".join(lp.tokens) == choice.text  # the first is BOS, whose text is empty
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = [s.logprob for s in chunks[0].chunk.prompt_logprobs] + [s.logprob for m in chunks for s in m.chunk.logprobs]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-6)
    # two alternatives each (fewer keys where two tokens have the same text, as in OpenAI's dict form)
    assert all(1 <= len(top) <= 2 and max(top.values()) >= v - 1e-6 for top, v in zip(lp.top_logprobs[1:],
                                                                                       lp.token_logprobs[1:]))
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    streamed = list(c.completions.create(model=MODEL, prompt="To be, or", max_tokens=4, logprobs=2, echo=True,
                                         stream=True, **GREEDY))
    parts = [ch.choices[0].logprobs for ch in streamed if ch.choices[0].logprobs is not None]
    assert [v for p in parts for v in p.token_logprobs] == lp.token_logprobs
    assert [o for p in parts for o in p.text_offset] == lp.text_offset


def test_chat_logprobs_are_the_completions_of_the_same_prompt(mesh):
    c = client(mesh.http)
    reply = c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, logprobs=True, top_logprobs=3,
                                      **GREEDY)
    reference = AutoTokenizer.from_pretrained(str(mesh.model_dir))
    ids = reference.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=True)["input_ids"]
    plain = c.completions.create(model=MODEL, prompt=ids, max_tokens=5, logprobs=3, **GREEDY).choices[0].logprobs
    content = reply.choices[0].logprobs.content
    assert [e.logprob for e in content] == pytest.approx(plain.token_logprobs, abs=1e-6)
    assert [e.token for e in content] == plain.tokens
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in content)
    assert all(e.bytes == list(e.token.encode()) for e in content)


def test_stop_strings_cut_the_text_streamed_or_not(mesh):
    c = client(mesh.http)
    full = c.completions.create(model=MODEL, prompt="Once upon", max_tokens=24, **GREEDY).choices[0].text
    stop = full[9:11]  # met after a few tokens, possibly split across two
    expected = full[:full.find(stop)]
    cut = c.completions.create(model=MODEL, prompt="Once upon", max_tokens=24, stop=[stop, "never there"], **GREEDY)
    assert (cut.choices[0].text, cut.choices[0].finish_reason) == (expected, "stop")
    assert cut.usage.completion_tokens < 24
    streamed = list(c.completions.create(model=MODEL, prompt="Once upon", max_tokens=24, stop=stop, stream=True,
                                         **GREEDY))
    assert "".join(ch.choices[0].text for ch in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_errors_arrive_as_the_clients_typed_exceptions(mesh):
    c = client(mesh.http)
    cases = [(dict(prompt="x", temperature=-1), "temperature must be 0 (greedy) or in", None),
             (dict(prompt="x", n=2), "n=2 is not supported", "n"),
             (dict(prompt="x", logprobs=21), "logprobs must be in [0, 20]", None),
             (dict(prompt="x", best_of=2), "best_of=2 is not supported", "best_of"),
             (dict(prompt="x", max_tokens=5000), "over this server's limit of 4096", None),
             (dict(prompt=""), "prompt text is empty", None)]
    for kwargs, message, param in cases:
        with pytest.raises(openai.BadRequestError) as bad:
            c.completions.create(model=MODEL, **kwargs)
        assert message in bad.value.message and bad.value.status_code == 400
        assert bad.value.body["param"] == param and bad.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as unknown:
        c.completions.create(model="gpt-4o", prompt="x")
    assert unknown.value.code == "model_not_found" and "gpt-4o" in unknown.value.message
    with pytest.raises(openai.BadRequestError, match="got tool"):  # the template's raise_exception
        c.chat.completions.create(model=MODEL, messages=[{"role": "tool", "content": "x",
                                                                        "tool_call_id": "1"}])
    assert c.completions.create(model=MODEL, prompt="still serving", max_tokens=2).usage.completion_tokens == 2


def test_full_is_a_rate_limit_and_a_cancelled_stream_frees_its_slot(mesh):
    """A second gateway with room for one request: a stream holds it (RateLimitError for the next),
    the client leaves it mid-way, the worker stops it, and the slot takes a new request."""
    mesh.add_gateway("gateway-one", ["--max-inflight", "1"])
    try:
        mesh.wait_serving(mesh.gateways["gateway-one"])
        asyncio.run(_hold_and_cancel(mesh, mesh.http_gateways["gateway-one"]))
    finally:
        assert mesh.terminate("gateway-one") == 0


async def _hold_and_cancel(mesh, address: str) -> None:
    c = openai.AsyncOpenAI(base_url=f"http://{address}/v1", api_key="x", max_retries=0, timeout=DEADLINE_S)
    before = await workers_seen(mesh.coordinator)
    stream = await c.completions.create(model=MODEL, prompt="hold", max_tokens=1900, stream=True, **GREEDY)
    first = await anext(aiter(stream))
    assert first.choices[0].finish_reason is None
    with pytest.raises(openai.RateLimitError, match="gateway is full"):
        await c.completions.create(model=MODEL, prompt="one more", max_tokens=2)
    await stream.close()  # the client leaves mid-way
    after = await settled(mesh.coordinator)
    assert after.load == 0 and after.steps - before.steps < 1900  # stopped on its worker, not run to its end
    deadline = time.monotonic() + DEADLINE_S  # hang bound: the gateway frees the slot as the disconnect lands
    while True:
        try:
            reply = await c.completions.create(model=MODEL, prompt="the slot is free", max_tokens=2)
            break
        except openai.RateLimitError:
            if time.monotonic() > deadline:  # hang bound
                raise
            await asyncio.sleep(0.05)
    assert reply.usage.completion_tokens == 2
    await c.close()


def test_a_non_streamed_request_whose_client_leaves_is_cancelled(mesh):
    before = asyncio.run(workers_seen(mesh.coordinator))
    with pytest.raises(openai.APITimeoutError):
        client(mesh.http).with_options(timeout=1.0).completions.create(model=MODEL, prompt="long", max_tokens=1900,
                                                                       **GREEDY)
    after = asyncio.run(settled(mesh.coordinator))
    assert after.load == 0 and after.steps - before.steps < 1900


def test_nothing_to_serve_is_503_on_health_and_requests(mesh, tmp_path: Path):
    """A gateway whose coordinator is not there: HTTP is up at once, NOT_SERVING, and a request
    waits --recovery-wait for a worker, then 503."""
    procs, port_file = Processes(tmp_path / "logs", mesh.spec.env), tmp_path / "lonely.http.port"
    try:
        procs.start("lonely", ["gateway", "--coordinator", "127.0.0.1:1", "--model", str(mesh.model_dir),
                               "--port", "0", "--http-port", "0", "--http-port-file", str(port_file),
                               "--recovery-wait", "0"])
        address = f"127.0.0.1:{procs.wait_port('lonely', port_file, START_TIMEOUT_S)}"
        status, body = http(address, "/health")
        assert status == 503 and body["status"] == "NOT_SERVING"
        with pytest.raises(openai.APIStatusError) as unavailable:
            client(address).completions.create(model=MODEL, prompt="anyone?", max_tokens=2)
        assert unavailable.value.status_code == 503 and "no live worker" in unavailable.value.message
        assert procs.terminate("lonely") == 0
    finally:
        procs.stop()


def test_api_keys_guard_the_api_and_charge_its_limits_with_retry_after(mesh, tmp_path: Path):
    """A gateway with --api-keys-file: no key or a wrong one is 401 (AuthenticationError), a key
    over its rate is 429 with Retry-After, over its max tokens 429; /health stays open."""
    from moemesh.auth import new_key

    open_key, open_line = new_key(name="open")
    slow_key, slow_line = new_key(requests_per_minute=1, max_tokens=4, name="slow")
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"{open_line}\n{slow_line}\n")
    mesh.add_gateway("gateway-keys", ["--api-keys-file", str(keys_file)])
    try:
        mesh.wait_serving(mesh.gateways["gateway-keys"])
        address = mesh.http_gateways["gateway-keys"]
        assert http(address, "/health")[0] == 200
        status, body = http(address, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2})
        assert status == 401 and body["error"]["type"] == "authentication_error"  # no Authorization header
        wrong = openai.OpenAI(base_url=f"http://{address}/v1", api_key="not-a-key", max_retries=0, timeout=DEADLINE_S)
        with pytest.raises(openai.AuthenticationError, match="API key is not valid"):
            wrong.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        good = openai.OpenAI(base_url=f"http://{address}/v1", api_key=open_key, max_retries=0, timeout=DEADLINE_S)
        assert good.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens == 2
        slow = openai.OpenAI(base_url=f"http://{address}/v1", api_key=slow_key, max_retries=0, timeout=DEADLINE_S)
        with pytest.raises(openai.RateLimitError, match="at most 4 new tokens"):
            slow.completions.create(model=MODEL, prompt="hi", max_tokens=5)
        assert slow.completions.create(model=MODEL, prompt="hi", max_tokens=4).usage.completion_tokens == 4
        with pytest.raises(openai.RateLimitError, match="per minute") as over:
            slow.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        # the header carries the wait the limiter computed (its arithmetic: tests/moemesh/test_auth.py)
        stated = re.search(r"retry in (\d+) s", over.value.message)
        assert stated is not None and over.value.response.headers["retry-after"] == stated.group(1)
    finally:
        assert mesh.terminate("gateway-keys") == 0


def test_http_requests_are_counted_and_served_at_metrics_on_the_http_port(mesh):
    """GET /metrics on the HTTP port is the gateway's registry; an HTTP completion counts as a gRPC
    one does (its prompt and generated tokens, one request finished by length)."""
    from moemesh.metrics import scrape, value

    name = "moemesh:generation_tokens_total"
    before = scrape(mesh.http)
    reply = client(mesh.http).completions.create(model=MODEL, prompt="count me", max_tokens=5, **GREEDY)
    after = scrape(mesh.http)
    assert value(after, name) - value(before, name) == reply.usage.completion_tokens == 5
    assert (value(after, "moemesh:prompt_tokens_total") - value(before, "moemesh:prompt_tokens_total")
            == reply.usage.prompt_tokens)
    finished = "moemesh:request_success_total"
    assert value(after, finished, finished_reason="length") - value(before, finished, finished_reason="length") == 1
