"""Load generation and serving metrics with vLLM's definitions (vllm/benchmarks/serve.py).

TTFT = time to the first token; TPOT = (latency - TTFT) / (output tokens - 1); ITL = gaps between
streamed chunks (several tokens of one chunk are one gap, as vLLM counts them); E2EL = latency;
throughput = completed requests, output tokens, or prompt + output tokens over the wall time of the
run. Percentiles interpolate linearly between order statistics (numpy.percentile's default, what
vLLM uses). All times are seconds.

Pure parts: `summarize`, `format_table`, `LengthDist`, `poisson_arrivals`, `make_requests`.
The driver: `run_load` sends a `LoadPlan` through a gateway (closed loop: a fixed number of requests
in flight; open loop: requests start at seeded Poisson arrival times, optionally also capped) and
returns per-request timings; a `stop` event ends it early with the requests finished so far.
`run_closed_loop` is the older closed-loop entry point (same driver).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from moemesh.engine.sampling import SamplingParams
from moemesh.errors import MoemeshError
from moemesh.tls import TlsFiles

CANCELLED = "cancelled"  # RequestTiming.error of a request a stopped run did not finish
FIRST_REGULAR_TOKEN = 3  # ids 0..2 are BOS, EOS, PAD in moemesh's tokenizer: random prompts avoid them


@dataclass
class RequestTiming:
    """One request as the client saw it; times in seconds from the request's own start.

    `token_times` holds one entry per output token (the tokens of one chunk share its arrival
    time); `chunk_times` one entry per streamed chunk (empty = every token was its own chunk).
    `error` is empty for a request that completed; failed and cancelled ones are not counted.
    """

    prompt_tokens: int
    token_times: list[float] = field(default_factory=list)  # arrival time of every output token
    latency: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # arrival time of every chunk
    error: str = ""
    sent_at: float = 0.0  # seconds from the start of the run to this request's send

    def add_chunk(self, now: float, tokens: int) -> None:
        """`tokens` new tokens arrived together at `now` (seconds from the request's start)."""
        self.chunk_times.append(now)
        self.token_times.extend([now] * tokens)

    @property
    def output_tokens(self) -> int:
        return len(self.token_times)

    @property
    def completed(self) -> bool:
        return not self.error and self.output_tokens > 0

    @property
    def ttft(self) -> float:
        return self.token_times[0]

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        """Gaps between consecutive chunk arrivals (token arrivals when no chunks were recorded)."""
        times = self.chunk_times or self.token_times
        return [b - a for a, b in itertools.pairwise(times)]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between order statistics (numpy's default method)."""
    ordered = sorted(values)
    pos = q / 100 * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(timings: Sequence[RequestTiming], wall_s: float) -> dict[str, float]:
    """Metrics over completed requests: counts, tokens/s, and mean/median/std/p99 of TTFT, TPOT,
    ITL and E2EL (keys like "ttft_mean_s"), in seconds. Failed and cancelled requests (a stopped
    run) are only counted."""
    done = [t for t in timings if t.completed]
    out_tokens = sum(t.output_tokens for t in done)
    prompt_tokens = sum(t.prompt_tokens for t in done)
    per_s = 1.0 / wall_s if wall_s > 0 else 0.0
    m: dict[str, float] = {
        "requests": len(done),
        "failed": sum(1 for t in timings if not t.completed and t.error != CANCELLED),
        "cancelled": sum(1 for t in timings if t.error == CANCELLED),
        "wall_s": wall_s,
        "prompt_tokens": prompt_tokens,
        "output_tokens": out_tokens,
        "request_throughput": len(done) * per_s,
        "output_tokens_per_s": out_tokens * per_s,
        "total_tokens_per_s": (out_tokens + prompt_tokens) * per_s,
    }
    series = {
        "ttft": [t.ttft for t in done],
        "tpot": [t.tpot for t in done if t.tpot is not None],
        "itl": [gap for t in done for gap in t.itls],
        "e2el": [t.latency for t in done],
    }
    for name, values in series.items():
        if values:
            m[f"{name}_mean_s"] = statistics.fmean(values)
            m[f"{name}_median_s"] = statistics.median(values)
            m[f"{name}_std_s"] = statistics.pstdev(values)
            m[f"{name}_p99_s"] = percentile(values, 99)
    return m


_TABLE_ROWS = (("ttft", "Time to first token"), ("tpot", "Time per output token (excl. 1st)"),
               ("itl", "Inter-token latency"), ("e2el", "End-to-end latency"))


def format_table(m: dict[str, float], title: str = "Serving Benchmark Result") -> str:
    """vLLM-style text table of `summarize`'s metrics (latencies in ms)."""
    lines = [f"{' ' + title + ' ':=^60}"]

    def row(label: str, value: str) -> None:
        lines.append(f"{label:<42}{value:>18}")

    row("Successful requests:", f"{int(m['requests'])}")
    row("Failed requests:", f"{int(m.get('failed', 0))}")
    if m.get("cancelled"):
        row("Cancelled (run stopped):", f"{int(m['cancelled'])}")
    row("Benchmark duration (s):", f"{m['wall_s']:.2f}")
    row("Total input tokens:", f"{int(m.get('prompt_tokens', 0))}")
    row("Total generated tokens:", f"{int(m.get('output_tokens', 0))}")
    row("Request throughput (req/s):", f"{m['request_throughput']:.2f}")
    row("Output token throughput (tok/s):", f"{m['output_tokens_per_s']:.2f}")
    row("Total token throughput (tok/s):", f"{m['total_tokens_per_s']:.2f}")
    for key, label in _TABLE_ROWS:
        if f"{key}_mean_s" not in m:
            continue
        lines.append(f"{' ' + label + ' ':-^60}")
        for stat in ("mean", "median", "p99"):
            stat_name = stat.capitalize() if stat != "p99" else "P99"
            row(f"{stat_name} {key.upper()} (ms):", f"{m[f'{key}_{stat}_s'] * 1e3:.2f}")
    lines.append("=" * 60)
    return "\n".join(lines)


# ---- workload: lengths, prompts, arrivals ---------------------------------------------------------
@dataclass(frozen=True)
class LengthDist:
    """A token-length distribution: "N" (fixed), "uniform:A:B" (integers A..B inclusive) or
    "normal:MEAN:STD" (rounded, at least 1)."""

    kind: str  # "fixed" | "uniform" | "normal"
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, text: str) -> LengthDist:
        parts = text.strip().split(":")
        try:
            if len(parts) == 1:
                dist = cls("fixed", int(parts[0]))
            elif len(parts) == 3 and parts[0] in ("uniform", "normal"):
                a, b = (int(parts[1]), int(parts[2])) if parts[0] == "uniform" else (float(parts[1]), float(parts[2]))
                dist = cls(parts[0], a, b)
            else:
                raise ValueError("unknown form")
        except ValueError as exc:
            raise MoemeshError(f"length {text!r}: want N, uniform:A:B or normal:MEAN:STD ({exc})") from exc
        dist.check()
        return dist

    def check(self) -> None:
        if self.kind == "fixed" and self.a < 1:
            raise MoemeshError(f"length {self.a} must be >= 1")
        if self.kind == "uniform" and not 1 <= self.a <= self.b:
            raise MoemeshError(f"uniform:{self.a}:{self.b} needs 1 <= A <= B")
        if self.kind == "normal" and (self.a < 1 or self.b < 0):
            raise MoemeshError(f"normal:{self.a}:{self.b} needs MEAN >= 1 and STD >= 0")

    def sample(self, n: int, rng: random.Random) -> list[int]:
        """n lengths, each >= 1, drawn from `rng`."""
        if self.kind == "fixed":
            return [int(self.a)] * n
        if self.kind == "uniform":
            return [rng.randint(int(self.a), int(self.b)) for _ in range(n)]
        return [max(1, round(rng.gauss(self.a, self.b))) for _ in range(n)]

    def __str__(self) -> str:
        return f"{int(self.a)}" if self.kind == "fixed" else f"{self.kind}:{self.a:g}:{self.b:g}"


def poisson_arrivals(n: int, rate: float, seed: int, burstiness: float = 1.0) -> list[float]:
    """Start times (seconds from 0) of n requests arriving at `rate` requests/s on average.

    Gaps are Gamma(shape=burstiness, mean=1/rate): burstiness 1 is a Poisson process
    (exponential gaps), < 1 burstier, > 1 more regular (vLLM's --burstiness). rate=inf: all at 0.
    """
    if rate <= 0 or burstiness <= 0:
        raise MoemeshError(f"request rate ({rate}) and burstiness ({burstiness}) must be > 0")
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return out


@dataclass(frozen=True)
class BenchRequest:
    """One request of a load: prompt token ids and the exact number of tokens to generate."""

    prompt: tuple[int, ...]
    output_len: int


def make_requests(
    n: int, prompt_len: LengthDist, output_len: LengthDist, vocab_size: int, seed: int, max_context: int = 0
) -> list[BenchRequest]:
    """n requests with random prompt token ids in [3, vocab_size), lengths from the two
    distributions, all from `seed`. max_context > 0: MoemeshError if any would not fit."""
    if vocab_size <= FIRST_REGULAR_TOKEN:
        raise MoemeshError(f"vocabulary of {vocab_size} ids leaves none for random prompts")
    rng = random.Random(seed)
    prompts, outputs = prompt_len.sample(n, rng), output_len.sample(n, rng)
    reqs = [BenchRequest(tuple(rng.randrange(FIRST_REGULAR_TOKEN, vocab_size) for _ in range(p)), o)
            for p, o in zip(prompts, outputs)]
    too_long = [r for r in reqs if max_context and len(r.prompt) + r.output_len > max_context]
    if too_long:
        r = too_long[0]
        raise MoemeshError(f"{len(too_long)} requests exceed the served context of {max_context} tokens "
                           f"(e.g. prompt {len(r.prompt)} + output {r.output_len}); use shorter lengths")
    return reqs


# ---- the driver --------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadPlan:
    """What to send and when."""

    requests: tuple[BenchRequest, ...]
    arrivals: tuple[float, ...] | None = None  # start offsets in seconds; None = all at once
    concurrency: int | None = None  # most requests in flight; None = no cap
    timeout_s: float = 600.0  # deadline of each request's RPC


async def run_load(
    target: str, plan: LoadPlan, *, on_done: Callable[[RequestTiming], None] | None = None,
    stop: asyncio.Event | None = None, tls: TlsFiles | None = None, api_key: str | None = None,
) -> tuple[list[RequestTiming], float]:
    """Drive the gateway at `target` with `plan`; returns (timings in request order, wall seconds).

    Setting `stop` cancels every request still queued or streaming (their RPCs are cancelled, so
    the gateway stops their generations) and returns at once; those requests carry
    error="cancelled" and the wall time ends at the stop.
    """
    from moemesh.client import Client

    n = len(plan.requests)
    if plan.arrivals is not None and len(plan.arrivals) != n:
        raise MoemeshError(f"{len(plan.arrivals)} arrival times for {n} requests")
    timings = [RequestTiming(prompt_tokens=len(r.prompt)) for r in plan.requests]
    gate = asyncio.Semaphore(plan.concurrency or max(n, 1))
    async with Client(target, timeout=plan.timeout_s, tls=tls, api_key=api_key) as client:
        start = time.perf_counter()

        async def one(i: int) -> None:
            if plan.arrivals is not None:
                await asyncio.sleep(max(0.0, start + plan.arrivals[i] - time.perf_counter()))
            async with gate:
                await _stream_one(client, plan.requests[i], timings[i], start)
            if on_done is not None:
                on_done(timings[i])

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        await _until_done_or_stopped(tasks, stop)
        wall = time.perf_counter() - start
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for t in timings:
        if not t.completed and not t.error:
            t.error = CANCELLED  # never started, or stopped before its first token
    return timings, wall


async def _until_done_or_stopped(tasks: list[asyncio.Task], stop: asyncio.Event | None) -> None:
    """Return when every task has ended, or as soon as `stop` is set."""
    if not tasks:
        return
    stopper = asyncio.ensure_future(stop.wait() if stop is not None else asyncio.Future())
    pending = set(tasks)
    try:
        while pending and not stopper.done():
            _, pending = await asyncio.wait(pending | {stopper}, return_when=asyncio.FIRST_COMPLETED)
            pending.discard(stopper)
    finally:
        stopper.cancel()


async def _stream_one(client, req: BenchRequest, t: RequestTiming, run_start: float) -> None:
    """Stream one request into `t`; records failures in `t.error` instead of raising."""
    import grpc

    from moemesh.client import Finished, TokenChunk

    params = SamplingParams(max_new_tokens=req.output_len, ignore_eos=True)
    begin = time.perf_counter()
    t.sent_at = begin - run_start
    try:
        async for ev in client.generate(token_ids=req.prompt, params=params, include_text=False):
            if isinstance(ev, TokenChunk):
                t.add_chunk(time.perf_counter() - begin, len(ev.token_ids))
            elif isinstance(ev, Finished) and ev.reason in ("error", "cancelled"):
                t.error = ev.error or f"the server ended it: {ev.reason}"
    except asyncio.CancelledError:
        t.error = CANCELLED
        raise
    except (MoemeshError, grpc.aio.AioRpcError) as exc:
        t.error = f"{type(exc).__name__}: {exc}"
    finally:
        t.latency = time.perf_counter() - begin


async def run_closed_loop(
    target: str, prompts: Sequence[Sequence[int]], params: SamplingParams, concurrency: int, timeout_s: float = 600.0
) -> tuple[list[RequestTiming], float]:
    """Send every prompt (greedy, exactly params.max_new_tokens each) with at most `concurrency`
    in flight; returns timings and wall time."""
    reqs = tuple(BenchRequest(tuple(p), params.max_new_tokens) for p in prompts)
    return await run_load(target, LoadPlan(reqs, concurrency=concurrency, timeout_s=timeout_s))


def engine_timings(
    engine, prompts: Sequence[Sequence[int]], params: SamplingParams
) -> tuple[list[RequestTiming], float]:
    """The single-process engine under the same load as `run_closed_loop` (every prompt at once),
    timed per token as it is made; returns timings and wall time."""
    timings: dict[str, RequestTiming] = {}
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(str(i), list(p), params)
        timings[str(i)] = RequestTiming(prompt_tokens=len(p))
    while engine.has_work:
        events = engine.step()
        now = time.perf_counter() - start
        for ev in events:
            timings[ev.request_id].token_times.append(now)
            if ev.finish is not None:
                timings[ev.request_id].latency = now
    return list(timings.values()), time.perf_counter() - start
