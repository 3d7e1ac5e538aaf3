"""`moemesh bench --target HOST:PORT`: a load generator over the gateway's gRPC API.

Closed loop (`--concurrency C`: C requests in flight, the next starts when one ends) or open loop
(`--request-rate R`: requests start at seeded Poisson arrival times, R per second on average;
`--concurrency` then caps how many are in flight, like vLLM's --max-concurrency). Prompts are random
token ids from the served vocabulary (ModelInfo), prompt and output lengths fixed ("128") or drawn
("uniform:64:256", "normal:128:32"); every request generates exactly its output length
(ignore_eos). Warm-up requests run first and are not measured. Reports vLLM's metrics
(moemesh.loadgen) as a table, and with --json FILE as JSON. Ctrl-C cancels the requests in flight
and reports the ones that finished (exit code 130).

Also runnable as `python -m moemesh.bench_cli bench --target ...`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

from moemesh.commands import run
from moemesh.errors import ConfigError, MoemeshError
from moemesh.loadgen import (
    LengthDist,
    LoadPlan,
    RequestTiming,
    format_table,
    make_requests,
    poisson_arrivals,
    run_load,
    summarize,
)
from moemesh.settings import add_options, option, parse_bool, settings_from
from moemesh.tls import ca_option, cert_option, key_option, tls_of

EXIT_OK, EXIT_FAILED_REQUESTS, EXIT_INTERRUPTED = 0, 1, 130


def _concurrency(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"--concurrency must be >= 1, got {value}")
    return value


@dataclass(frozen=True)
class BenchSettings:
    """One benchmark run; built once from the command line. Flags only (no MOEMESH_* variables): the
    report's settings are the whole story of a run."""

    ENV_PREFIX: ClassVar[str | None] = None

    target: str = option("--target", "a running gateway", metavar="HOST:PORT")
    requests: int = option("--requests", "measured requests", int, default=64)
    # most requests in flight; None = no cap (open loop only; the closed loop's default is 8)
    concurrency: int | None = option("--concurrency", "requests in flight (closed loop: 8 when unset); with "
                                     "--request-rate: a cap", _concurrency, default=None)
    # requests/s; inf = closed loop (all queued at once, capped by concurrency)
    request_rate: float = option("--request-rate", "open loop: Poisson arrivals, requests/s (inf: closed loop)",
                                 float, default=math.inf)
    burstiness: float = option("--burstiness", "Gamma shape of arrival gaps (1 = Poisson)", float, default=1.0)
    prompt_len: LengthDist = option("--prompt-len", "N, uniform:A:B or normal:MEAN:STD tokens", LengthDist.parse,
                                    default=LengthDist("fixed", 32))
    output_len: LengthDist = option("--output-len", "N, uniform:A:B or normal:MEAN:STD tokens", LengthDist.parse,
                                    default=LengthDist("fixed", 32))
    warmup: int = option("--warmup", "unmeasured requests first", int, default=4)  # closed loop, not reported
    seed: int = option("--seed", "seed of the prompts and arrivals", int, default=0)
    timeout_s: float = option("--timeout", "deadline of each request, seconds", float, default=600.0)
    json_path: Path | None = option("--json", "also write the report here", Path, default=None, metavar="FILE")
    progress: bool = option("--no-progress", "no progress bar on stderr", parse_bool, default=True)
    tls_cert: Path | None = cert_option(env="MOEMESH_TLS_CERT")  # mTLS to the gateway: all three or none
    tls_key: Path | None = key_option(env="MOEMESH_TLS_KEY")
    tls_ca: Path | None = ca_option(env="MOEMESH_TLS_CA")
    api_key: str | None = option("--api-key", "API key sent as 'authorization: Bearer <key>' (prefer the variable: "
                                 "a command line is visible to other users)", default=None, env="MOEMESH_API_KEY",
                                 metavar="KEY")

    def __post_init__(self) -> None:
        tls_of(self)  # all three or none
        if self.requests < 1 or self.warmup < 0:
            raise ConfigError("--requests must be >= 1 and --warmup >= 0")
        if self.concurrency is None and self.mode == "closed":
            object.__setattr__(self, "concurrency", 8)

    @property
    def mode(self) -> str:
        return "closed" if math.isinf(self.request_rate) else "open"

    def describe(self) -> dict:
        d = asdict(self)
        del d["api_key"]  # a secret never goes into a report
        d.update({name: str(d[name]) if d[name] else None for name in ("tls_cert", "tls_key", "tls_ca")})
        d.update(prompt_len=str(self.prompt_len), output_len=str(self.output_len), mode=self.mode,
                 json_path=str(self.json_path) if self.json_path else None,
                 request_rate=None if math.isinf(self.request_rate) else self.request_rate)
        return d


class Progress:
    """A progress bar on stderr: tqdm when installed, else one rewritten "\\r" line."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.total, self.done, self.label, self.enabled = total, 0, label, enabled
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=label, unit="req", file=sys.stderr, leave=True)
            except ImportError:
                self._draw()

    def update(self, _: RequestTiming | None = None) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update(1)
        elif self.enabled:
            self._draw()

    def _draw(self) -> None:
        width = 30
        filled = width * self.done // max(self.total, 1)
        print(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}",
              end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            print(file=sys.stderr, flush=True)


async def _model_info(s: BenchSettings) -> dict:
    """The served model (vocabulary and context for the prompts); MoemeshError if unreachable."""
    import grpc

    from moemesh.client import Client

    async with Client(s.target, tls=tls_of(s), api_key=s.api_key) as client:
        try:
            info = await client.model_info(timeout=10.0)
        except grpc.aio.AioRpcError as exc:
            raise MoemeshError(f"gateway {s.target}: {exc.code().name}: {exc.details()}") from exc
    m = info.model
    return {"name": m.name, "architecture": m.architecture, "vocab_size": m.vocab_size,
            "max_context": m.max_context, "num_experts": m.num_experts, "top_k": m.top_k,
            "num_workers": info.num_workers, "transport": info.transport}


def build_plan(s: BenchSettings, model: dict) -> tuple[LoadPlan, LoadPlan]:
    """(warm-up plan, measured plan); the warm-up uses its own seed so its prompts differ."""
    make = lambda n, seed: tuple(make_requests(n, s.prompt_len, s.output_len, model["vocab_size"], seed,
                                               model["max_context"]))
    warm = LoadPlan(make(s.warmup, s.seed + 1), concurrency=s.concurrency or s.warmup or 1, timeout_s=s.timeout_s)
    arrivals = None if s.mode == "closed" else tuple(poisson_arrivals(s.requests, s.request_rate, s.seed, s.burstiness))
    return warm, LoadPlan(make(s.requests, s.seed), arrivals=arrivals, concurrency=s.concurrency, timeout_s=s.timeout_s)


async def _drive(s: BenchSettings, model: dict) -> tuple[list[RequestTiming], float, bool]:
    """Warm up, then measure; Ctrl-C sets `stop`: (timings, wall seconds, interrupted)."""
    warm, plan = build_plan(s, model)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGINT, stop.set)
        handler = True
    except RuntimeError:  # not the main thread (a library caller): no Ctrl-C handling here
        handler = False
    try:
        if warm.requests:
            bar = Progress(len(warm.requests), "warm-up", s.progress)
            await run_load(s.target, warm, on_done=bar.update, stop=stop, tls=tls_of(s), api_key=s.api_key)
            bar.close()
        if stop.is_set():
            return [], 0.0, True
        bar = Progress(len(plan.requests), "bench", s.progress)
        timings, wall = await run_load(s.target, plan, on_done=bar.update, stop=stop, tls=tls_of(s),
                                       api_key=s.api_key)
        bar.close()
        return timings, wall, stop.is_set()
    finally:
        if handler:
            loop.remove_signal_handler(signal.SIGINT)


def bench(s: BenchSettings) -> tuple[dict, int]:
    """Run the benchmark: (the JSON report, exit code)."""
    model = asyncio.run(_model_info(s))
    timings, wall, interrupted = asyncio.run(_drive(s, model))
    metrics = summarize(timings, wall)
    report = {
        "settings": s.describe(), "model": model, "interrupted": interrupted, "metrics": metrics,
        "per_request": [{"prompt_tokens": t.prompt_tokens, "output_tokens": t.output_tokens,
                         "sent_at_s": t.sent_at, "ttft_s": t.ttft if t.output_tokens else None,
                         "latency_s": t.latency, "error": t.error} for t in timings],
    }
    if interrupted:
        return report, EXIT_INTERRUPTED
    return report, EXIT_FAILED_REQUESTS if metrics["failed"] else EXIT_OK


def add_bench_command(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    p = sub.add_parser("bench", help="load-test a gateway: TPS, TTFT, TPOT, ITL, latency (vLLM's metrics)")
    add_options(p, BenchSettings)

    def run(args: argparse.Namespace) -> int:
        settings = settings_from(BenchSettings, args, {})
        report, code = bench(settings)
        title = "Serving Benchmark Result" + (" (interrupted: partial)" if report["interrupted"] else "")
        print(_header(settings, report["model"]))
        print(format_table(report["metrics"], title))
        if settings.json_path:
            settings.json_path.write_text(json.dumps(report, indent=2) + "\n")
        return code

    return run


def _header(s: BenchSettings, model: dict) -> str:
    load = (f"{s.concurrency} in flight" if s.mode == "closed" else
            f"{s.request_rate:g} req/s Poisson (burstiness {s.burstiness:g}), cap {s.concurrency or 'none'}")
    return (f"moemesh bench: {s.target} ({model['name']}, {model['num_workers']} workers, {model['transport']}); "
            f"{s.requests} requests, {load}; prompt {s.prompt_len}, output {s.output_len} tokens; seed {s.seed}")


def main(argv: list[str] | None = None) -> int:
    """`python -m moemesh.bench_cli bench ...` (the same command `moemesh bench` registers)."""
    return run(argv, (add_bench_command,))


if __name__ == "__main__":
    sys.exit(main())
