"""Measured rates of this machine, for the cost model's CPU profile (not pure: runs torch).

Everything is measured the way the mesh uses the machine: `measure_rates(processes)` starts that
many processes with one torch thread each (what `moemesh up` gives each worker on 2 cores), joined
by gloo, and measures *while all of them run the same benchmark at once*:

- fp32 matmul rate (FLOP/s per process) on a compute-bound shape;
- weight-streaming rate (bytes/s per process): skinny matmuls (a few token rows against many
  distinct weight matrices, more bytes than the caches hold), which is what a decode step's expert
  and attention projections do;
- gloo all_to_all_single: latency (seconds at a tiny size) and bandwidth (bytes/s from a large
  size), and all_gather latency (the step header);
- `Calibrator.busy_latency`: the all_to_all's latency when the ranks are busy between exchanges
  for given durations (a decode step's duty cycle): on a shared machine it is several times the
  back-to-back latency, because a rank that was descheduled arrives late.

`measure_overheads(model_dir, ...)` times the single-process engine, with the mesh's transport over
a one-rank world, on a copy of the model's structure with negligible widths: what is left is the
host-side cost (Python, torch dispatch) per step, per layer and per expert with tokens.
`engine_step_s` times that engine on the model itself (a mesh worker minus its serving threads).
`measure_mesh_decode` reads a running mesh's worker Status counters over a window of decode steps.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class CpuRates:
    """Rates per process, measured with `processes` processes running at once."""

    processes: int
    matmul_flops_per_s: float  # FLOP/s of a 512x1024x1024 fp32 matmul
    stream_bytes_per_s: float  # weight bytes/s read by skinny matmuls from DRAM
    a2a_latency_s: float  # gloo all_to_all_single of a tiny buffer, mean (the tail counts in a step)
    a2a_bytes_per_s: float  # (bytes sent by one rank) / (time above the latency) at a large size
    gather_latency_s: float  # gloo all_gather of 3 int64 (the step header), mean


def _timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def matmul_rate(repeats: int = 5) -> float:
    """FLOP/s of fp32 (512 x 1024) @ (1024 x 1024) in this process, median of `repeats`."""
    a, b = torch.randn(512, 1024), torch.randn(1024, 1024)
    a @ b
    return 2 * 512 * 1024 * 1024 / statistics.median(_timed(lambda: a @ b, repeats))


def stream_rate(rows: int = 8, d: int = 256, f: int = 1024, total_bytes: int = 64 << 20, repeats: int = 3) -> float:
    """Weight bytes/s of skinny matmuls: (rows x d) @ (d x f) over distinct matrices totalling
    `total_bytes` (more than the last-level cache), median of `repeats` passes."""
    n = max(1, total_bytes // (d * f * 4))
    weights = [torch.randn(d, f) for _ in range(n)]
    x = torch.randn(rows, d)

    def sweep() -> None:
        for w in weights:
            torch.mm(x, w)

    sweep()
    return n * d * f * 4 / statistics.median(_timed(sweep, repeats))


def _collective_times(rank: int, world: int, repeats: int) -> dict[str, float]:
    import torch.distributed as dist

    def a2a(n_floats: int) -> float:
        send = torch.zeros(world * n_floats)
        recv = torch.empty_like(send)
        for _ in range(5):
            dist.all_to_all_single(recv, send)
        dist.barrier()
        return statistics.fmean(_timed(lambda: dist.all_to_all_single(recv, send), repeats))

    header = torch.zeros(3, dtype=torch.int64)
    outs = [torch.empty_like(header) for _ in range(world)]
    for _ in range(5):
        dist.all_gather(outs, header)
    dist.barrier()
    gather = statistics.fmean(_timed(lambda: dist.all_gather(outs, header), repeats))
    tiny = a2a(64)
    big_floats = 256 * 1024  # 1 MiB to every peer
    big = a2a(big_floats)
    sent = (world - 1) * big_floats * 4  # bytes leaving this rank
    return {"a2a_latency_s": tiny, "a2a_bytes_per_s": sent / max(big - tiny, 1e-9), "gather_latency_s": gather}


def _replay(segments: tuple[float, ...], cycles: int) -> float:
    """Every rank: busy for each of `segments` seconds in turn, a tiny all_to_all after each (the
    duty cycle of a decode step: attention, exchange, experts, exchange). Returns the mean time of
    those all_to_alls: their latency when the ranks compute in between, as a mesh's do. On a
    shared machine a rank that was descheduled arrives late and its peers wait for it."""
    import torch.distributed as dist

    send = torch.zeros(dist.get_world_size() * 64)
    recv = torch.empty_like(send)
    waits = []
    dist.barrier()
    for _ in range(cycles):
        for busy in segments:
            end = time.perf_counter() + busy
            while time.perf_counter() < end:
                pass
            t = time.perf_counter()
            dist.all_to_all_single(recv, send)
            waits.append(time.perf_counter() - t)
    return statistics.fmean(waits)


def _measure_rates(repeats: int) -> dict[str, float]:
    """Every rank at once: matmul, weight streaming, collectives (see CpuRates)."""
    import torch.distributed as dist

    dist.barrier()
    mm = matmul_rate()
    dist.barrier()
    stream = stream_rate()
    dist.barrier()
    times = _collective_times(dist.get_rank(), dist.get_world_size(), repeats)
    return {"matmul_flops_per_s": mm, "stream_bytes_per_s": stream, **times}


def _rank_main(rank: int, world: int, store_path: str, inbox, outbox) -> None:
    """A calibration process: joins the gloo world, then runs commands from `inbox` until None."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        while (command := inbox.get()) is not None:
            name, args = command
            try:
                if name == "rates":
                    result = _measure_rates(*args)
                elif name == "replay":
                    result = {"latency_s": _replay(*args)}
                else:
                    dist.barrier()
                    result = measure_overheads(*args).__dict__
                outbox.put((rank, result))
            except Exception as exc:  # report, keep serving: the parent raises
                outbox.put((rank, exc))
    finally:
        dist.destroy_process_group()


class Calibrator:
    """`processes` one-thread processes joined by gloo that measure on command, all at once
    (the machine as `processes` mesh workers see it). Use as a context manager; each call
    returns the median over the processes."""

    def __init__(self, processes: int = 2, timeout_s: float = 120.0):
        import torch.multiprocessing as mp

        self.processes, self.timeout_s = processes, timeout_s
        self._ctx = mp.get_context("spawn")
        self._tmp = tempfile.TemporaryDirectory(prefix="moemesh-measure-")
        self._outbox = self._ctx.Queue()
        self._inboxes = [self._ctx.Queue() for _ in range(processes)]
        store = os.path.join(self._tmp.name, "store")
        self._procs = [self._ctx.Process(target=_rank_main, args=(r, processes, store, self._inboxes[r], self._outbox),
                                         daemon=True) for r in range(processes)]

    def __enter__(self) -> Calibrator:
        for p in self._procs:
            p.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        for box in self._inboxes:
            box.put(None)
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        self._tmp.cleanup()

    def _run(self, name: str, args: tuple) -> list[dict[str, float]]:
        for box in self._inboxes:
            box.put((name, args))
        results = [self._outbox.get(timeout=self.timeout_s)[1] for _ in self._procs]
        for r in results:
            if isinstance(r, Exception):
                raise r
        return results

    def rates(self, repeats: int = 50) -> CpuRates:
        results = self._run("rates", (repeats,))
        med = {k: statistics.median(r[k] for r in results) for k in results[0]}
        return CpuRates(processes=self.processes, **med)

    def busy_latency(self, segments: tuple[float, ...], cycles: int = 20) -> float:
        """Mean all_to_all time when every rank is busy for `segments` seconds before each one."""
        return statistics.median(r["latency_s"] for r in self._run("replay", (tuple(segments), cycles)))

    def overheads(self, model_dir: str | Path, batch: int, context: int, steps: int = 30) -> Overheads:
        results = self._run("overheads", (str(model_dir), batch, context, steps))
        return Overheads(**{k: statistics.median(r[k] for r in results) for k in results[0]})


def measure_rates(processes: int = 2, repeats: int = 50) -> CpuRates:
    """Start `processes` one-thread processes and measure once (see Calibrator)."""
    with Calibrator(processes) as cal:
        return cal.rates(repeats)


# ---- host-side overheads of the engine ----------------------------------------------------------
@dataclass(frozen=True)
class Overheads:
    """Host-side seconds of one forward step, beyond what moving bytes and FLOPs costs."""

    per_step_s: float  # embedding, final norm, lm head launch, sampling, scheduling
    per_layer_s: float  # norms, attention ops, router, dispatch/combine bookkeeping
    per_expert_s: float  # per expert that receives tokens (its two matmul launches, SiLU, copy)


def measure_overheads(model_dir: str | Path, batch: int, context: int, steps: int = 30) -> Overheads:
    """Host overheads of the engine with the mesh's transport (one-rank world), measured on a copy
    of `model_dir`'s structure (layers, experts, top-k, heads, family) with negligible widths, at
    `batch` decoding sequences of `context` tokens. Two runs (every expert hit / one expert hit per
    layer) separate the per-expert cost; a one-layer copy separates the per-step cost."""
    from moemesh.model.config import load_config

    cfg = load_config(model_dir)
    with tempfile.TemporaryDirectory(prefix="moemesh-overhead-") as tmp:
        full = _micro_model(Path(tmp) / "full", cfg, cfg.num_layers)
        one = _micro_model(Path(tmp) / "one", cfg, 1)
        t_full_all = _decode_step_s(full, batch, context, steps, spread=True)
        t_full_one = _decode_step_s(full, batch, context, steps, spread=False)
        t_one_all = _decode_step_s(one, batch, context, steps, spread=True)
    L, E = cfg.num_layers, cfg.num_experts
    hits_all, hits_one = min(E, batch * cfg.top_k), cfg.top_k
    per_expert = max(0.0, (t_full_all - t_full_one) / (L * max(hits_all - hits_one, 1)))
    per_layer_all = (t_full_all - t_one_all) / max(L - 1, 1)  # one layer with every expert hit
    per_layer = max(0.0, per_layer_all - hits_all * per_expert)
    per_step = max(0.0, t_one_all - per_layer_all)
    return Overheads(per_step_s=per_step, per_layer_s=per_layer, per_expert_s=per_expert)


def engine_step_s(model_dir: str | Path, batch: int, context: int, steps: int = 20, threads: int = 1) -> float:
    """Seconds per decode step of the single-process engine (mesh transport over one rank) on the
    model itself, in this process with `threads` torch threads: a mesh worker's step without its
    serving threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _decode_step_s(Path(model_dir), batch, context, steps, spread=True)
    finally:
        torch.set_num_threads(before)


def _micro_model(out: Path, cfg, layers: int) -> Path:
    from moemesh.model.tiny import TinySpec, write_tiny_model

    heads, kv = cfg.num_heads, cfg.num_kv_heads
    spec = TinySpec(arch=cfg.family, layers=layers, experts=cfg.num_experts, top_k=cfg.top_k, hidden=2 * heads,
                    intermediate=2, heads=heads, kv_heads=kv, vocab=260, seed=0)
    return write_tiny_model(out, spec)


def _decode_step_s(model_dir: Path, batch: int, context: int, steps: int, spread: bool) -> float:
    """Seconds per decode step of the engine with the mesh transport over one rank. spread=False
    forces every token of a layer to the same top-k experts (router weights zeroed)."""
    from moemesh.engine.engine import Engine
    from moemesh.engine.sampling import SamplingParams
    from moemesh.mesh.gloo import GlooCollective
    from moemesh.mesh.placement import initial_placement
    from moemesh.mesh.transport import AllToAllTransport
    from moemesh.model.config import load_config
    from moemesh.model.decoder import RuntimeShape, build_model

    cfg = load_config(model_dir)
    placement = initial_placement(cfg.num_experts, cfg.moe_layer_ids, 1)
    transport = AllToAllTransport(GlooCollective(0, 1), placement)
    model = build_model(model_dir, RuntimeShape(max_seqs=batch, max_model_len=context + steps + 8), transport=transport)
    if not spread:
        for lw in model.dense.layers:
            if lw.router is not None:
                lw.router.zero_()
    engine = Engine(model)
    params = SamplingParams(max_new_tokens=steps + 6, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    for i in range(batch):
        engine.add_request(str(i), torch.randint(3, cfg.vocab_size, (context,), generator=gen).tolist(), params)
    engine.step()  # prefill
    for _ in range(5):
        engine.step()
    times = []
    while engine.has_work:
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    return statistics.fmean(times)


# ---- the mesh, measured -------------------------------------------------------------------------
@dataclass(frozen=True)
class MeshDecode:
    """Decode steps of a running mesh over a window, from every worker's Status counters."""

    steps: int  # steps the slowest-counting worker ran in the window
    step_s: float  # step_seconds / steps, mean over workers (every rank runs every step)
    collective_s: float  # collective_seconds / steps, mean over workers
    tokens_per_step: tuple[float, ...]  # per worker
    wall_per_step_s: float  # window wall time / steps (includes the time between steps)


async def worker_statuses(coordinator: str, timeout_s: float = 10.0) -> list:
    """Every worker's Status (moemesh.v1 WorkerStatus), by rank, via the coordinator's world."""
    import grpc

    from moemesh.v1 import (
        coordinator_pb2,
        coordinator_pb2_grpc,
        worker_pb2,
        worker_pb2_grpc,
    )

    async with grpc.aio.insecure_channel(coordinator) as ch:
        world = await coordinator_pb2_grpc.CoordinatorStub(ch).WaitForWorld(
            coordinator_pb2.WaitForWorldRequest(), timeout=timeout_s)
    out = []
    for member in world.members:
        async with grpc.aio.insecure_channel(member.address) as ch:
            out.append(await worker_pb2_grpc.WorkerStub(ch).Status(worker_pb2.StatusRequest(), timeout=timeout_s))
    return out


def step_counters(before: list, after: list) -> dict[str, float]:
    """Two rounds of worker_statuses -> "collective_share" (time blocked in collectives / step
    time, over all workers), "hidden_share" (exchange time overlapped with compute / exchange time,
    over all workers; 0 without exchanges) and "step_ms" (mean step time) over the steps between."""
    step = sum(a.step_seconds - b.step_seconds for a, b in zip(after, before))
    coll = sum(a.collective_seconds - b.collective_seconds for a, b in zip(after, before))
    exchange = sum(a.exchange_seconds - b.exchange_seconds for a, b in zip(after, before))
    hidden = sum(a.hidden_seconds - b.hidden_seconds for a, b in zip(after, before))
    steps = max(a.steps - b.steps for a, b in zip(after, before))
    return {"collective_share": coll / step if step else 0.0, "hidden_share": hidden / exchange if exchange else 0.0,
            "step_ms": 1e3 * step / len(after) / max(steps, 1)}


async def measure_mesh_decode(gateway: str, coordinator: str, requests: int, prompt_len: int, new_tokens: int,
                              window: tuple[int, int], vocab: int, seed: int = 0,
                              timeout_s: float = 120.0) -> MeshDecode:
    """Start `requests` generations at once and measure the decode steps between the moment every
    request has streamed window[0] tokens and the moment every one has streamed window[1]: a
    fixed decode batch (prefills are over, nobody has finished)."""
    import asyncio
    import random

    from moemesh.client import Client, TokenChunk
    from moemesh.engine.sampling import SamplingParams

    assert 1 <= window[0] < window[1] < new_tokens, "the window must end before any request finishes"
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(prompt_len)] for _ in range(requests)]
    streamed = [0] * requests
    marks: dict[int, tuple[float, list]] = {}
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)

    async def mark(k: int) -> None:
        while min(streamed) < k:
            await asyncio.sleep(0.0005)
        marks[k] = (time.perf_counter(), await worker_statuses(coordinator))

    async with Client(gateway, timeout=timeout_s) as client:
        async def one(i: int) -> None:
            async for ev in client.generate(token_ids=prompts[i], params=params, include_text=False):
                if isinstance(ev, TokenChunk):
                    streamed[i] += len(ev.token_ids)

        await asyncio.gather(*(one(i) for i in range(requests)), mark(window[0]), mark(window[1]))
    (t0, before), (t1, after) = marks[window[0]], marks[window[1]]
    steps = [a.steps - b.steps for a, b in zip(after, before)]
    n = max(max(steps), 1)
    return MeshDecode(
        steps=n,
        step_s=statistics.fmean((a.step_seconds - b.step_seconds) / max(s, 1) for a, b, s in zip(after, before, steps)),
        collective_s=statistics.fmean((a.collective_seconds - b.collective_seconds) / max(s, 1)
                                      for a, b, s in zip(after, before, steps)),
        tokens_per_step=tuple((a.tokens - b.tokens) / max(s, 1) for a, b, s in zip(after, before, steps)),
        wall_per_step_s=(t1 - t0) / n,
    )
