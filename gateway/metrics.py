"""The gateway's Prometheus metrics: vLLM's request metrics, as the client sees them, plus the pool's.

Request metrics (vLLM's names, prefix `moemesh:`, vLLM's buckets) are updated by
`gateway.generation.Progress` as a request's events pass through the gateway (one call per
chunk, never per token): time to first token and inter-token latency from the gateway's clock
(from the call's arrival), end-to-end latency, prompt and generation tokens (prompt tokens when
the request is placed, generation tokens as they are streamed: the counters equal what clients
sent and received), and requests by finished_reason (stop, length, error, cancelled: the client
went away or its deadline passed).

Pool metrics (requests in flight, migrated requests, the world generation served, live workers)
are read at scrape time on the event loop that owns the pool (`watch_pool`): the scrape thread
never walks the loop's dictionaries.

The registry is served on --metrics-port and, through `asgi_app()`, at GET /metrics on the
gateway's HTTP port.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, make_asgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.workers import WorkerPool
from moemesh.metrics import (
    ITL_BUCKETS,
    MODEL_LABEL,
    PREFIX,
    REQUEST_LATENCY_BUCKETS,
    TTFT_BUCKETS,
    buckets_1_2_5,
)
from moemesh.v1 import common_pb2

SCRAPE_ON_LOOP_TIMEOUT_S = 2.0  # hang bound: a scrape gives up on the pool's numbers when its loop is this late


def finished_reason(reason: common_pb2.FinishReason.ValueType) -> str:
    """FINISH_REASON_STOP -> "stop" (the finished_reason label)."""
    return common_pb2.FinishReason.Name(reason).removeprefix("FINISH_REASON_").lower()


class GatewayMetrics:
    """The gateway's request metrics on `registry` (one per gateway), labelled with `model`."""

    def __init__(self, registry: CollectorRegistry, model: str, max_model_len: int):
        self.registry, self.model = registry, model
        labels = [MODEL_LABEL]

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(f"{PREFIX}{name}", doc, labels, buckets=buckets, registry=registry)

        self.ttft = histogram("time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              TTFT_BUCKETS).labels(model)
        self.itl = histogram("inter_token_latency_seconds", "Histogram of inter-token latency in seconds (between "
                             "consecutive chunks streamed to the client).", ITL_BUCKETS).labels(model)
        self.e2e = histogram("e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             REQUEST_LATENCY_BUCKETS).labels(model)
        self.prompt_hist = histogram("request_prompt_tokens", "Number of prefill tokens processed.",
                                     buckets_1_2_5(max_model_len)).labels(model)
        self.generation_hist = histogram("request_generation_tokens", "Number of generation tokens processed.",
                                         buckets_1_2_5(max_model_len)).labels(model)
        self.prompt_tokens = Counter(f"{PREFIX}prompt_tokens", "Number of prefill tokens processed.", labels,
                                     registry=registry).labels(model)
        self.generation_tokens = Counter(f"{PREFIX}generation_tokens", "Number of generation tokens processed.",
                                         labels, registry=registry).labels(model)
        self._success = Counter(f"{PREFIX}request_success", "Count of processed requests by finished_reason.",
                                [MODEL_LABEL, "finished_reason"], registry=registry)
        for reason in ("stop", "length", "error", "cancelled"):
            self._success.labels(model, reason)  # every reason is exported from the start, at 0

    # ---- one request (called on the event loop by gateway.generation.Progress) -----------------------
    def placed(self, prompt_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.prompt_hist.observe(prompt_tokens)

    def streamed(self, tokens: int, since_s: float, first: bool) -> None:
        """A chunk of `tokens` went to the client, `since_s` after the call arrived (`first`) or after
        the previous chunk."""
        self.generation_tokens.inc(tokens)
        (self.ttft if first else self.itl).observe(since_s)

    def ended(self, reason: str, latency_s: float, generated: int) -> None:
        self._success.labels(self.model, reason).inc()
        self.e2e.observe(latency_s)
        self.generation_hist.observe(generated)

    # ---- the pool, and serving ---------------------------------------------------------------------
    def watch_pool(self, pool: WorkerPool, loop: asyncio.AbstractEventLoop) -> None:
        """Export the pool's numbers, read on `loop` at each scrape."""
        self.registry.register(_PoolCollector(self.model, lambda: _on_loop(loop, lambda: pool_stats(pool))))

    def asgi_app(self):
        """An ASGI app serving this registry (mounted at GET /metrics on the gateway's HTTP port)."""
        return make_asgi_app(self.registry)


@dataclass(frozen=True)
class PoolStats:
    in_flight: int
    live_workers: int
    generation: int
    migrations: int


def pool_stats(pool: WorkerPool) -> PoolStats:
    return PoolStats(pool.inflight, pool.live_workers, pool.generation, pool.migrations)


def _on_loop(loop: asyncio.AbstractEventLoop, read: Callable[[], PoolStats]) -> PoolStats | None:
    """`read()` run on `loop` (None when the loop is closed or does not get to it in time); at once
    when called on that loop (GET /metrics on the gateway's HTTP port)."""
    try:
        if asyncio.get_running_loop() is loop:
            return read()
    except RuntimeError:  # no loop in this thread: the metrics server's
        pass
    future: concurrent.futures.Future[PoolStats] = concurrent.futures.Future()

    def run() -> None:
        if future.set_running_or_notify_cancel():
            future.set_result(read())

    try:
        loop.call_soon_threadsafe(run)
        return future.result(SCRAPE_ON_LOOP_TIMEOUT_S)
    except (RuntimeError, concurrent.futures.TimeoutError):
        future.cancel()
        return None


class _PoolCollector(Collector):
    def __init__(self, model: str, stats: Callable[[], PoolStats | None]):
        self.model, self.stats = model, stats

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self.stats()
        if s is None:
            return
        for name, doc, value in (
            ("requests_in_flight", "Requests admitted and not yet ended (waiting for a worker included).",
             s.in_flight),
            ("live_workers", "Members of the world with an open Serve stream.", s.live_workers),
            ("world_generation", "World generation this gateway serves (0 = none yet).", s.generation),
        ):
            gauge = GaugeMetricFamily(f"{PREFIX}{name}", doc, labels=[MODEL_LABEL])
            gauge.add_metric([self.model], value)
            yield gauge
        migrated = CounterMetricFamily(f"{PREFIX}request_migrations", "Requests submitted again to another worker "
                                       "after theirs let go of them.", labels=[MODEL_LABEL])
        migrated.add_metric([self.model], s.migrations)
        yield migrated
