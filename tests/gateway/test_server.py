"""The gateway end to end, in front of a real mesh (coordinator + 2 gloo workers, subprocesses).

Each test drives the gateway with grpc.aio stubs inside one asyncio.run; the mesh is shared by the
module and stopped in the fixture's finally. Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import expert_worker.server  # noqa: F401  (the mesh runs it: a broken import fails here, never a skip)
from gateway.server import serve
from gateway.settings import GatewaySettings
from moemesh.client import Client
from moemesh.engine.engine import Engine, generate
from moemesh.engine.sampling import SamplingParams
from moemesh.engine.sampling_wire import sampling_to_proto
from moemesh.launch import Processes
from moemesh.model.config import load_config
from moemesh.model.decoder import RuntimeShape, build_model
from moemesh.model.tiny import write_tiny_model
from moemesh.retry import Backoff, retry
from moemesh.rpc import channel
from moemesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.gateway.mesh import SETTLE_S, START_TIMEOUT_S, TINY, running_mesh, settled, workers_seen
from tests.gateway.scripted import HANG_BOUND_S, ScriptedCoordinator, ScriptedWorker, finished, served, tokens
from tests.gateway.scripted import world as scripted_world

pytestmark = pytest.mark.slow  # starts meshes of real processes

DEADLINE = 60.0
LENGTH, STOP, ERROR = common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_ERROR


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory):
    with running_mesh(tmp_path_factory.mktemp("gateway-e2e")) as m:
        yield m


def req(ids=None, text=None, include_text=False, **sampling) -> gateway_pb2.GenerateRequest:
    r = gateway_pb2.GenerateRequest(include_text=include_text)
    if text is not None:
        r.text = text
    if ids is not None:
        r.token_ids.ids.extend(ids)
    r.sampling.CopyFrom(sampling_to_proto(SamplingParams(**sampling)))
    return r


async def collect(call) -> list[tuple[float, gateway_pb2.GenerateResponse]]:
    """(arrival time, message) for every message of a Generate stream."""
    return [(time.monotonic(), msg) async for msg in call]


def check_stream(
    messages: list[gateway_pb2.GenerateResponse],
) -> tuple[list[int], gateway_pb2.GenerateResponse.Finished]:
    """Chunks with contiguous offsets, then exactly one Finished that counts them; (ids, finished)."""
    ids: list[int] = []
    for msg in messages[:-1]:
        assert msg.WhichOneof("event") == "chunk"
        assert msg.chunk.token_ids and msg.chunk.offset == len(ids)
        ids.extend(msg.chunk.token_ids)
    last = messages[-1]
    assert last.WhichOneof("event") == "finished"
    assert last.finished.completion_tokens == len(ids)
    return ids, last.finished


def local_greedy(model_dir: Path, prompt: list[int], n: int) -> list[int]:
    """The same checkpoint in this process (all experts local): the reference tokens."""
    cfg = load_config(model_dir)
    model = build_model(model_dir, RuntimeShape(max_seqs=1, max_model_len=min(cfg.max_position_embeddings, 256)))
    return generate(Engine(model), [prompt], SamplingParams(max_new_tokens=n, ignore_eos=True))[0]


def test_health_reflection_and_model_info(mesh):
    async def scenario():
        async with channel(mesh.gateway) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            statuses = [(await health.Check(health_pb2.HealthCheckRequest(service=s), timeout=5)).status
                        for s in ("", "moemesh.v1.Gateway")]
            refl = reflection_pb2_grpc.ServerReflectionStub(ch)
            replies = [r async for r in refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)]
            info = await gateway_pb2_grpc.GatewayStub(ch).ModelInfo(gateway_pb2.ModelInfoRequest(), timeout=5)
        services = {s.name for s in replies[0].list_services_response.service}
        return statuses, services, info

    statuses, services, info = asyncio.run(scenario())
    assert statuses == [health_pb2.HealthCheckResponse.SERVING] * 2
    assert "moemesh.v1.Gateway" in services
    cfg = load_config(mesh.model_dir)
    assert (info.model.architecture, info.model.num_layers, list(info.model.moe_layer_ids)) == (
        "MixtralForCausalLM", cfg.num_layers, [0, 1])
    assert (info.model.num_experts, info.model.top_k, info.model.vocab_size, info.model.hidden_size) == (
        cfg.num_experts, cfg.top_k, cfg.vocab_size, cfg.hidden_size)
    assert info.model.max_context == min(2048, cfg.max_position_embeddings)
    assert (info.num_workers, info.transport, info.balancing_policy) == (2, "gloo", "none")
    assert info.placement_epoch >= 1


def test_tokens_stream_as_they_are_made_and_match_the_reference(mesh):
    prompt = [5, 6, 7, 8, 9]

    async def scenario():
        async with channel(mesh.gateway) as ch:
            stub = gateway_pb2_grpc.GatewayStub(ch)
            timed = await collect(stub.Generate(req(prompt, max_new_tokens=64, ignore_eos=True), timeout=DEADLINE))
            # Streamed: the first chunk is with the client while its request still runs on a worker
            # (1900 tokens cannot be made in the one Status call this takes), then cancelled.
            before = await workers_seen(mesh.coordinator)
            long = stub.Generate(req(prompt, max_new_tokens=1900, ignore_eos=True), timeout=DEADLINE)
            first = await _first_chunk(long)
            running = (await workers_seen(mesh.coordinator)).load
            long.cancel()
            return timed, first, running, before, await settled(mesh.coordinator)

    timed, first, running, before, after = asyncio.run(scenario())
    ids, fin = check_stream([m for _, m in timed])
    assert fin.reason == LENGTH and fin.completion_tokens == 64 and fin.prompt_tokens == len(prompt)
    assert len(timed) > 8, "tokens arrive in many chunks, not at once"
    assert first.WhichOneof("event") == "chunk" and first.chunk.token_ids
    assert running >= 1, "the first chunk arrived only after the request had finished: not streamed"
    assert after.load == 0 and after.steps - before.steps < 1900  # cancelled, not run to its end
    assert 0 < fin.ttft_seconds < fin.latency_seconds
    assert fin.request_id  # assigned by the gateway
    assert ids == local_greedy(mesh.model_dir, prompt, 64)


def test_text_prompts_stream_text_and_echo_the_request_id(mesh):
    async def scenario():
        async with channel(mesh.gateway) as ch:
            stub = gateway_pb2_grpc.GatewayStub(ch)
            r = req(text="Hello, mesh!", include_text=True, max_new_tokens=12, ignore_eos=True)
            r.request_id = "client-42"
            return [m for _, m in await collect(stub.Generate(r, timeout=DEADLINE))]

    messages = asyncio.run(scenario())
    ids, fin = check_stream(messages)
    from moemesh.text import TextCodec

    codec = TextCodec(mesh.model_dir, load_config(mesh.model_dir))
    assert fin.prompt_tokens == len(codec.encode("Hello, mesh!"))
    assert fin.request_id == "client-42"
    streamed = "".join(m.chunk.text for m in messages[:-1])
    assert codec.decode(ids).startswith(streamed) and len(codec.decode(ids)) - len(streamed) <= 1


BAD = [
    (gateway_pb2.GenerateRequest(), "no prompt"),
    (req(text="", max_new_tokens=4), "prompt text is empty"),
    (req(ids=[], max_new_tokens=4), "prompt is empty"),
    (req(ids=[1, 512], max_new_tokens=4), "token id 512 out of range"),
    (req(ids=[5], max_new_tokens=0), "max_new_tokens must be > 0"),
    (req(ids=[5], max_new_tokens=5000), "over this server's limit of 4096"),
    (req(ids=[5] * 2000, max_new_tokens=100), "exceeds the context of 2048 tokens"),
    (req(ids=[5], max_new_tokens=4, temperature=-0.5), "temperature must be 0 (greedy) or in"),
    (req(ids=[5], max_new_tokens=4, top_p=2.0), "top_p must be in"),
]


def test_each_bad_request_is_invalid_argument_and_the_gateway_keeps_serving(mesh):
    async def scenario():
        outcomes = []
        async with channel(mesh.gateway) as ch:
            stub = gateway_pb2_grpc.GatewayStub(ch)
            for bad, _ in BAD:
                call = stub.Generate(bad, timeout=DEADLINE)
                received = []
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for msg in call:
                        received.append(msg)
                outcomes.append((info.value.code(), info.value.details(), received))
            good = [m for _, m in await collect(stub.Generate(req([3, 4], max_new_tokens=3), timeout=DEADLINE))]
        return outcomes, good

    outcomes, good = asyncio.run(scenario())
    for (code, details, received), (_, message) in zip(outcomes, BAD):
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert message in details and received == []
    assert check_stream(good)[1].reason in (LENGTH, STOP)


POISON = [  # one bad value per sampling field, as a raw gRPC client may send it; what the refusal names
    ({"temperature": 1e-40}, "temperature must be 0 (greedy) or in [0.01, 100]"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"temperature": 1.0, "top_p": float("nan")}, "top_p must be in (0, 1]"),
    ({"temperature": 1.0, "top_p": -0.5}, "top_p must be in (0, 1]"),
    ({"temperature": 1.0, "seed": 2**64 - 1, "stop_token_ids": [600]}, "stop_token_ids"),
    ({"max_new_tokens": 0}, "max_new_tokens must be > 0"),
]


def test_a_query_of_death_in_any_sampling_field_fails_alone_while_others_run(mesh):
    """Issue 11: one request with --temperature 1e-40 used to stop the whole mesh. Each bad value
    is INVALID_ARGUMENT while two generations run; they end with the reference tokens, and the
    mesh serves afterwards."""
    prompts = [[30, 31], [40, 41, 42]]

    async def scenario():
        async with channel(mesh.gateway) as ch:
            stub = gateway_pb2_grpc.GatewayStub(ch)
            calls = [stub.Generate(req(p, max_new_tokens=48, ignore_eos=True), timeout=DEADLINE) for p in prompts]
            firsts = [await _first_chunk(call) for call in calls]  # both running now
            refused = []
            for fields, _ in POISON:
                bad = gateway_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=[5, 6]),
                                                  sampling=common_pb2.SamplingParams(**{"max_new_tokens": 4, **fields}))
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await collect(stub.Generate(bad, timeout=DEADLINE))
                refused.append(info.value)
            ran = [[first, *await _read_rest(call)] for first, call in zip(firsts, calls)]
            after = [m for _, m in await collect(stub.Generate(req([3, 4], max_new_tokens=3), timeout=DEADLINE))]
        return refused, ran, after

    refused, ran, after = asyncio.run(scenario())
    for error, (_, message) in zip(refused, POISON):
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and message in error.details(), error.details()
    for prompt, messages in zip(prompts, ran):
        ids, fin = check_stream(messages)
        assert fin.reason == LENGTH and ids == local_greedy(mesh.model_dir, prompt, 48)
    assert check_stream(after)[1].reason in (LENGTH, STOP)


def test_batch_runs_prompts_concurrently_and_tags_every_response(mesh):
    prompts = [([10, 11, 12], 24), ([100, 200], 8), ([42] * 6, 16)]

    async def scenario():
        async with channel(mesh.gateway) as ch:
            stub = gateway_pb2_grpc.GatewayStub(ch)
            batch = gateway_pb2.GenerateBatchRequest(requests=[req(p, max_new_tokens=n, ignore_eos=True)
                                                               for p, n in prompts])
            replies = [m async for m in stub.GenerateBatch(batch, timeout=DEADLINE)]
            singles = [[m for _, m in await collect(stub.Generate(req(p, max_new_tokens=n, ignore_eos=True),
                                                                  timeout=DEADLINE))] for p, n in prompts]
        return replies, singles

    replies, singles = asyncio.run(scenario())
    per_index = {i: [r.response for r in replies if r.index == i] for i in range(len(prompts))}
    first_finished = next(k for k, r in enumerate(replies) if r.response.WhichOneof("event") == "finished")
    assert len({r.index for r in replies[:first_finished]}) >= 2, "prompts ran one after another"
    for i, (prompt, n) in enumerate(prompts):
        ids, fin = check_stream(per_index[i])
        assert fin.completion_tokens == n and fin.prompt_tokens == len(prompt) and fin.reason == LENGTH
        assert ids == check_stream(singles[i])[0], f"prompt {i}: batch and single Generate disagree"


def test_a_bad_prompt_fails_the_whole_batch_before_anything_runs(mesh):
    async def scenario():
        async with channel(mesh.gateway) as ch:
            stub = gateway_pb2_grpc.GatewayStub(ch)
            errors = []
            for batch in ([req([5], max_new_tokens=4), req([5, 999], max_new_tokens=4)], []):
                received = []
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for msg in stub.GenerateBatch(gateway_pb2.GenerateBatchRequest(requests=batch),
                                                        timeout=DEADLINE):
                        received.append(msg)
                errors.append((info.value.code(), info.value.details(), received))
        return errors

    (code, details, received), (empty_code, empty_details, _) = asyncio.run(scenario())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and received == []
    assert details.startswith("requests[1]: token id 999 out of range")
    assert empty_code == grpc.StatusCode.INVALID_ARGUMENT and "empty" in empty_details


async def _first_chunk(call) -> gateway_pb2.GenerateResponse:
    return await asyncio.wait_for(call.read(), timeout=DEADLINE)


async def _read_rest(call) -> list[gateway_pb2.GenerateResponse]:
    """The remaining messages of a call read with read() (iteration may not be mixed with it)."""
    messages = []
    while (msg := await call.read()) is not grpc.aio.EOF:
        messages.append(msg)
    return messages


def test_cancel_frees_the_slot_and_the_others_finish(mesh):
    """A second gateway with room for 3: full -> RESOURCE_EXHAUSTED; cancel one -> room again,
    the cancelled request stops on its worker, the other two run to the end."""
    small = mesh.add_gateway("gateway-small", ["--max-inflight", "3"])
    try:
        mesh.wait_serving(small)
        asyncio.run(_cancel_scenario(mesh, small))
    finally:
        assert mesh.terminate("gateway-small") == 0


async def _cancel_scenario(mesh, target: str) -> None:
    async with channel(target) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        before = await workers_seen(mesh.coordinator)
        doomed = stub.Generate(req([7, 8, 9], max_new_tokens=1900, ignore_eos=True), timeout=DEADLINE)
        # 300 tokens each: far more than can be made while the client reads 3 first chunks and probes
        others = [stub.Generate(req([20 + i], max_new_tokens=300, ignore_eos=True), timeout=DEADLINE)
                  for i in range(2)]
        for call in (doomed, *others):
            assert (await _first_chunk(call)).WhichOneof("event") == "chunk"
        with pytest.raises(grpc.aio.AioRpcError) as full:
            await collect(stub.Generate(req([1], max_new_tokens=2), timeout=DEADLINE))
        assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "3 requests in flight" in full.value.details()
        doomed.cancel()
        extra = await _retry_while_full(stub, req([2, 3], max_new_tokens=4))
        assert check_stream(extra)[1].reason in (LENGTH, STOP)
        for call in others:
            rest = await _read_rest(call)
            assert rest[-1].finished.reason == LENGTH and rest[-1].finished.completion_tokens == 300
    # The cancelled request would have run for 1900 steps had its worker not been told.
    after = await settled(mesh.coordinator)
    assert after.load == 0 and after.steps - before.steps < 1900


async def _retry_while_full(stub, request) -> list[gateway_pb2.GenerateResponse]:
    """Generate, retrying RESOURCE_EXHAUSTED (the cancel is freed asynchronously) for up to a hang bound."""

    async def once() -> list[gateway_pb2.GenerateResponse]:
        return [m for _, m in await collect(stub.Generate(request, timeout=DEADLINE))]

    def full(exc: Exception) -> bool:
        return isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    return await retry(once, full, backoff=Backoff(first_s=0.05, cap_s=0.05, deadline_s=SETTLE_S))


def test_a_client_deadline_cancels_the_generation_on_the_worker(mesh):
    async def scenario():
        async with channel(mesh.gateway) as ch:
            stub = gateway_pb2_grpc.GatewayStub(ch)
            before = await workers_seen(mesh.coordinator)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await collect(stub.Generate(req([9, 9], max_new_tokens=1900, ignore_eos=True), timeout=0.5))
            return info.value.code(), before, await settled(mesh.coordinator)

    code, before, after = asyncio.run(scenario())
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert after.load == 0 and after.steps - before.steps < 1900  # stopped on the worker, not run to its end


def test_a_worker_rejection_keeps_the_workers_code_and_message(mesh):
    """A second gateway that believes in a 4096-token context in front of workers with 2048 (a
    misconfiguration only the workers can catch)."""
    # Its own launcher: the mesh's counts the gateway another test stopped as exited.
    procs, port_file = Processes(mesh.spec.log_dir, mesh.spec.env), mesh.spec.state_dir / "gateway-long.port"
    try:
        procs.start("gateway-long", ["gateway", "--coordinator", mesh.coordinator, "--model", str(mesh.model_dir),
                                     "--port", "0", "--port-file", str(port_file), "--max-model-len", "4096",
                                     "--http-port", "-1"])
        long_gateway = f"127.0.0.1:{procs.wait_port('gateway-long', port_file, START_TIMEOUT_S)}"
        single, replies = asyncio.run(_rejection_scenario(long_gateway))
        assert procs.terminate("gateway-long") == 0
    finally:
        procs.stop()
    assert single.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "worker rank" in single.details() and "rejected" in single.details()
    assert "2048" in single.details()  # the worker's own explanation
    fins = {r.index: r.response.finished for r in replies if r.response.WhichOneof("event") == "finished"}
    assert fins[0].reason == LENGTH and fins[0].completion_tokens == 4
    assert fins[1].reason == ERROR and "INVALID_ARGUMENT" in fins[1].error and fins[1].completion_tokens == 0


async def _rejection_scenario(target: str):
    too_long = req([5] * 2000, max_new_tokens=100)  # fits 4096, not the workers' 2048
    async with Client(target) as client:
        await client.wait_until_serving(timeout=START_TIMEOUT_S)
    async with channel(target) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as single:
            await collect(stub.Generate(too_long, timeout=DEADLINE))
        batch = gateway_pb2.GenerateBatchRequest(requests=[req([5], max_new_tokens=4), too_long])
        replies = [r async for r in stub.GenerateBatch(batch, timeout=DEADLINE)]
    return single.value, replies


@pytest.fixture
def crash_mesh(tmp_path: Path):
    """A mesh of its own: the crash test destroys it, whatever order the tests run in. Requests
    wait at most 2 s for a worker that may take them (--recovery-wait)."""
    with running_mesh(tmp_path / "crash", gateway_flags=("--recovery-wait", "2")) as m:
        yield m


def test_when_every_worker_is_gone_requests_end_with_a_clear_error_and_the_gateway_stays_up(crash_mesh):
    """SIGKILL every worker mid-generation: no world can form from nobody. The requests in flight
    are migrated, wait --recovery-wait for a worker that may take them, and end with
    Finished{ERROR} after the tokens they had; a new request fails before any token with
    UNAVAILABLE; health is NOT_SERVING and ModelInfo says why; SIGTERM stops the gateway cleanly.
    (One worker lost is healed: test_a_killed_worker_loses_no_request_...)"""
    ended, (later, later_received), info, health = asyncio.run(_crash_scenario(crash_mesh))
    assert crash_mesh.terminate("gateway", timeout_s=10) == 0
    for streamed, fin in ended:
        assert fin.reason == ERROR and "worker" in fin.error
        assert fin.completion_tokens == streamed >= 1
    assert later.code() == grpc.StatusCode.UNAVAILABLE and "worker" in later.details()
    assert later_received == [], "a request with no worker got tokens"
    assert info.live_workers == 0 and info.not_serving_reason != ""
    assert health == health_pb2.HealthCheckResponse.NOT_SERVING


async def _crash_scenario(m):
    async with channel(m.gateway) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        calls = [stub.Generate(req([5 + i, 6], max_new_tokens=200, ignore_eos=True), timeout=DEADLINE)
                 for i in range(2)]
        firsts = [await _first_chunk(call) for call in calls]
        m.kill("worker0")
        m.kill("worker1")
        ended = []
        for first, call in zip(firsts, calls):
            rest = await _read_rest(call)
            ended.append((len(first.chunk.token_ids) + sum(len(r.chunk.token_ids) for r in rest[:-1]),
                          rest[-1].finished))
        received = []
        with pytest.raises(grpc.aio.AioRpcError) as later:
            # a request with no worker must fail, not hang: the call's deadline is the hang bound
            async for msg in stub.Generate(req([1, 2], max_new_tokens=4), timeout=DEADLINE):
                received.append(msg)
        info = await stub.ModelInfo(gateway_pb2.ModelInfoRequest(), timeout=10)
        health = (await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="moemesh.v1.Gateway"), timeout=10)).status
    return ended, (later.value, received), info, health


def _gateway_settings(coordinator: str, model_dir: Path, port_file: Path) -> GatewaySettings:
    return GatewaySettings(coordinator=coordinator, model_dir=model_dir, port=0, port_file=port_file, http_port=-1,
                           call_timeout_s=HANG_BOUND_S, recovery_wait_s=HANG_BOUND_S, grace_s=0)


async def _port_of(port_file: Path) -> int:
    """The port the in-process gateway published (bounded, like the launcher's wait)."""
    async def read() -> int:
        text = port_file.read_text().strip() if port_file.is_file() else ""
        if not text:
            raise FileNotFoundError(port_file)
        return int(text)

    return await retry(read, lambda exc: isinstance(exc, FileNotFoundError),
                       backoff=Backoff(first_s=0.01, cap_s=0.1, deadline_s=HANG_BOUND_S))


async def _health_until(health, wanted) -> None:
    """Check the Gateway service's health until it reports `wanted` (bounded). Polled: Health.Watch
    does not pass through moemesh.rpc.ErrorInterceptor (its handler is a coroutine, not a generator)."""
    async def check() -> None:
        reply = await health.Check(health_pb2.HealthCheckRequest(service="moemesh.v1.Gateway"), timeout=HANG_BOUND_S)
        if reply.status != wanted:
            raise LookupError(f"health is {reply.status}")

    await retry(check, lambda exc: isinstance(exc, LookupError),
                backoff=Backoff(first_s=0.01, cap_s=0.1, deadline_s=HANG_BOUND_S))


def test_health_and_model_info_follow_the_world_no_world_unservable_and_back(tmp_path: Path):
    """The real gateway (in this process) in front of a scripted coordinator and worker: NOT_SERVING
    with no world, SERVING once one is connected, NOT_SERVING while the world is unservable (a
    request sent then waits), SERVING again with the next world (the request runs in it)."""
    model_dir = write_tiny_model(tmp_path / "model", TINY)
    coordinator = ScriptedCoordinator()
    seen_in: list[int] = []  # the newest world when the worker got each submit

    def script(s):
        seen_in.append(coordinator.worlds[-1].generation)
        return [tokens(s.request_id, 7), finished(s.request_id, LENGTH, 1)]

    worker = ScriptedWorker(0, script)
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING

    async def scenario():
        async with served([worker], coordinator):
            stop = asyncio.Event()
            settings = _gateway_settings(coordinator.address, model_dir, tmp_path / "gateway.port")
            gateway = asyncio.create_task(serve(settings, stop))
            try:
                port = await _port_of(settings.port_file)
                async with channel(f"127.0.0.1:{port}") as ch:
                    stub = gateway_pb2_grpc.GatewayStub(ch)
                    watch = health_pb2_grpc.HealthStub(ch)
                    await _health_until(watch, not_serving)
                    infos = [await _info(stub)]
                    await coordinator.publish(scripted_world(1, worker))
                    await _health_until(watch, serving)
                    infos.append(await _info(stub))
                    unservable = scripted_world(2, worker, unservable_reason="layer 1 expert 2: no replica")
                    await coordinator.publish(unservable)
                    await _health_until(watch, not_serving)
                    infos.append(await _info(stub))
                    waiting = asyncio.create_task(collect(stub.Generate(req([3], max_new_tokens=1),
                                                                        timeout=HANG_BOUND_S)))
                    await coordinator.publish(scripted_world(3, worker))
                    await _health_until(watch, serving)
                    infos.append(await _info(stub))
                    done = [m for _, m in await waiting]
            finally:
                stop.set()
                await asyncio.wait_for(gateway, HANG_BOUND_S)
            return infos, done

    infos, done = asyncio.run(scenario())
    summary = [(i.world_generation, i.num_workers, i.live_workers) for i in infos]
    assert summary == [(0, 0, 0), (1, 1, 1), (2, 1, 1), (3, 1, 1)]
    assert infos[0].not_serving_reason.startswith("no world formed yet")
    assert infos[1].not_serving_reason == "" == infos[3].not_serving_reason
    assert infos[2].not_serving_reason == "world 2 cannot serve: layer 1 expert 2: no replica"
    ids, fin = check_stream(done)
    assert ids == [7] and fin.reason == LENGTH
    assert seen_in == [3], "the request sent while the world was unservable ran before a world could serve"


async def _info(stub) -> gateway_pb2.ModelInfoResponse:
    return await stub.ModelInfo(gateway_pb2.ModelInfoRequest(), timeout=HANG_BOUND_S)


def test_a_killed_worker_loses_no_request_every_one_finishes_with_the_reference_tokens(tmp_path: Path):
    """A 3-worker mesh streams 6 greedy requests; one worker is SIGKILLed mid-stream. The coordinator
    forms the next world from the two survivors (which keep their requests), the gateway migrates
    the dead worker's requests with the tokens already streamed: every request ends LENGTH with
    exactly the reference tokens at contiguous offsets, and ModelInfo.world_generation grew."""
    prompts = [[5 + i, 6, 7] for i in range(6)]
    n = 48

    async def scenario(m):
        async with channel(m.gateway) as ch:
            stub = gateway_pb2_grpc.GatewayStub(ch)
            before = await _info(stub)
            calls = [stub.Generate(req(p, max_new_tokens=n, ignore_eos=True), timeout=DEADLINE * 4) for p in prompts]
            firsts = [await _first_chunk(call) for call in calls]
            m.kill("worker1")
            results = [[first, *await _read_rest(call)] for first, call in zip(firsts, calls)]
            return before, results, await _info(stub)

    with running_mesh(tmp_path / "heal", workers=3) as m:
        before, results, after = asyncio.run(scenario(m))
        assert m.terminate("gateway", timeout_s=10) == 0
    for prompt, messages in zip(prompts, results):
        ids, fin = check_stream(messages)  # contiguous offsets: no duplicate, no missing token
        assert fin.reason == LENGTH and fin.error == "", fin.error
        assert ids == local_greedy(m.model_dir, prompt, n)
    assert after.world_generation > before.world_generation >= 1
    assert after.num_workers == after.live_workers == 2 and after.not_serving_reason == ""
