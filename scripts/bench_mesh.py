"""`make bench-mesh`: the single-process engine against the mesh with 2, 4 and 8 workers, same
model and load, one run. Prints output tokens/s, TTFT, TPOT (vLLM's definitions), the share of
each worker's step time spent in collectives, and the share of the dispatch/combine exchange time
hidden behind compute (`--micro-batches 1 2` adds a two-batch-overlap row per mesh size,
`--expert-shards 1 2` a row with every expert split over two workers).

These machines have 2 cores: more than 2 workers oversubscribe them, and each collective then
waits on context switches. That is what the 4- and 8-worker rows show.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch

from moemesh.engine.engine import Engine
from moemesh.engine.sampling import SamplingParams
from moemesh.launcher import UpProcess
from moemesh.loadgen import engine_timings, run_closed_loop, summarize
from moemesh.mesh.profile import profile_mesh
from moemesh.model.decoder import RuntimeShape, build_model
from moemesh.model.tiny import TinySpec, write_tiny_model
from moemesh.settings import option, parse_bool, parse_settings
from moemesh.simulate.measure import step_counters, worker_statuses

SPEC = TinySpec(arch="mixtral", layers=4, experts=8, top_k=2, hidden=256, intermediate=512, heads=8, kv_heads=4,
                vocab=512, seed=0)


@dataclass(frozen=True)
class BenchMeshSettings:
    """The load and the meshes (one row per workers x micro-batches x expert shards); flags only."""

    ENV_PREFIX: ClassVar[str | None] = None

    requests: int = option("--requests", "requests in the measured run", int, default=32)
    concurrency: int = option("--concurrency", "requests in flight", int, default=32)
    prompt_len: int = option("--prompt-len", "tokens per prompt", int, default=32)
    new_tokens: int = option("--new-tokens", "tokens generated per request", int, default=32)
    workers: tuple[int, ...] = option("--workers", "mesh sizes; one mesh row per value", int, default=(2, 4, 8),
                                      many=True)
    micro_batches: tuple[int, ...] = option("--micro-batches",
                                            "micro-batches per step on every worker; one mesh row per value", int,
                                            default=(1,), choices=(1, 2, 3, 4), many=True)
    expert_shards: tuple[int, ...] = option("--expert-shards", "ways every expert is split (tensor parallelism "
                                            "inside an expert); one row per value", int, default=(1,), many=True)
    json_path: Path | None = option("--json", "also write the rows here", Path, default=None, metavar="JSON")
    profile: bool = option("--profile", "also print where a 2-worker mesh rank's decode step goes (torch.profiler "
                           "on a bare lockstep mesh; serving = the served mesh's step minus the bare one)", parse_bool,
                           default=False)


def run_local(model: Path, prompts: list[list[int]], params: SamplingParams, threads: int) -> dict[str, float]:
    """The engine in this process, every request arriving at once (same as the mesh's load)."""
    torch.set_num_threads(threads)
    engine = Engine(build_model(model, RuntimeShape(max_seqs=len(prompts), max_model_len=256)))
    return summarize(*engine_timings(engine, prompts, params))


def run_mesh(model: Path, workers: int, prompts, params, concurrency: int, micro_batches: int = 1,
             expert_shards: int = 1) -> dict[str, float]:
    mesh = UpProcess(model, workers, ("--max-seqs", str(len(prompts)), "--micro-batches", str(micro_batches),
                                      "--expert-shards", str(expert_shards)), quiet=True)
    gateway, coordinator = mesh.gateway, mesh.coordinator
    try:
        asyncio.run(run_closed_loop(gateway, prompts[:4], params, concurrency))  # warm-up
        before = asyncio.run(worker_statuses(coordinator))
        timings, wall = asyncio.run(run_closed_loop(gateway, prompts, params, concurrency))
        after = asyncio.run(worker_statuses(coordinator))
    finally:
        mesh.stop()
    return summarize(timings, wall) | step_counters(before, after)


def main(argv: list[str] | None = None) -> int:
    s = parse_settings(BenchMeshSettings, argv, __doc__.splitlines()[0])
    g = torch.Generator().manual_seed(0)
    prompts = [[0, *torch.randint(3, SPEC.vocab, (s.prompt_len - 1,), generator=g).tolist()]
               for _ in range(s.requests)]
    params = SamplingParams(max_new_tokens=s.new_tokens, ignore_eos=True)
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_model(Path(tmp) / "model", SPEC)
        rows["local (1 process, 2 threads)"] = run_local(model, prompts, params, threads=2)
        for n in s.workers:
            for m in s.micro_batches:
                for shards in (k for k in s.expert_shards if k <= n):
                    name = (f"mesh, {n} workers" + (f", {m} micro-batches" if m > 1 else "")
                            + (f", experts split {shards} ways" if shards > 1 else ""))
                    rows[name] = run_mesh(model, n, prompts, params, s.concurrency, m, shards)
    print_table(s, rows)
    if s.profile:
        served = rows.get("mesh, 2 workers", {}).get("step_ms")
        with tempfile.TemporaryDirectory() as tmp:
            model = write_tiny_model(Path(tmp) / "model", SPEC)
            split = profile_mesh(model, prompts[: s.concurrency // 2], 2)
        if served is not None:  # the served mesh's steps include the prefill of each wave: a bound from above
            split = replace(split, extra={"serving": max(0.0, served / 1e3 - split.step_s)})
        print(split.table(f"mesh rank 0 of 2, decode step ({s.concurrency // 2} sequences per rank)"))
    if s.json_path:
        s.json_path.write_text(json.dumps(rows, indent=2))
    return 0


def print_table(s: BenchMeshSettings, rows: dict[str, dict[str, float]]) -> None:
    base = next(iter(rows.values()))["output_tokens_per_s"]
    print(f"bench-mesh: Mixtral layout D={SPEC.hidden} F={SPEC.intermediate} E={SPEC.experts} top-{SPEC.top_k} "
          f"L={SPEC.layers}; {s.requests} requests, {s.concurrency} concurrent, prompt {s.prompt_len}, "
          f"{s.new_tokens} new tokens, fp32, gloo")
    print(f"{'deployment':44} {'out tok/s':>9} {'ratio':>6} {'TTFT ms':>8} {'TPOT ms':>8} {'step ms':>8} "
          f"{'in collectives':>14} {'hidden':>6}")
    for name, m in rows.items():
        share = f"{m['collective_share']:.0%}" if "collective_share" in m else "-"
        hidden = f"{m['hidden_share']:.0%}" if "hidden_share" in m else "-"
        step = f"{m['step_ms']:.1f}" if "step_ms" in m else "-"
        print(f"{name:44} {m['output_tokens_per_s']:9.0f} {m['output_tokens_per_s'] / base:5.2f}x "
              f"{m['ttft_mean_s'] * 1e3:8.0f} {m['tpot_mean_s'] * 1e3:8.1f} {step:>8} {share:>14} {hidden:>6}")
    print("hidden: share of the dispatch/combine exchange time (posted -> completed) spent computing, "
          "not blocked in a collective")


if __name__ == "__main__":
    sys.exit(main())
