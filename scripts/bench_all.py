"""`make bench`: every deployment on the same model, load and cores in one run, written to
docs/benchmarks.md with a chart (docs/benchmarks.png).

Rows: transformers' generate() (the peer), the single-process engine, the mesh colocated (2
workers x 4 experts: one worker per core), the mesh with 4 workers x 2 experts, the mesh with one
expert per worker (8 workers: the paper's deployment). Each row: output tokens/s, TPOT, TTFT
(vLLM's definitions, moemesh.loadgen), ratio to the single-process engine; mesh rows also the step
time and the share of it spent in collectives (worker Status counters). Then the cost model's
prediction of the 2-worker mesh against its measurement (moemesh.simulate.cpu_check) and the
simulator's paper-table comparison. Expert tensor parallelism: `python scripts/bench_mesh.py --expert-shards 1 2`.
Takes about 6 minutes on a 2-core machine (< 15).
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import os
import platform
import sys
import tempfile
import time
from contextlib import redirect_stdout
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moemesh.engine.engine import Engine
from moemesh.engine.profile import decode_split
from moemesh.engine.sampling import SamplingParams
from moemesh.launcher import UpProcess
from moemesh.loadgen import BenchRequest, LoadPlan, engine_timings, run_load, summarize
from moemesh.mesh.profile import profile_mesh
from moemesh.model.decoder import RuntimeShape, build_model
from moemesh.model.tiny import TinySpec, write_tiny_model
from moemesh.settings import option, parse_settings
from moemesh.simulate.cpu_check import CheckSettings, check_cpu_mesh
from moemesh.simulate.measure import step_counters, worker_statuses

ROOT = Path(__file__).resolve().parents[1]

SPEC = TinySpec(arch="mixtral", layers=4, experts=8, top_k=2, hidden=256, intermediate=512, heads=8, kv_heads=4,
                vocab=512, seed=0)
ENGINE = "single-process engine"
# The cost model's 2-worker decode step against the live mesh (moemesh.simulate.cpu_check): a
# benchmark, not a unit test (tests/moemesh/simulate/test_cpu_prediction.py checks the model's
# arithmetic on recorded rates); `make bench` fails when the pooled error is outside this.
PREDICTION_TOLERANCE = 0.25


MESHES = ((2, "mesh colocated: 2 workers x 4 experts"), (4, "mesh: 4 workers x 2 experts"),
          (8, "mesh one expert per worker: 8 workers"))  # (workers, label)
GPU_CHECK = ROOT / "docs" / "gpu-check" / "gpu-check.json"  # a GPU check's results, when one was run


@dataclass(frozen=True)
class BenchAllSettings:
    """The load and the outputs (flags only: a command line says what ran), and the machine's cores."""

    ENV_PREFIX: ClassVar[str | None] = None

    requests: int = option("--requests", "requests, all sent at once (closed loop, concurrency = requests)", int,
                           default=32)
    prompt_len: int = option("--prompt-len", "tokens per prompt", int, default=32)
    new_tokens: int = option("--new-tokens", "tokens generated per request", int, default=32)
    check_rounds: int = option("--check-rounds", "rounds of the prediction-vs-measurement check (0 = skip)", int,
                               default=4)
    profile_steps: int = option("--profile-steps", "decode steps profiled for the step split (0 = skip)", int,
                                default=12)
    out: Path = option("--out", "the markdown file; the chart goes next to it", Path,
                       default=ROOT / "docs" / "benchmarks.md")
    json_path: Path | None = option("--json", "also write the rows and the check's error here", Path, default=None,
                                    metavar="JSON")
    # cores: the single-process rows try 1 and this many torch threads (the mesh gives each worker cores / workers)
    threads: int = os.cpu_count() or 1
    meshes: tuple[tuple[int, str], ...] = MESHES
    gpu_check: Path | None = None  # GPU_CHECK if it exists (main): the simulator also uses its rates


def _prompts(s: BenchAllSettings) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, SPEC.vocab, (s.prompt_len,), generator=g).tolist() for _ in range(s.requests)]


def best_threads(run, model: Path, s: BenchAllSettings) -> dict[str, float]:
    """`run` with 1 and with every core's worth of torch threads; the faster (on a shared machine
    two OpenMP threads can lose to one when the other core is busy)."""
    results = []
    for threads in sorted({1, s.threads}):
        m = run(model, s, threads)
        m["threads"] = threads
        results.append(m)
    return max(results, key=lambda m: m["output_tokens_per_s"])


def run_transformers(model: Path, s: BenchAllSettings, threads: int) -> dict[str, float]:
    """generate() on the whole batch: TTFT = a 1-token generate, TPOT = the rest per token."""
    import transformers

    torch.set_num_threads(threads)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    ids = torch.tensor(_prompts(s))
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        hf.generate(ids[:2], max_new_tokens=4, **kw)  # warm-up
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=s.new_tokens, min_new_tokens=s.new_tokens, **kw)
        wall = time.perf_counter() - t0
    out = s.requests * s.new_tokens
    return {"output_tokens_per_s": out / wall, "ttft_mean_s": ttft, "tpot_mean_s": (wall - ttft) / (s.new_tokens - 1),
            "wall_s": wall}


def run_engine(model: Path, s: BenchAllSettings, threads: int) -> dict[str, float]:
    """The engine in this process, every request arriving at once (the mesh rows' load)."""
    torch.set_num_threads(threads)
    params = SamplingParams(max_new_tokens=s.new_tokens, ignore_eos=True)
    for _ in range(2):  # the first pass warms up
        engine = Engine(build_model(model, RuntimeShape(max_seqs=s.requests, max_model_len=256)))
        timings, wall = engine_timings(engine, _prompts(s), params)
    return summarize(timings, wall)


def profile_split(model: Path, s: BenchAllSettings, rows: dict[str, dict[str, float]]) -> str:
    """Where a decode step goes (moemesh.engine.profile): the engine at the load's batch with the
    threads it ran with, and rank 0 of a bare 2-rank lockstep mesh at half the batch each, its
    serving cost = the served 2-worker mesh's step minus the bare one."""
    prompts = _prompts(s)
    torch.set_num_threads(int(rows[ENGINE].get("threads", 1)))
    runtime = RuntimeShape(max_seqs=s.requests, max_model_len=s.prompt_len + 2 * s.profile_steps + 8)
    engine = Engine(build_model(model, runtime))
    params = SamplingParams(max_new_tokens=2 * s.profile_steps + 6, ignore_eos=True)
    ours = decode_split(engine, prompts, params, s.profile_steps)
    mesh = profile_mesh(model, prompts[: s.requests // 2], 2, s.profile_steps)
    served = next((m["step_ms"] for (w, label) in s.meshes if w == 2 for m in [rows[label]]), None)
    if served is not None:  # the served steps include each wave's prefill: an upper bound
        mesh = replace(mesh, extra={"serving": max(0.0, served / 1e3 - mesh.step_s)})
    return (f"```\n{ours.table(f'single-process engine, {s.requests} sequences')}\n\n"
            f"{mesh.table(f'mesh rank 0 of 2, {s.requests // 2} sequences each')}\n```")


def run_mesh(model: Path, workers: int, s: BenchAllSettings) -> dict[str, float]:
    """`moemesh up` with `workers` workers, driven through its gateway by moemesh.loadgen."""
    mesh = UpProcess(model, workers, ("--max-seqs", str(s.requests)), quiet=True)
    gateway, coordinator = mesh.gateway, mesh.coordinator
    reqs = tuple(BenchRequest(tuple(p), s.new_tokens) for p in _prompts(s))
    try:
        asyncio.run(run_load(gateway, LoadPlan(reqs[:4], concurrency=4, timeout_s=600)))  # warm-up
        before = asyncio.run(worker_statuses(coordinator))
        timings, wall = asyncio.run(run_load(gateway, LoadPlan(reqs, concurrency=s.requests, timeout_s=600)))
        after = asyncio.run(worker_statuses(coordinator))
    finally:
        mesh.stop()
    return summarize(timings, wall) | step_counters(before, after)


def simulate_paper(gpu_check: Path | None) -> str:
    """`moemesh simulate --model paper` (and with the GPU check's rates if one exists), as text."""
    from moemesh.simulate.cli import SimulateSettings, simulate

    runs = [None] + ([gpu_check] if gpu_check else [])
    text = io.StringIO()
    for rates in runs:
        s = SimulateSettings(topology="paper-16xh100", model="paper", deployment="ep16", batch=None, seq=None,
                             phase="decode", micro_batches=0, placement="ours", skew="uniform", top_k=None,
                             measure=False, rates=rates, sweep=(16, 64, 256, 1024),
                             out=ROOT / "docs" / "ep-scaling.png" if rates is None else None, json_path=None)
        with redirect_stdout(text):
            simulate(s)
    return text.getvalue()


def simulate_deepseek() -> str:
    """`moemesh simulate --model deepseek-v3` on 64 H100 (8 nodes = 8 expert groups), as text, the
    per-layer timeline cut to its first MoE layers (the others repeat them)."""
    from moemesh.simulate.cli import SimulateSettings, simulate

    s = SimulateSettings(topology="h100x64", model="deepseek-v3", deployment="ep64", sweep=DEEPSEEK_SWEEP,
                         out=ROOT / "docs" / "ep-scaling-deepseek-v3.png")
    text = io.StringIO()
    with redirect_stdout(text):
        simulate(s)
    return elide_layers(text.getvalue(), keep=5)


def elide_layers(text: str, keep: int) -> str:
    """Keep the first `keep` rows of a per-layer timeline and its last one."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("layer "))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("step "))
    rows = lines[start + 1:end]
    if len(rows) <= keep + 1:
        return text
    cut = [*rows[:keep], f"  ... {len(rows) - keep - 1} more layers like the last shown ...", rows[-1]]
    return "\n".join([*lines[:start + 1], *cut, *lines[end:]]) + "\n"


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown")
    return (f"{os.cpu_count()} CPUs (nproc), {model}; Linux {platform.release()}; Python {platform.python_version()}, "
            f"torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M %Z')}")


def main(argv: list[str] | None = None) -> int:
    s = replace(parse_settings(BenchAllSettings, argv, __doc__.splitlines()[0]),
                gpu_check=GPU_CHECK if GPU_CHECK.is_file() else None)
    started = time.perf_counter()
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_model(Path(tmp) / "model", SPEC)
        rows["transformers generate()"] = _step("transformers", lambda: best_threads(run_transformers, model, s))
        rows[ENGINE] = _step("engine", lambda: best_threads(run_engine, model, s))
        for workers, label in s.meshes:
            rows[label] = _step(label, functools.partial(run_mesh, model, workers, s))
        split = _step("step split", lambda: profile_split(model, s, rows)) if s.profile_steps else ""
        check = _step("prediction check", lambda: check_cpu_mesh(model, CheckSettings(rounds=s.check_rounds))) \
            if s.check_rounds else None
    paper = _step("simulate --model paper", lambda: simulate_paper(s.gpu_check))
    deepseek = _step("simulate --model deepseek-v3", simulate_deepseek)
    took = time.perf_counter() - started
    table = rows_table(rows)
    print(table)
    chart = plot(rows, s.out.with_suffix(".png"))
    text = render(s, rows, table, check, paper, chart, took).replace("{split}", split or "(skipped: --profile-steps 0)")
    s.out.write_text(text + DEEPSEEK_TEMPLATE.format(deepseek=deepseek))
    print(f"wrote {s.out} and {chart} in {took / 60:.1f} min")
    if s.json_path:
        s.json_path.write_text(json.dumps({"rows": rows, "check_error": check.error if check else None}, indent=2))
    if check and abs(check.error) >= PREDICTION_TOLERANCE:
        print(f"bench: the cost model missed the 2-worker mesh by {check.error:+.0%} "
              f"(tolerance {PREDICTION_TOLERANCE:.0%}):\n{check.table()}", file=sys.stderr)
        return 1
    return 0


def _step(name: str, fn):
    t = time.perf_counter()
    print(f"bench: {name} ...", file=sys.stderr, flush=True)
    out = fn()
    print(f"bench: {name} done in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    return out


def rows_table(rows: dict[str, dict[str, float]]) -> str:
    base = rows[ENGINE]["output_tokens_per_s"]
    lines = ["| deployment | output tok/s | ratio to engine | TPOT ms | TTFT ms | step ms | in collectives | hidden |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in rows.items():
        if "threads" in m:
            name = f"{name}, {m['threads']} thread{'s' if m['threads'] > 1 else ''}"
        step = f"{m['step_ms']:.1f}" if "step_ms" in m else "-"
        share = f"{m['collective_share']:.0%}" if "collective_share" in m else "-"
        hidden = f"{m['hidden_share']:.0%}" if "hidden_share" in m else "-"
        lines.append(f"| {name} | {m['output_tokens_per_s']:.0f} | {m['output_tokens_per_s'] / base:.2f}x | "
                     f"{m['tpot_mean_s'] * 1e3:.1f} | {m['ttft_mean_s'] * 1e3:.0f} | {step} | {share} | {hidden} |")
    return "\n".join(lines)


def plot(rows: dict[str, dict[str, float]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.barh(names, [rows[n]["output_tokens_per_s"] for n in names], color="C0")
    a.set_xlabel("output tokens/s (higher is better)")
    b.barh(names, [rows[n]["tpot_mean_s"] * 1e3 for n in names], color="C1", label="TPOT")
    coll = [rows[n]["tpot_mean_s"] * 1e3 * rows[n].get("collective_share", 0.0) for n in names]
    b.barh(names, coll, color="C3", label="of which in collectives")
    b.set_xlabel("TPOT ms (lower is better)")
    b.set_yticks([])
    b.legend(fontsize=8)
    for ax in (a, b):
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("same model, same 32 concurrent requests, same cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def render(s: BenchAllSettings, rows, table: str, check, paper: str, chart: Path, took: float) -> str:
    spec = SPEC
    check_text = (f"```\n{check.table()}\n```\n\nPooled over rounds: predicted {check.predicted_step_s * 1e3:.1f} ms, "
                  f"measured {check.measured_step_s * 1e3:.1f} ms: error {check.error:+.0%} (`make bench` "
                  f"requires |error| < {PREDICTION_TOLERANCE:.0%})."
                  if check else "(skipped: --check-rounds 0)")
    return TEMPLATE.format(
        machine=machine(), took=took / 60, table=table, chart=chart.name, check=check_text, paper=paper.rstrip(),
        layers=spec.layers, experts=spec.experts, top_k=spec.top_k, hidden=spec.hidden, intermediate=spec.intermediate,
        heads=spec.heads, kv_heads=spec.kv_heads, vocab=spec.vocab, requests=s.requests, prompt=s.prompt_len,
        new=s.new_tokens, threads=s.threads, profile_steps=s.profile_steps, split="{split}",
        gpu=(f"The GPU check's measured rates ({s.gpu_check}) were used for the second simulator run below."
             if s.gpu_check else "No GPU check results were found (docs/gpu-check/gpu-check.json); the simulator "
             "used the datasheet rates only."),
    )


TEMPLATE = """# Benchmarks

Written by `make bench` (scripts/bench_all.py) in {took:.1f} minutes on: {machine}.
Every number below was measured or computed in that one run; rerun `make bench` to reproduce all of
them (the machine is shared and noisy, +-30% run to run: compare ratios within one run).

## Deployments on the same model, load and cores

Model: a random Mixtral-layout checkpoint (moemesh.model.tiny), {layers} layers, {experts} experts top-{top_k},
hidden {hidden}, expert hidden {intermediate}, {heads} heads / {kv_heads} KV heads, vocabulary {vocab}, fp32.
Load: {requests} requests sent at once (closed loop, {requests} in flight), {prompt}-token random prompts,
exactly {new} new tokens each (ignore_eos), greedy. Metrics as vLLM defines them (moemesh.loadgen):
output tokens/s over the run's wall time, TTFT, TPOT = (latency - TTFT) / (tokens - 1), means over
requests. transformers and the single-process engine run with 1 and with {threads} torch threads and
keep the faster (shown); `moemesh up` gives each worker max(1, cores / workers) threads. "step ms" and
"in collectives" come from the workers' Status counters (step_seconds, collective_seconds: time blocked
in all_gather / all_to_all, waiting for peers included) over the measured run; "hidden" is
hidden_seconds / exchange_seconds: the share of
the dispatch/combine exchanges' flight time the worker spent computing rather than blocked in a
collective (its own wait or another's).

{table}

![deployments](benchmarks.png)

Reproduce one row by hand: `moemesh tiny-model /tmp/m --experts 8 --hidden 256 --intermediate 512`,
`moemesh up --model /tmp/m --workers 2 --port 0 --max-model-len 256`, then
`moemesh bench --target HOST:PORT --requests 32 --concurrency 32 --prompt-len 32 --output-len 32`.

## Where a decode step's time goes

{profile_steps} decode steps with every seam of the step marked and timed by the clock, then
{profile_steps} more under `torch.profiler`, which gives each phase's share inside torch ops (the rest
is Python between ops; the profiler's own cost per op inflates both sides alike)
(moemesh.engine.profile; `python scripts/bench_core.py --profile` and `python scripts/bench_mesh.py
--workers 2 --profile` print the same tables for their loads). "step header", "dispatch wait" and
"combine wait" are time blocked in gloo, waiting for the peer included. The mesh rank runs the
lockstep step alone in its process (no gRPC); "serving" is the served 2-worker mesh's step (its
Status counters above) minus that bare step.

{split}

## What these figures show, and what they do not

- Two CPU cores cannot show the paper's effect. The paper's claim is about GPUs whose experts contend
  for one device's compute and memory when colocated; here every worker shares the same two cores and
  the same memory bus, so spreading experts over more processes adds no compute at all.
- More workers than cores oversubscribe the machine: with 4 or 8 workers every collective (one step
  header + 2 all_to_all per MoE layer per step) has to wait until every peer process has been scheduled
  again. That context-switch wait is what the "in collectives" column of the 4- and 8-worker rows
  measures; it is the cost of the deployment on this machine, not of expert parallelism.
- The one-worker-per-core mesh (2 workers) is the fair comparison with the single-process engine: it
  pays one step header and 8 small all_to_alls per step, plus each worker's serving threads (gRPC
  token streams) taking the GIL from its engine thread. The machine is shared with other work,
  so two busy processes often get less than two cores.
- The load of the machine moves the rows differently: a single process with two OpenMP threads
  needs both cores at once and slows 3-5x when other work takes one (seen between runs of this
  script), while one-thread processes degrade gracefully. So the ratio between the single-process
  rows and the mesh rows changes from run to run; within a row family (mesh 2 / 4 / 8 workers) the
  ordering is stable.
- Expert tensor parallelism (`--expert-shards`) has its rows in `make bench-mesh`, not here.
- Chunked prefill (`EngineSettings.chunked_prefill`) is not in these rows (every prompt here is 32
  tokens); `python scripts/bench_prefill.py` measures it: 1024-token prompts arriving as a Poisson
  process into 16 running decodes, with and without it, p99 TPOT and ITL of the running requests.
- Nothing here measures GPUs; the simulator below predicts them from datasheet rates. {gpu}

## The cost model against this machine

moemesh.simulate predicts the 2-worker mesh's decode step from first principles (the same cost model
as the GPU predictions below), fed rates measured in the same run: fp32 matmul FLOP/s and
weight-streaming bytes/s with two one-thread processes busy at once; gloo all_to_all bandwidth and
latency between two processes; the engine's host overhead per step / layer / expert (timed on a micro
copy of the model); and a mesh worker's serving overhead (a one-worker mesh minus the single-process
engine on the same per-worker batch: the worker's gRPC threads take the GIL from its engine thread).
The all_to_all latency that matters is not the back-to-back one ("idle"): in a decode step the ranks
compute between exchanges, and on this shared machine a rank that was descheduled meanwhile arrives
late, so the latency is measured with both processes busy for the attention and expert durations the
model predicts ("busy", 2-5x idle). Rounds interleave calibration and measurement because the
machine's load changes within seconds; the check pools all rounds (mean times) into one prediction
and compares it with the mean step of all measured windows. Per-round predictions are diagnostics.

{check}

How the model got here: with back-to-back latency it ran 10-35% low, all of it in the collectives
(a few ms predicted, 10-15 ms measured); without the serving overhead the compute ran 30% low
(a one-worker mesh is 1.4-1.7x slower than the engine it runs on the same batch).

## The paper's cluster, simulated

`moemesh simulate --topology paper-16xh100 --model paper --deployment ep16 --out docs/ep-scaling.png`
(the planner's topology preset, placement search and per-link loads; roofline rates). Hardware
constants: H100 SXM5 989 TFLOP/s dense FP16 and 3.35 TB/s HBM3, 80 GB (NVIDIA H100 datasheet);
NVLink 400 GB/s per device and InfiniBand 200 GB/s per node with 7.5 us / 3 us latency (the paper's
figures, moemesh/planner/topology.py; the datasheet's NVLink 4 is 900 GB/s per GPU and one NDR port
50 GB/s); 0.47 us per all-to-all peer (DeepEP low-latency dispatch: 77 us at EP 8, 194 us at EP 256).
The paper gives no top-k; its own byte count sends each token once, so K = 1. GPU host overheads are
taken as zero, so the GPU rows are bounds (highest TPS, lowest TPOT the hardware allows).

```
{paper}
```

![EP scaling](ep-scaling.png)
"""

DEEPSEEK_SWEEP = (16, 64, 256, 1024)
DEEPSEEK_TEMPLATE = """
## DeepSeek-V3 on H100 clusters, simulated

`moemesh simulate --topology h100x64 --model deepseek-v3 --deployment ep64 --sweep 16,64,256,1024
--out docs/ep-scaling-deepseek-v3.png`:
DeepSeek-V3's real sizes (`moemesh/simulate/shapes.py` `DEEPSEEK_V3_CONFIG`, the values of
deepseek-ai/DeepSeek-V3's config: 61 layers of which the first 3 dense (MLP 18432), hidden 7168,
MLA with 128 heads (q_lora_rank 1536, kv_lora_rank 512, qk_nope 128, qk_rope 64, v_head 128),
256 routed experts of 2048 plus 1 shared, top-8 inside 4 of 8 groups, vocabulary 129280), bf16
weights (moemesh serves dequantized checkpoints), on the paper's H100 links, 64 decoding sequences
per device at context 1024. What the model counts for this family: MLA's weights and its latent
cache (576 values per token and layer, 1152 B), decode in the absorbed form (per head and key, 576
+ 512 multiply-adds against the cache), the dense first layers, the shared expert as compute that
runs while the dispatch flies (the "shared" column: it fits under the dispatch), and only the
routed experts placed and dispatched. The planner's traffic is group-limited (DeepSeek-V3's group
choice on i.i.d. scores), so the cost model's InfiniBand crossings see the groups.

The group table: a token's experts lie in at most 4 of the 8 groups. "remote nodes/token" is the
mean number of nodes other than the token's own that receive it (with DeepEP's send-once-per-node
dispatch, one InfiniBand crossing each, each way): without the limit (exact combinatorics), with the
limit and groups spread over the nodes, with the limit and groups aligned with nodes (the planner's
`aligned` placement: contiguous experts, so group g on node g at 8 nodes), sampled from the router
on 8192 tokens, and the uniform model's value for the aligned layout (moemesh/planner/groups.py;
it underestimates because the router keeps groups whose two best scores are high, so a kept group
nearly always gives the token an expert). "IB MB/dev/step" is what one device's 64 tokens send
across nodes in a decode step over 58 MoE layers, dispatch and combine. The last two columns are
the cost model's exchange time per step (context 128) with the planner's `ours` and `aligned`
placements.

```
{deepseek}
```

What the limit saves: nothing unless the groups are aligned with nodes (the "spread" column equals
"no limit"). Aligned, it saves the most where nodes = groups: on 8 nodes (64 GPUs) a token reaches
3.5 remote nodes instead of 4.6, a quarter of the InfiniBand bytes, and the cost model's exchange
time falls from 19.5 ms (ours) to 13.9 ms (aligned) per step. With fewer nodes most tokens reach
every node anyway; with more, each group spans N / 8 nodes and the 4 kept groups cover up to half
the nodes, so from 32 nodes on the saving is a few percent and `ours`, which balances every node's
InfiniBand port, prices lower than `aligned`. Hence `aligned` is a placement option
(`moemesh plan --method aligned`, `moemesh simulate --placement aligned`), not the default
(docs/planner.md).

The EP scaling table (weak scaling, 64 sequences per device) reads as for the paper's model:
"E fixed" replicates the 256 routed experts over the devices, "E = G" gives every device its own
expert. On 16 GPUs DeepSeek-V3 does not fit (16 routed experts per device x 58 layers x 88 MB =
82 GB before attention and cache; the prediction is made anyway and says so in its memory line);
from 32 it fits (57 GB per device on 64). Per device, decode throughput peaks at 32-64 GPUs and
falls beyond: with 8 copies per token the exchange reaches ever more nodes through each node's one
InfiniBand port, 42 ms of exchanges per step on 256 GPUs, more than all the compute of the step.

![DeepSeek-V3 EP scaling](ep-scaling-deepseek-v3.png)
"""


if __name__ == "__main__":
    sys.exit(main())
