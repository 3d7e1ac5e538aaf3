"""make bench-chaos: what the loss of one worker costs a serving mesh, measured in one run.

`moemesh up --workers 4 --redundant-experts 1` serves a steady closed-loop load of greedy and
seeded requests (each with one right answer, `moemesh generate --local`'s); one worker is
SIGKILLed mid-run and `up` restarts it. Printed (and written to docs/reliability.md with --write):
output tokens/s before the kill, while the mesh heals, and after; the time from the kill until
tokens flow again and until the restarted worker has joined; the longest pause in the token stream
of each request in flight at the kill (p50, p99, max); requests failed; outputs that differ from
the reference. A script, not a test: these machines are noisy, so only ratios from this run mean
anything.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import threading
import time
from pathlib import Path

from moemesh.chaos import Outcome, make_requests, reference, run_load, worker_processes
from moemesh.client import Client
from moemesh.launcher import UpProcess
from moemesh.loadgen import percentile
from moemesh.model.tiny import TinySpec, write_tiny_model

# A random Mixtral-layout model (the chaos run measures recovery, not text)
MODEL_SPEC: dict = dict(arch="mixtral", layers=4, experts=8, top_k=2, hidden=256, intermediate=512, heads=8,
                        kv_heads=4, vocab=512, seed=0)

WORKERS = 4
MAX_MODEL_LEN = 512


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=48, help="requests in the load")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--kill-after", type=float, default=0.35, help="kill when this share of the load is done")
    ap.add_argument("--write", type=Path, default=None, help="write the table to this markdown file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-chaos-") as tmp:
        model = write_tiny_model(Path(tmp) / "model", TinySpec(**MODEL_SPEC))
        requests = make_requests(args.requests, MODEL_SPEC["vocab"], args.tokens, seed=7)
        print(f"reference: {len(requests)} requests through the engine in this process ...", flush=True)
        expected = reference(model, requests, MAX_MODEL_LEN)
        print(f"moemesh up --workers {WORKERS} --redundant-experts 1 ...", flush=True)
        up = UpProcess(model, WORKERS, ["--redundant-experts", "1"], max_model_len=MAX_MODEL_LEN, quiet=True)
        try:
            run = _run(up, requests, args)
        finally:
            up.stop()
    table = _table(run, expected, args)
    print(table)
    if args.write is not None:
        args.write.write_text(_page(table))
        print(f"wrote {args.write}")
    return 0


class _Run:
    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []
        self.begin = 0.0
        self.killed_at = 0.0  # seconds since the run began
        self.generations: list[tuple[float, int, int]] = []  # (seconds, generation, live workers)


def _run(up: UpProcess, requests, args) -> _Run:
    run = _Run()
    done = threading.Semaphore(0)
    kill_at = max(1, int(len(requests) * args.kill_after))
    stop = threading.Event()

    def killer() -> None:
        for _ in range(kill_at):
            done.acquire()
        victim = worker_processes(up.proc.pid)[-1]
        victim.kill()
        run.killed_at = time.monotonic() - run.begin
        print(f"killed worker pid {victim.pid} at {run.killed_at:.2f} s", flush=True)

    def watcher() -> None:
        asyncio.run(_watch(up.gateway, run, stop))

    threads = [threading.Thread(target=killer, daemon=True), threading.Thread(target=watcher, daemon=True)]
    run.begin = time.monotonic()
    for t in threads:
        t.start()
    run.outcomes, _ = asyncio.run(run_load(up.gateway, requests, args.concurrency, timeout_s=600.0,
                                           on_done=lambda i: done.release()))
    stop.set()
    for t in threads:
        t.join(timeout=10)
    return run


async def _watch(gateway: str, run: _Run, stop: threading.Event) -> None:
    """Poll ModelInfo every 50 ms: when each world generation appeared, with how many live workers."""
    async with Client(gateway) as client:
        while not stop.is_set():
            info = await client.model_info()
            now = time.monotonic() - run.begin
            if not run.generations or run.generations[-1][1:] != (info.world_generation, info.live_workers):
                run.generations.append((now, info.world_generation, info.live_workers))
            await asyncio.sleep(0.05)


def _tokens_between(outcomes: list[Outcome], a: float, b: float) -> int:
    return sum(len(ids) for o in outcomes for at, ids in o.chunks if a <= at < b)


def _table(run: _Run, expected: list[list[int]], args) -> str:
    outs, kill = run.outcomes, run.killed_at
    end = max(o.ended_s for o in outs)
    flowing = min((at for o in outs for at, _ in o.chunks if at > kill), default=end)  # first token after the kill
    rejoined = next((t for t, _, live in run.generations if t > kill and live == WORKERS), end)
    affected = [o for o in outs if o.started_s < kill < o.ended_s]
    pauses = [o.longest_pause_s() for o in affected]
    before = _tokens_between(outs, 0.0, kill) / max(kill, 1e-9)
    during = _tokens_between(outs, kill, rejoined) / max(rejoined - kill, 1e-9)
    after = _tokens_between(outs, rejoined, end) / max(end - rejoined, 1e-9)
    failed = sum(1 for o in outs if o.error)
    different = sum(1 for o, e in zip(outs, expected) if not o.error and o.tokens != e)
    gens = ", ".join(f"{g}@{t:.1f}s({live})" for t, g, live in run.generations)
    rows = [
        ("requests (greedy + seeded), tokens each, concurrency", f"{len(outs)}, {args.tokens}, {args.concurrency}"),
        ("output tokens/s before the kill", f"{before:.0f}"),
        ("output tokens/s from the kill to the rejoin", f"{during:.0f}"),
        ("output tokens/s after the rejoin", f"{after:.0f}"),
        ("after / before", f"{after / max(before, 1e-9):.2f} (target >= {(WORKERS - 1) / WORKERS:.2f})"),
        ("kill -> tokens flow again", f"{flowing - kill:.2f} s"),
        ("kill -> restarted worker serving in the mesh", f"{rejoined - kill:.2f} s"),
        (f"longest stream pause, {len(affected)} requests in flight at the kill: p50 / p99 / max",
         f"{percentile(pauses, 50):.2f} / {percentile(pauses, 99):.2f} / {max(pauses, default=0.0):.2f} s"),
        ("requests failed", f"{failed}"),
        ("outputs different from generate --local", f"{different}"),
        ("world generations (generation@time(live workers))", gens),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _page(table: str) -> str:
    return ("# Reliability: the loss of one worker under load\n\n"
            "Written by `make bench-chaos` (scripts/bench_chaos.py): `moemesh up --workers 4 "
            "--redundant-experts 1` on this 2-core machine, a closed-loop load, one worker SIGKILLed "
            "mid-run and restarted by `up`. One run; the machine is noisy.\n\n```\n" + table + "\n```\n")


if __name__ == "__main__":
    raise SystemExit(main())
