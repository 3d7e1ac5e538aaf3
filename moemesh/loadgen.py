"""Load generation and serving metrics with vLLM's definitions (vllm/benchmarks/serve.py).

TTFT = time to the first token; TPOT = (latency - TTFT) / (output tokens - 1); ITL = gaps between
streamed tokens; throughput = output tokens / wall time of the run. The arithmetic is pure
(`summarize`); `run_closed_loop` drives a gateway with a fixed number of requests in flight.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from moemesh.engine.sampling import SamplingParams


@dataclass
class RequestTiming:
    """One request as the client saw it; times in seconds from the request's own start."""

    prompt_tokens: int
    token_times: list[float] = field(default_factory=list)  # arrival time of every output token
    latency: float = 0.0

    @property
    def output_tokens(self) -> int:
        return len(self.token_times)

    @property
    def ttft(self) -> float:
        return self.token_times[0]

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summarize(timings: Sequence[RequestTiming], wall_s: float) -> dict[str, float]:
    """Metrics over completed requests (each with >= 1 token), in seconds and tokens/s."""
    done = [t for t in timings if t.output_tokens]
    out_tokens = sum(t.output_tokens for t in done)
    ttfts = [t.ttft for t in done]
    tpots = [t.tpot for t in done if t.tpot is not None]
    itls = [b - a for t in done for a, b in zip(t.token_times, t.token_times[1:])]
    lat = [t.latency for t in done]
    m = {
        "requests": len(done),
        "wall_s": wall_s,
        "request_throughput": len(done) / wall_s,
        "output_tokens_per_s": out_tokens / wall_s,
        "total_tokens_per_s": (out_tokens + sum(t.prompt_tokens for t in done)) / wall_s,
    }
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", lat)):
        if values:
            m[f"{name}_mean_s"] = statistics.fmean(values)
            m[f"{name}_median_s"] = statistics.median(values)
            m[f"{name}_p99_s"] = _pct(values, 99)
    return m


async def run_closed_loop(
    target: str, prompts: Sequence[Sequence[int]], params: SamplingParams, concurrency: int, timeout_s: float = 600.0
) -> tuple[list[RequestTiming], float]:
    """Send every prompt with at most `concurrency` in flight; returns timings and wall time."""
    from moemesh.client import Client, TokenChunk

    gate = asyncio.Semaphore(concurrency)
    timings: list[RequestTiming] = []

    async with Client(target, timeout=timeout_s) as client:
        async def one(prompt: Sequence[int]) -> None:
            async with gate:
                t = RequestTiming(prompt_tokens=len(prompt))
                start = time.perf_counter()
                async for ev in client.generate(token_ids=prompt, params=params, include_text=False):
                    if isinstance(ev, TokenChunk):
                        now = time.perf_counter() - start
                        t.token_times.extend([now] * len(ev.token_ids))
                t.latency = time.perf_counter() - start
                timings.append(t)

        start = time.perf_counter()
        await asyncio.gather(*(one(p) for p in prompts))
        return timings, time.perf_counter() - start
