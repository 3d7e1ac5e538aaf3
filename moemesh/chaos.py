"""Chaos runs: a closed-loop load of known requests against a gateway while workers are killed.

Used by the chaos test (tests/moemesh/test_chaos.py: small and bounded) and by `make bench-chaos`
(scripts/bench_chaos.py: the figures of docs/reliability.md). Every request is greedy or seeded,
so each has exactly one right answer: the tokens `moemesh generate --local` makes for it
(`reference`). A run records, per request, every chunk's arrival time and tokens, and any error;
`Killer` SIGKILLs a random live worker process at a fixed interval, a bounded number of times.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from moemesh.engine.sampling import SamplingParams
from moemesh.errors import MoemeshError


@dataclass(frozen=True)
class ChaosRequest:
    prompt: tuple[int, ...]
    params: SamplingParams


@dataclass
class Outcome:
    """What the client saw of one request: chunks as (seconds since the run began, tokens)."""

    chunks: list[tuple[float, tuple[int, ...]]] = field(default_factory=list)
    error: str = ""
    started_s: float = 0.0
    ended_s: float = 0.0

    @property
    def tokens(self) -> list[int]:
        return [t for _, ids in self.chunks for t in ids]

    def longest_pause_s(self) -> float:
        """The longest wait for the next chunk (the first chunk counts from the request's start)."""
        times = [self.started_s] + [at for at, _ in self.chunks]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def make_requests(n: int, vocab: int, max_new_tokens: int, seed: int = 0) -> list[ChaosRequest]:
    """Half greedy, half seeded sampling (temperature 0.8, top-k 20), random prompts of 4-24 tokens."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = tuple(rng.randrange(1, vocab) for _ in range(rng.randint(4, 24)))
        if i % 2 == 0:
            params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
        else:
            params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.8, top_k=20, seed=1000 + i,
                                    ignore_eos=True)
        out.append(ChaosRequest(prompt, params))
    return out


def reference(model_dir: Path, requests: Sequence[ChaosRequest], max_model_len: int) -> list[list[int]]:
    """What `moemesh generate --local` makes for each request: the engine in this process."""
    from moemesh.engine.engine import Engine
    from moemesh.model.decoder import RuntimeShape, build_model

    engine = Engine(build_model(model_dir, RuntimeShape(max_seqs=len(requests), max_model_len=max_model_len)))
    ids = [f"ref-{i}" for i in range(len(requests))]
    for rid, req in zip(ids, requests):
        engine.add_request(rid, list(req.prompt), req.params)
    out: dict[str, list[int]] = {rid: [] for rid in ids}
    while engine.has_work:
        for ev in engine.step():
            if ev.token_id is not None:
                out[ev.request_id].append(ev.token_id)
    return [out[rid] for rid in ids]


async def run_load(gateway: str, requests: Sequence[ChaosRequest], concurrency: int, timeout_s: float,
                   on_done: Callable[[int], None] | None = None) -> tuple[list[Outcome], float]:
    """Send every request with at most `concurrency` in flight; (outcomes in request order, the
    run's start on time.monotonic())."""
    from moemesh.client import Client, Finished, TokenChunk

    outcomes = [Outcome() for _ in requests]
    begin = time.monotonic()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(requests)):
        queue.put_nowait(i)

    async def one(client: Client, i: int) -> None:
        req, out = requests[i], outcomes[i]
        out.started_s = time.monotonic() - begin
        try:
            async for ev in client.generate(token_ids=req.prompt, params=req.params, include_text=False,
                                            timeout=timeout_s):
                if isinstance(ev, TokenChunk):
                    out.chunks.append((time.monotonic() - begin, tuple(ev.token_ids)))
                elif isinstance(ev, Finished) and ev.reason in ("error", "cancelled"):
                    out.error = ev.error or ev.reason
        except (MoemeshError, grpc.aio.AioRpcError) as exc:
            out.error = f"{type(exc).__name__}: {exc}"
        out.ended_s = time.monotonic() - begin
        if on_done is not None:
            on_done(i)

    async def lane(client: Client) -> None:
        while not queue.empty():
            await one(client, queue.get_nowait())

    async with Client(gateway, timeout=timeout_s) as client:
        await asyncio.gather(*(lane(client) for _ in range(concurrency)))
    return outcomes, begin


class Killer:
    """SIGKILLs one random live worker process of `procs()` every `interval_s`, at most `kills` times,
    on its own thread; `stop()` ends it. `killed` lists (time.monotonic(), pid) per kill."""

    def __init__(self, procs: Callable[[], list], interval_s: float, kills: int, seed: int = 0):
        self.procs, self.interval_s, self.kills = procs, interval_s, kills
        self.killed: list[tuple[float, int]] = []
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="killer", daemon=True)

    def start(self) -> Killer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 5)

    def _run(self) -> None:
        while len(self.killed) < self.kills and not self._stop.wait(self.interval_s):
            live = [p for p in self.procs() if p.is_running()]
            if not live:
                continue
            victim = self._rng.choice(live)
            victim.kill()
            self.killed.append((time.monotonic(), victim.pid))


def worker_processes(root_pid: int) -> list:
    """The `moemesh worker` processes under `root_pid` (psutil.Process)."""
    import psutil

    found = []
    for p in psutil.Process(root_pid).children(recursive=True):
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if "moemesh.cli" in cmd and "worker" in cmd:
            found.append(p)
    return found
