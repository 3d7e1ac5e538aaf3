"""Measured rates of this machine, for the cost model's CPU profile (not pure: runs torch).

Everything is measured the way the mesh uses the machine: `measure_rates(processes)` starts that
many processes with one torch thread each (what `moemesh up` gives each worker on 2 cores), joined
by gloo, and measures *while all of them run the same benchmark at once*:

- fp32 matmul rate (FLOP/s per process) on a compute-bound shape;
- weight-streaming rate (bytes/s per process): skinny matmuls (a few token rows against many
  distinct weight matrices, more bytes than the caches hold), which is what a decode step's expert
  and attention projections do;
- gloo all_to_all_single: latency (seconds at a tiny size) and bandwidth (bytes/s from a large
  size), and all_gather latency (the step header).

`measure_overheads(model_dir, ...)` times the single-process engine, with the mesh's transport over
a one-rank world, on a copy of the model's structure with negligible widths: what is left is the
host-side cost (Python, torch dispatch) per step, per layer and per expert with tokens.
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
    a2a_latency_s: float  # gloo all_to_all_single of a tiny buffer, median
    a2a_bytes_per_s: float  # (bytes sent by one rank) / (time above the latency) at a large size
    gather_latency_s: float  # gloo all_gather of 3 int64 (the step header), median


def _timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def matmul_rate(repeats: int = 5) -> float:
    """FLOP/s of fp32 (512 x 1024) @ (1024 x 1024) in this process, best of `repeats`."""
    a, b = torch.randn(512, 1024), torch.randn(1024, 1024)
    a @ b
    return 2 * 512 * 1024 * 1024 / min(_timed(lambda: a @ b, repeats))


def stream_rate(rows: int = 8, d: int = 256, f: int = 1024, total_bytes: int = 64 << 20, repeats: int = 3) -> float:
    """Weight bytes/s of skinny matmuls: (rows x d) @ (d x f) over distinct matrices totalling
    `total_bytes` (more than the last-level cache), best of `repeats` passes."""
    n = max(1, total_bytes // (d * f * 4))
    weights = [torch.randn(d, f) for _ in range(n)]
    x = torch.randn(rows, d)

    def sweep() -> None:
        for w in weights:
            torch.mm(x, w)

    sweep()
    return n * d * f * 4 / min(_timed(sweep, repeats))


def _collective_times(rank: int, world: int, repeats: int) -> dict[str, float]:
    import torch.distributed as dist

    def a2a(n_floats: int) -> float:
        send = torch.zeros(world * n_floats)
        recv = torch.empty_like(send)
        for _ in range(5):
            dist.all_to_all_single(recv, send)
        dist.barrier()
        return statistics.median(_timed(lambda: dist.all_to_all_single(recv, send), repeats))

    header = torch.zeros(3, dtype=torch.int64)
    outs = [torch.empty_like(header) for _ in range(world)]
    for _ in range(5):
        dist.all_gather(outs, header)
    dist.barrier()
    gather = statistics.median(_timed(lambda: dist.all_gather(outs, header), repeats))
    tiny = a2a(64)
    big_floats = 256 * 1024  # 1 MiB to every peer
    big = a2a(big_floats)
    sent = (world - 1) * big_floats * 4  # bytes leaving this rank
    return {"a2a_latency_s": tiny, "a2a_bytes_per_s": sent / max(big - tiny, 1e-9), "gather_latency_s": gather}


def _rank_main(rank: int, world: int, store_path: str, repeats: int, queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        dist.barrier()
        mm = matmul_rate()
        dist.barrier()
        stream = stream_rate()
        dist.barrier()
        times = _collective_times(rank, world, repeats)
        queue.put((rank, {"matmul_flops_per_s": mm, "stream_bytes_per_s": stream, **times}))
    finally:
        dist.destroy_process_group()


def measure_rates(processes: int = 2, repeats: int = 50, timeout_s: float = 120.0) -> CpuRates:
    """Start `processes` one-thread processes and measure (module docstring); per-process rates
    are the median over processes."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="moemesh-measure-") as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_rank_main, args=(r, processes, store, repeats, queue)) for r in range(processes)]
        for p in procs:
            p.start()
        try:
            results = dict(queue.get(timeout=timeout_s) for _ in procs)
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    med = lambda key: statistics.median(r[key] for r in results.values())
    return CpuRates(processes=processes, matmul_flops_per_s=med("matmul_flops_per_s"),
                    stream_bytes_per_s=med("stream_bytes_per_s"), a2a_latency_s=med("a2a_latency_s"),
                    a2a_bytes_per_s=med("a2a_bytes_per_s"), gather_latency_s=med("gather_latency_s"))


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
    from moemesh.model.model import RuntimeShape, build_model

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
    transport.begin_step((batch * context,))
    engine.step()  # prefill
    transport.begin_step((batch,))
    for _ in range(5):
        engine.step()
    times = []
    while engine.has_work:
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)
