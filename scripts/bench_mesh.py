"""`make bench-mesh`: the single-process engine against the mesh with 2, 4 and 8 workers, same
model and load, one run. Prints output tokens/s, TTFT, TPOT (vLLM's definitions) and the share of
each worker's step time spent in collectives.

These machines have 2 cores: more than 2 workers oversubscribe them, and each collective then
waits on context switches. That is what the 4- and 8-worker rows show.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import torch

from moemesh.engine.engine import Engine
from moemesh.engine.sampling import SamplingParams
from moemesh.loadgen import RequestTiming, run_closed_loop, summarize
from moemesh.model.model import RuntimeShape, build_model
from moemesh.model.tiny import TinySpec, write_tiny_model
from moemesh.v1 import coordinator_pb2, coordinator_pb2_grpc, worker_pb2, worker_pb2_grpc

SPEC = TinySpec(arch="mixtral", layers=4, experts=8, top_k=2, hidden=256, intermediate=512, heads=8, kv_heads=4,
                vocab=512, seed=0)


def run_local(model: Path, prompts: list[list[int]], params: SamplingParams, threads: int) -> dict[str, float]:
    """The engine in this process, every request arriving at once (same as the mesh's load)."""
    torch.set_num_threads(threads)
    engine = Engine(build_model(model, RuntimeShape(max_seqs=len(prompts), max_model_len=256)))
    timings = {}
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
        timings[str(i)] = RequestTiming(prompt_tokens=len(p))
    while engine.has_work:
        events = engine.step()
        now = time.perf_counter() - start
        for ev in events:
            timings[ev.request_id].token_times.append(now)
            if ev.finish is not None:
                timings[ev.request_id].latency = now
    return summarize(list(timings.values()), time.perf_counter() - start)


def start_mesh(model: Path, workers: int) -> tuple[subprocess.Popen, str, str]:
    proc = subprocess.Popen([sys.executable, "-m", "moemesh.cli", "up", "--model", str(model), "--workers",
                             str(workers), "--port", "0", "--max-model-len", "256", "--max-seqs", "32"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    match = re.search(r"gateway at (\S+); coordinator at (\S+);", line)
    if not match:
        proc.kill()
        raise RuntimeError(f"mesh with {workers} workers did not start: {line!r}")
    return proc, match.group(1), match.group(2)


async def worker_counters(coordinator: str) -> list[worker_pb2.WorkerStatus]:
    async with grpc.aio.insecure_channel(coordinator) as ch:
        world = await coordinator_pb2_grpc.CoordinatorStub(ch).WaitForWorld(coordinator_pb2.WaitForWorldRequest(),
                                                                            timeout=10)
    out = []
    for m in world.members:
        async with grpc.aio.insecure_channel(m.address) as ch:
            out.append(await worker_pb2_grpc.WorkerStub(ch).Status(worker_pb2.StatusRequest(), timeout=10))
    return out


def run_mesh(model: Path, workers: int, prompts, params, concurrency: int) -> dict[str, float]:
    proc, gateway, coordinator = start_mesh(model, workers)
    try:
        asyncio.run(run_closed_loop(gateway, prompts[:4], params, concurrency))  # warm-up
        before = asyncio.run(worker_counters(coordinator))
        timings, wall = asyncio.run(run_closed_loop(gateway, prompts, params, concurrency))
        after = asyncio.run(worker_counters(coordinator))
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    metrics = summarize(timings, wall)
    step = sum(a.step_seconds - b.step_seconds for a, b in zip(after, before))
    coll = sum(a.collective_seconds - b.collective_seconds for a, b in zip(after, before))
    steps = max(a.steps - b.steps for a, b in zip(after, before))
    metrics["collective_share"] = coll / step if step else 0.0
    metrics["step_ms"] = 1e3 * step / len(after) / max(steps, 1)
    return metrics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    prompts = [[0] + torch.randint(3, SPEC.vocab, (args.prompt_len - 1,), generator=g).tolist()
               for _ in range(args.requests)]
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_model(Path(tmp) / "model", SPEC)
        rows["local (1 process, 2 threads)"] = run_local(model, prompts, params, threads=2)
        for n in args.workers:
            rows[f"mesh, {n} workers"] = run_mesh(model, n, prompts, params, args.concurrency)
    print_table(args, rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


def print_table(args, rows: dict[str, dict[str, float]]) -> None:
    base = next(iter(rows.values()))["output_tokens_per_s"]
    print(f"bench-mesh: Mixtral layout D={SPEC.hidden} F={SPEC.intermediate} E={SPEC.experts} top-{SPEC.top_k} "
          f"L={SPEC.layers}; {args.requests} requests, {args.concurrency} concurrent, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, fp32, gloo")
    print(f"{'deployment':30} {'out tok/s':>9} {'ratio':>6} {'TTFT ms':>8} {'TPOT ms':>8} {'step ms':>8} {'in collectives':>14}")
    for name, m in rows.items():
        share = f"{m['collective_share']:.0%}" if "collective_share" in m else "-"
        step = f"{m['step_ms']:.1f}" if "step_ms" in m else "-"
        print(f"{name:30} {m['output_tokens_per_s']:9.0f} {m['output_tokens_per_s'] / base:5.2f}x "
              f"{m['ttft_mean_s'] * 1e3:8.0f} {m['tpot_mean_s'] * 1e3:8.1f} {step:>8} {share:>14}")


if __name__ == "__main__":
    sys.exit(main())
