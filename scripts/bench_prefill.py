"""`python scripts/bench_prefill.py`: long prompts arriving into running decodes, with and
without chunked prefill, on the single-process engine, one run (the same arrivals for both rows).

Load: `--decoders` short requests decode all the time (a finished one is replaced at once, so
that many always run); long requests (`--long-prompt` tokens, default 1024) arrive as a Poisson
process at `--rate` per second. Without chunked prefill a long prompt is prefilled whole in one
step, and every running request waits for it; with it each step carries every decode token plus
prefill chunks up to `--budget` tokens. Printed per row: output tokens/s (equal offered load, so
equal throughput while both keep up), TPOT (vLLM's: per request, (latency - TTFT) / (tokens - 1))
and inter-token latency of the short requests, mean and p99, and the long requests' TTFT.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from moemesh.engine.engine import Engine, EngineSettings
from moemesh.engine.sampling import SamplingParams
from moemesh.loadgen import RequestTiming, poisson_arrivals, summarize
from moemesh.model.decoder import RuntimeShape, build_model
from moemesh.model.tiny import TinySpec, write_tiny_model
from moemesh.settings import option, parse_settings

SPEC = TinySpec(arch="mixtral", layers=4, experts=8, top_k=2, hidden=256, intermediate=512, heads=8, kv_heads=4,
                vocab=512, seed=0)


@dataclass(frozen=True)
class BenchPrefillSettings:
    """The load; flags only."""

    ENV_PREFIX: ClassVar[str | None] = None

    decoders: int = option("--decoders", "short requests decoding at all times", int, default=16)
    short_prompt: int = option("--short-prompt", "tokens per short prompt", int, default=32)
    short_output: int = option("--short-output", "tokens generated per short request", int, default=32)
    long_requests: int = option("--long-requests", "long requests in the run", int, default=8)
    long_prompt: int = option("--long-prompt", "tokens per long prompt", int, default=1024)
    long_output: int = option("--long-output", "tokens generated per long request", int, default=16)
    rate: float = option("--rate", "long requests per second (Poisson)", float, default=0.5)
    budget: int = option("--budget", "tokens per step with chunked prefill (decode + prefill chunks)", int,
                         default=256)
    threads: int = option("--threads", "torch threads", int, default=1)
    json_path: Path | None = option("--json", "also write the rows here", Path, default=None, metavar="JSON")


@dataclass
class _Run:
    engine: Engine
    start: float
    timings: dict[str, RequestTiming]
    short: set[str]

    def add(self, rid: str, prompt: list[int], new_tokens: int, short: bool) -> None:
        self.engine.add_request(rid, prompt, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
        self.timings[rid] = RequestTiming(prompt_tokens=len(prompt), sent_at=time.perf_counter() - self.start)
        if short:
            self.short.add(rid)


def run(model: Path, s: BenchPrefillSettings, chunked: bool) -> dict[str, float]:
    """Drive the engine in this process on the wall clock: arrivals join between steps."""
    torch.set_num_threads(s.threads)
    settings = EngineSettings(max_batched_tokens=s.budget if chunked else 4096, chunked_prefill=chunked)
    runtime = RuntimeShape(max_seqs=s.decoders + s.long_requests,
                           max_model_len=max(s.long_prompt + s.long_output, s.short_prompt + s.short_output))
    engine = Engine(build_model(model, runtime), settings)
    g = torch.Generator().manual_seed(0)
    arrivals = poisson_arrivals(s.long_requests, s.rate, seed=0)
    longs = [torch.randint(3, SPEC.vocab, (s.long_prompt,), generator=g).tolist() for _ in arrivals]
    r = _Run(engine, time.perf_counter(), {}, set())
    made = 0
    for _ in range(s.decoders):
        r.add(f"s{made}", torch.randint(3, SPEC.vocab, (s.short_prompt,), generator=g).tolist(), s.short_output, True)
        made += 1
    next_long, long_left = 0, len(arrivals)
    while long_left:
        now = time.perf_counter() - r.start
        while next_long < len(arrivals) and arrivals[next_long] <= now:
            r.add(f"l{next_long}", longs[next_long], s.long_output, False)
            next_long += 1
        for ev in engine.step():
            t = r.timings[ev.request_id]
            t.token_times.append(time.perf_counter() - r.start - t.sent_at)
            if ev.finish is None:
                continue
            t.latency = t.token_times[-1]
            if ev.request_id in r.short:
                r.add(f"s{made}", torch.randint(3, SPEC.vocab, (s.short_prompt,), generator=g).tolist(),
                      s.short_output, True)
                made += 1
            else:
                long_left -= 1
    wall = time.perf_counter() - r.start
    for rid in engine.request_ids():  # the short requests still running at the end are not counted
        engine.cancel(rid)
        r.timings[rid].error = "cancelled"
    short = summarize([t for rid, t in r.timings.items() if rid in r.short], wall)
    long = summarize([t for rid, t in r.timings.items() if rid not in r.short], wall)
    every = summarize(list(r.timings.values()), wall)
    nan = float("nan")  # no short request finished (a run too short for the load)
    return {"output_tokens_per_s": every["output_tokens_per_s"], "short_done": short["requests"],
            **{k: short.get(k, nan) for k in ("tpot_mean_s", "tpot_p99_s", "itl_mean_s", "itl_p99_s")},
            "long_ttft_mean_s": long.get("ttft_mean_s", nan), "long_ttft_p99_s": long.get("ttft_p99_s", nan),
            "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    s = parse_settings(BenchPrefillSettings, argv, __doc__.splitlines()[0])
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_model(Path(tmp) / "model", SPEC)
        run(model, s, chunked=True)  # warm-up (threads, allocator), not reported
        rows["whole prompts"] = run(model, s, chunked=False)
        rows[f"chunked prefill, {s.budget} tokens/step"] = run(model, s, chunked=True)
    print(f"bench-prefill: Mixtral layout D={SPEC.hidden} E={SPEC.experts} top-{SPEC.top_k} L={SPEC.layers}; "
          f"{s.decoders} short requests ({s.short_prompt} -> {s.short_output} tokens) always decoding, "
          f"{s.long_requests} long ({s.long_prompt} -> {s.long_output}) arriving at {s.rate:g}/s (Poisson); "
          f"{s.threads} torch thread(s), fp32")
    print(f"{'':36} {'out tok/s':>9} {'short done':>10} {'TPOT ms':>8} {'p99':>7} {'ITL ms':>7} {'p99':>7} "
          f"{'long TTFT ms':>12} {'p99':>7}")
    for name, m in rows.items():
        print(f"{name:36} {m['output_tokens_per_s']:9.0f} {m['short_done']:10.0f} "
              f"{m['tpot_mean_s'] * 1e3:8.1f} {m['tpot_p99_s'] * 1e3:7.1f} "
              f"{m['itl_mean_s'] * 1e3:7.1f} {m['itl_p99_s'] * 1e3:7.1f} {m['long_ttft_mean_s'] * 1e3:12.0f} "
              f"{m['long_ttft_p99_s'] * 1e3:7.0f}")
    off, on = rows.values()
    print(f"p99 TPOT of the running requests: {off['tpot_p99_s'] / on['tpot_p99_s']:.2f}x lower with chunked prefill; "
          f"p99 ITL {off['itl_p99_s'] / on['itl_p99_s']:.2f}x lower; throughput ratio "
          f"{on['output_tokens_per_s'] / off['output_tokens_per_s']:.2f}")
    if s.json_path:
        s.json_path.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
