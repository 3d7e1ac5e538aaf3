"""The load generator: vLLM's metric arithmetic on synthetic streams, seeded arrivals and lengths,
the driver against a scripted in-process gateway, and one real `moemesh bench` against a real
tiny mesh (`moemesh up`)."""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import statistics
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

from moemesh.errors import MoemeshError
from moemesh.loadgen import (
    BenchRequest,
    LengthDist,
    LoadPlan,
    RequestTiming,
    format_table,
    make_requests,
    percentile,
    poisson_arrivals,
    run_load,
    summarize,
)
from moemesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc


# ---- metric arithmetic -----------------------------------------------------------------------
def _synthetic() -> list[RequestTiming]:
    a = RequestTiming(prompt_tokens=10)
    for t in (0.1, 0.2, 0.3, 0.4):
        a.add_chunk(t, 1)
    a.latency = 0.5
    b = RequestTiming(prompt_tokens=20)
    b.add_chunk(0.2, 2)  # two tokens in one chunk: one ITL gap, two tokens
    b.add_chunk(0.6, 1)
    b.latency = 0.6
    c = RequestTiming(prompt_tokens=5, token_times=[0.3], latency=0.3)  # one token: no TPOT
    failed = RequestTiming(prompt_tokens=7, token_times=[0.1], latency=0.2, error="UnavailableError: gone")
    cancelled = RequestTiming(prompt_tokens=9, error="cancelled")
    return [a, b, c, failed, cancelled]


def test_summarize_exact_values():
    m = summarize(_synthetic(), wall_s=2.0)
    assert (m["requests"], m["failed"], m["cancelled"]) == (3, 1, 1)
    assert (m["output_tokens"], m["prompt_tokens"]) == (8, 35)
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_tokens_per_s"] == pytest.approx(4.0)
    assert m["total_tokens_per_s"] == pytest.approx(21.5)
    # TTFT 0.1, 0.2, 0.3
    assert (m["ttft_mean_s"], m["ttft_median_s"]) == (pytest.approx(0.2), pytest.approx(0.2))
    assert m["ttft_p99_s"] == pytest.approx(0.2 + 0.98 * 0.1)  # linear between order statistics
    assert m["ttft_std_s"] == pytest.approx(statistics.pstdev([0.1, 0.2, 0.3]))
    # TPOT = (latency - TTFT) / (tokens - 1): (0.5 - 0.1) / 3 and (0.6 - 0.2) / 2; c has one token
    assert m["tpot_mean_s"] == pytest.approx((0.4 / 3 + 0.2) / 2)
    assert m["tpot_median_s"] == pytest.approx((0.4 / 3 + 0.2) / 2)
    # ITL per chunk: a: 0.1 0.1 0.1; b: 0.4 (its first chunk carried 2 tokens)
    assert m["itl_mean_s"] == pytest.approx(0.175)
    assert m["itl_median_s"] == pytest.approx(0.1)
    assert m["itl_p99_s"] == pytest.approx(0.1 + 0.97 * 0.3)
    assert (m["e2el_mean_s"], m["e2el_median_s"]) == (pytest.approx(1.4 / 3), pytest.approx(0.5))


def test_token_times_without_chunks_count_every_token():
    """Timings filled per token (the single-process benchmarks do) give one ITL per token."""
    t = RequestTiming(prompt_tokens=1, token_times=[1.0, 1.5, 3.0], latency=3.0)
    assert t.itls == [0.5, 1.5] and t.tpot == pytest.approx(1.0)


def test_percentile_matches_numpy():
    rng = random.Random(3)
    values = [rng.expovariate(1.0) for _ in range(101)]
    for q in (0, 1, 50, 90, 99, 99.9, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_nothing_completed_and_zero_wall():
    m = summarize([RequestTiming(prompt_tokens=3, error="cancelled")], wall_s=0.0)
    assert m["requests"] == 0 and m["output_tokens_per_s"] == 0.0 and "ttft_mean_s" not in m
    assert "Successful requests" in format_table(m)


def test_table_shows_milliseconds():
    text = format_table(summarize(_synthetic(), 2.0))
    assert "Mean TTFT (ms):" in text and "200.00" in text and "Output token throughput (tok/s):" in text


# ---- arrivals and lengths -----------------------------------------------------------------------
def test_poisson_arrivals_statistics():
    times = poisson_arrivals(20_000, rate=50.0, seed=7)
    gaps = np.diff(times)
    assert times[0] == 0.0 and (gaps > 0).all()
    assert gaps.mean() == pytest.approx(1 / 50, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential: CV 1
    # counts in 1 s windows are Poisson(50): variance = mean
    counts = np.bincount(np.floor(times).astype(int))[:-1]
    assert counts.var() / counts.mean() == pytest.approx(1.0, rel=0.2)
    assert poisson_arrivals(100, 50.0, seed=7) == list(times[:100])  # seeded
    assert poisson_arrivals(100, 50.0, seed=8) != list(times[:100])


def test_burstiness_and_infinite_rate():
    regular = np.diff(poisson_arrivals(20_000, rate=10.0, seed=1, burstiness=4.0))
    assert regular.mean() == pytest.approx(0.1, rel=0.03)
    assert regular.std() / regular.mean() == pytest.approx(0.5, rel=0.05)  # Gamma(4): CV 1/2
    assert poisson_arrivals(5, math.inf, seed=0) == [0.0] * 5
    with pytest.raises(MoemeshError):
        poisson_arrivals(5, 0.0, seed=0)


def test_length_distributions():
    rng = random.Random(0)
    assert LengthDist.parse("32").sample(4, rng) == [32] * 4
    u = LengthDist.parse("uniform:8:16").sample(5000, rng)
    assert min(u) == 8 and max(u) == 16 and statistics.fmean(u) == pytest.approx(12, rel=0.02)
    n = LengthDist.parse("normal:100:10").sample(5000, rng)
    assert statistics.fmean(n) == pytest.approx(100, rel=0.01) and statistics.pstdev(n) == pytest.approx(10, rel=0.05)
    assert min(LengthDist.parse("normal:2:50").sample(1000, rng)) == 1  # clipped to >= 1
    assert str(LengthDist.parse("uniform:8:16")) == "uniform:8:16"
    for bad in ("0", "uniform:5:2", "poisson:3", "normal:x:1", "uniform:1"):
        with pytest.raises(MoemeshError):
            LengthDist.parse(bad)


def test_make_requests_is_seeded_and_checks_the_context():
    kw = dict(prompt_len=LengthDist.parse("uniform:4:8"), output_len=LengthDist.parse("6"), vocab_size=300)
    a, b = make_requests(20, seed=5, **kw), make_requests(20, seed=5, **kw)
    assert a == b and a != make_requests(20, seed=6, **kw)
    assert all(3 <= t < 300 for r in a for t in r.prompt) and all(4 <= len(r.prompt) <= 8 for r in a)
    with pytest.raises(MoemeshError, match="context"):
        make_requests(20, seed=5, max_context=10, **kw)


# ---- the driver against a scripted gateway --------------------------------------------------------
class ScriptedGateway(gateway_pb2_grpc.GatewayServicer):
    """Streams max_new_tokens tokens, one every `gap_s`, after `first_s`."""

    def __init__(self, first_s: float = 0.02, gap_s: float = 0.01):
        self.first_s, self.gap_s, self.active, self.cancelled = first_s, gap_s, 0, 0
        self.cancelled_changed = asyncio.Condition()

    async def Generate(self, request, context):
        self.active += 1
        try:
            await asyncio.sleep(self.first_s)
            n = request.sampling.max_new_tokens
            for i in range(n):
                if i:
                    await asyncio.sleep(self.gap_s)
                chunk = gateway_pb2.GenerateResponse.TokenChunk(token_ids=[5], offset=i)
                yield gateway_pb2.GenerateResponse(chunk=chunk)
            yield gateway_pb2.GenerateResponse(finished=gateway_pb2.GenerateResponse.Finished(
                reason=common_pb2.FINISH_REASON_LENGTH, prompt_tokens=len(request.token_ids.ids), completion_tokens=n))
        except asyncio.CancelledError:
            self.cancelled += 1
            async with self.cancelled_changed:
                self.cancelled_changed.notify_all()
            raise
        finally:
            self.active -= 1

    async def ModelInfo(self, request, context):
        spec = common_pb2.ModelSpec(name="scripted", vocab_size=300, max_context=256)
        return gateway_pb2.ModelInfoResponse(model=spec, num_workers=1, transport="local")


async def _with_gateway(body, **kw):
    server = grpc.aio.server()
    servicer = ScriptedGateway(**kw)
    gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        return await body(f"127.0.0.1:{port}", servicer)
    finally:
        await server.stop(0)


def _requests(n: int, out: int) -> tuple[BenchRequest, ...]:
    return tuple(BenchRequest((3, 4, 5), out) for _ in range(n))


def test_closed_loop_times_every_token():
    async def body(target, servicer):
        return await run_load(target, LoadPlan(_requests(6, 5), concurrency=2, timeout_s=30))

    timings, wall = asyncio.run(_with_gateway(body))
    m = summarize(timings, wall)
    assert m["requests"] == 6 and m["output_tokens"] == 30
    assert all(t.ttft >= 0.02 for t in timings)
    # Every token is timed when it arrives. Causality bounds it below: the server sends token i
    # first_s + i x gap_s after the RPC reached it, which is after the client's clock started
    # (1 ms for the event loop's clock resolution). Above, no token comes after the request ends.
    # Not a speed check: a slow machine only makes the times larger.
    for t in timings:
        assert len(t.token_times) == 5 and len(t.itls) == 4  # one chunk per token
        assert all(t.token_times[i] >= 0.02 + i * 0.01 - 1e-3 for i in range(5))
        assert t.token_times == sorted(t.token_times) and t.token_times[-1] <= t.latency
    assert wall >= 3 * (0.02 + 4 * 0.01)  # 6 requests, 2 at a time


def test_open_loop_follows_arrivals_and_caps_concurrency():
    arrivals = (0.0, 0.05, 0.1, 0.3)

    async def body(target, servicer):
        seen = []

        async def watch():
            while True:
                seen.append(servicer.active)
                await asyncio.sleep(0.002)

        watcher = asyncio.create_task(watch())
        try:
            plan = LoadPlan(_requests(4, 3), arrivals=arrivals, concurrency=1, timeout_s=30)
            return await run_load(target, plan), seen
        finally:
            watcher.cancel()

    (timings, _), seen = asyncio.run(_with_gateway(body))
    assert all(t.completed for t in timings) and max(seen) <= 1
    assert all(t.sent_at >= a - 1e-3 for t, a in zip(timings, arrivals))
    assert timings[3].sent_at >= 0.3 - 1e-3


def test_stop_returns_partial_results_and_cancels_rpcs():
    async def body(target, servicer):
        stop = asyncio.Event()

        async def stop_once_both_stream() -> None:  # not after a fixed delay: a loaded machine may not
            deadline = time.monotonic() + 30  # have sent them by then (hang bound)
            while servicer.active < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            stop.set()

        stopper = asyncio.create_task(stop_once_both_stream())
        started = time.perf_counter()
        timings, wall = await run_load(target, LoadPlan(_requests(8, 100), concurrency=2, timeout_s=30), stop=stop)
        stopped_first = stop.is_set()  # run_load returned because of the stop, not on its own
        await stopper
        async with servicer.cancelled_changed:  # the server sees both cancellations
            await asyncio.wait_for(servicer.cancelled_changed.wait_for(lambda: servicer.cancelled >= 2),
                                   timeout=30)  # hang bound
        return timings, wall, time.perf_counter() - started, servicer.cancelled, stopped_first

    timings, wall, took, cancelled, stopped_first = asyncio.run(_with_gateway(body, first_s=0.01, gap_s=0.01))
    # Stopped long before 8 requests x 100 tokens could finish. (It compared wall >= 0.25 s, the stop's
    # delay, but the delay starts before run_load's clock does: a race this states without a clock.)
    assert stopped_first and wall > 0
    assert took < 60.0  # hang bound
    assert all(t.error == "cancelled" for t in timings) and cancelled == 2
    m = summarize(timings, wall)
    assert m["requests"] == 0 and m["cancelled"] == 8


def test_bench_reports_table_and_json(tmp_path):
    """`bench` end to end against the scripted gateway: warm-up, Poisson arrivals, JSON."""
    from moemesh.bench_cli import BenchSettings, bench

    async def body(target, servicer):
        s = BenchSettings(target=target, requests=5, concurrency=None, request_rate=50.0, burstiness=1.0,
                          prompt_len=LengthDist.parse("uniform:2:6"), output_len=LengthDist.parse("4"), warmup=2,
                          seed=1, timeout_s=30, json_path=None, progress=False)
        return await asyncio.to_thread(bench, s)

    report, code = asyncio.run(_with_gateway(body))
    assert code == 0 and not report["interrupted"]
    assert report["model"]["vocab_size"] == 300 and report["settings"]["mode"] == "open"
    assert report["metrics"]["requests"] == 5 and report["metrics"]["output_tokens"] == 20
    assert len(report["per_request"]) == 5 and json.dumps(report)


# ---- one real run against a real mesh ----------------------------------------------------------------
@pytest.mark.slow  # a real mesh (moemesh up)
def test_moemesh_bench_against_a_real_mesh(tmp_path):
    from moemesh.launcher import UpProcess
    from moemesh.model.tiny import TinySpec, write_tiny_model

    model = write_tiny_model(tmp_path / "model", TinySpec(layers=2, experts=4, top_k=2, hidden=64, intermediate=64,
                                                          heads=4, kv_heads=2, vocab=512, seed=1))
    mesh = UpProcess(model, workers=2, quiet=True)
    gateway = mesh.gateway
    try:
        out = tmp_path / "bench.json"
        run = subprocess.run(
            [sys.executable, "-m", "moemesh.bench_cli", "bench", "--target", gateway, "--requests", "8",
             "--concurrency", "4", "--prompt-len", "uniform:4:12", "--output-len", "8", "--warmup", "2",
             "--timeout", "60", "--json", str(out), "--no-progress"],
            capture_output=True, text=True, timeout=180)
    finally:
        mesh.stop()
    assert run.returncode == 0, run.stderr
    assert "Output token throughput" in run.stdout and "Mean TPOT (ms):" in run.stdout
    report = json.loads(out.read_text())
    m = report["metrics"]
    assert (m["requests"], m["failed"], m["output_tokens"]) == (8, 0, 64)
    assert report["model"]["num_workers"] == 2 and report["model"]["transport"] == "gloo"
    assert 0 < m["ttft_mean_s"] < m["e2el_mean_s"] and m["tpot_mean_s"] > 0
    # summarize's arithmetic is checked by hand above (test_summarize_exact_values); here the report
    # agrees with itself: every request lies inside the measured wall, the per-request tokens add
    # up, and the table prints the JSON's throughput.
    per_request = report["per_request"]
    assert sum(r["output_tokens"] for r in per_request) == 64
    assert all(r["sent_at_s"] + r["latency_s"] <= m["wall_s"] + 1e-6 for r in per_request)
    printed = re.search(r"Output token throughput \(tok/s\):\s+([0-9.]+)", run.stdout)
    assert printed and float(printed.group(1)) == pytest.approx(m["output_tokens_per_s"], abs=0.006)
