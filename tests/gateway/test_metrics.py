"""The gateway's metrics after a known load through a real mesh (coordinator, 2 gloo workers,
gateway: processes), scraped over HTTP and parsed with prometheus_client's text parser: the token
counters equal what the client sent and received, requests are counted by finished_reason, one
TTFT per request and one inter-token latency per further chunk the client received."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import GatewayMetrics
from moemesh.client import Client, Finished, TokenChunk, build_request
from moemesh.engine.sampling import SamplingParams
from moemesh.metrics import new_registry, scrape, value
from tests.gateway.mesh import running_mesh, settled

pytestmark = pytest.mark.slow  # starts a mesh of real processes

DEADLINE_S = 60.0
PROMPTS = [[5, 6, 7], [8] * 11, [9, 10]]
NEW_TOKENS = 7


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory):
    with running_mesh(tmp_path_factory.mktemp("gateway-metrics")) as m:
        yield m


async def stream(client: Client, prompt: list[int], max_new_tokens: int) -> tuple[int, Finished]:
    """(chunks received, Finished) of one Generate."""
    chunks = 0
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    async for event in client.generate(token_ids=prompt, params=params, include_text=False):
        if isinstance(event, TokenChunk):
            chunks += 1
        else:
            return chunks, event
    raise AssertionError("no Finished")


async def known_load(gateway: str) -> tuple[list[int], int]:
    """Single calls and one batch; returns the chunks each request was received in, and how many
    tokens the batch received."""
    async with Client(gateway, timeout=DEADLINE_S) as client:
        singles = await asyncio.gather(*(stream(client, p, NEW_TOKENS) for p in PROMPTS))
        requests = [build_request(token_ids=p, params=SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True),
                                  include_text=False) for p in PROMPTS]
        batch_chunks = [0] * len(PROMPTS)
        batch_tokens = 0
        async for index, event in client.generate_batch(requests):
            if isinstance(event, TokenChunk):
                batch_chunks[index] += 1
                batch_tokens += len(event.token_ids)
    assert all(f.reason == "length" and f.completion_tokens == NEW_TOKENS for _, f in singles)
    return [c for c, _ in singles] + batch_chunks, batch_tokens


def test_counters_equal_the_load_sent_and_received(mesh):
    address = mesh.metrics()["gateway"]
    before = scrape(address)
    chunks, batch_tokens = asyncio.run(known_load(mesh.gateway))
    after = scrape(address)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    requests = 2 * len(PROMPTS)
    assert batch_tokens == NEW_TOKENS * len(PROMPTS)
    assert delta("moemesh:prompt_tokens_total") == 2 * sum(len(p) for p in PROMPTS)
    assert delta("moemesh:generation_tokens_total") == NEW_TOKENS * requests
    assert delta("moemesh:request_success_total", finished_reason="length") == requests
    assert delta("moemesh:request_success_total") == requests
    assert delta("moemesh:time_to_first_token_seconds_count") == requests
    assert delta("moemesh:inter_token_latency_seconds_count") == sum(chunks) - requests
    assert delta("moemesh:e2e_request_latency_seconds_count") == requests
    assert delta("moemesh:request_prompt_tokens_sum") == 2 * sum(len(p) for p in PROMPTS)
    assert delta("moemesh:request_generation_tokens_sum") == NEW_TOKENS * requests
    assert value(after, "moemesh:requests_in_flight") == 0
    assert value(after, "moemesh:request_migrations_total") == 0
    assert value(after, "moemesh:world_generation") == 1 and value(after, "moemesh:live_workers") == 2
    assert {s.labels["model_name"] for s in after if s.name.startswith("moemesh:")} == {
        mesh.model_dir.resolve().name}


def test_a_stream_left_midway_is_counted_cancelled_and_leaves_nothing_in_flight(mesh):
    address = mesh.metrics()["gateway"]
    before = value(scrape(address), "moemesh:request_success_total", finished_reason="cancelled")

    async def leave_early() -> None:
        async with Client(mesh.gateway, timeout=DEADLINE_S) as client:
            params = SamplingParams(max_new_tokens=1500, ignore_eos=True)
            async for event in client.generate(token_ids=[4, 5, 6], params=params, include_text=False):
                assert isinstance(event, TokenChunk)
                break  # the client goes away after its first chunk
        await settled(mesh.coordinator)

    asyncio.run(leave_early())
    after = scrape(address)
    assert value(after, "moemesh:request_success_total", finished_reason="cancelled") == before + 1
    assert value(after, "moemesh:requests_in_flight") == 0


def test_the_registry_is_served_by_the_asgi_app_for_the_http_port():
    metrics = GatewayMetrics(new_registry(), "tiny", max_model_len=256)
    metrics.placed(5)
    metrics.streamed(3, 0.02, first=True)
    metrics.ended("stop", 0.5, 3)
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/metrics", "query_string": b"", "headers": []}
    asyncio.run(metrics.asgi_app()(scope, receive, send))
    assert sent[0]["status"] == 200
    samples = [s for f in text_string_to_metric_families(sent[1]["body"].decode()) for s in f.samples]
    assert value(samples, "moemesh:prompt_tokens_total", model_name="tiny") == 5
    assert value(samples, "moemesh:generation_tokens_total") == 3
    assert value(samples, "moemesh:request_success_total", finished_reason="stop") == 1
    assert value(samples, "moemesh:time_to_first_token_seconds_count") == 1
