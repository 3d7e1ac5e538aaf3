"""`make bench-nodes`: expert placements on an emulated cluster with shaped inter-node links,
measured, against `moemesh simulate`'s prediction for the topology file the cluster implies. Root.

Clusters: 2 nodes x 2 workers and 4 nodes x 1 (moemesh.launch.netns: one network namespace per
node, every node's link shaped with tc tbf at --rate each way). Routing: Zipf-skewed gating factors
(popularity 1 / rank^s over a random ranking of the experts per layer) in every placement, so the
routing, which the placements do not change, is the same in every row; it is measured from the
workers' own counts and handed to the planner and the simulator. Placements: round-robin, the
paper's swap search, ours, ours with replicas (one spare slot per device), planned for the
cluster's topology and the measured routing, and published to the running mesh as epochs.

Per placement: a decode window of --requests concurrent requests (between every request's
--window tokens), from every worker's Status counters (step time) and metrics
(`moemesh:collective_bytes_total`: bytes per (source node, destination node)), and the kernel's
counters of the node links; then the simulator's step time and its busiest inter-node port's
bytes. The simulator is calibrated once (2x2, round-robin): its per-step serving overhead is set
so that its compute time matches the measured step minus the time the workers were blocked in
collectives; its links are the shaped rate and the loopback figures of the `local` topology.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np

from moemesh.launch import Mesh
from moemesh.launch.netns import ClusterPlan, bytes_between_nodes, emulated_cluster, interface_bytes, topology_yaml
from moemesh.launcher import UpSettings, mesh_spec, on_nodes
from moemesh.mesh.placement import Placement
from moemesh.model.tiny import TinySpec, write_tiny_model
from moemesh.settings import option, parse_settings

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its report module, beside it
from bench_nodes_analysis import (
    LOCAL_NOTE,
    METHODS,
    device_order,
    gating_factors,
    on_ranks,
    padded_link_bytes,
    picture,
    predictions,
    table,
    traffic_per_step,
    verdict,
    write_doc,
)

SPEC = TinySpec(arch="mixtral", layers=4, experts=8, top_k=2, hidden=256, intermediate=512, heads=8, kv_heads=4,
                vocab=512, seed=0)
CLUSTERS = ((2, 2), (4, 1))


@dataclass(frozen=True)
class BenchNodesSettings:
    ENV_PREFIX: ClassVar[str | None] = None

    rate: str = option("--rate", "every node link's rate, each way (tc units)", default="50mbit")
    requests: int = option("--requests", "concurrent requests in each measured decode window", int, default=32)
    prompt_len: int = option("--prompt-len", "tokens per prompt", int, default=16)
    window: tuple[int, ...] = option("--window", "decode window: from every request's N-th token to its M-th", int,
                                     default=(6, 30), many=True)
    model: Path | None = option("--model", "a trained checkpoint whose own routing to use (unset: the tiny random "
                                "model with Zipf gating)", Path, default=None)
    zipf: float | None = option("--zipf", "skew s of the gating factors (popularity 1 / rank^s); unset: 1.2 for "
                                "the tiny model, none (the model's own routing) with --model", float, default=None)
    passes: int = option("--passes", "measure every placement this often (forward, then reverse order, ...)", int,
                         default=2)
    write: Path | None = option("--write", "write the table and the picture here (docs/topology.md)", Path,
                                default=None)
    json_path: Path | None = option("--json", "also write the rows here", Path, default=None, metavar="JSON")


# ---- the mesh ----------------------------------------------------------------------------------------
def _world(coordinator: str) -> list:
    """The coordinator's world members, by rank."""
    import grpc

    from moemesh.v1 import coordinator_pb2, coordinator_pb2_grpc

    with grpc.insecure_channel(coordinator) as ch:
        world = coordinator_pb2_grpc.CoordinatorStub(ch).WaitForWorld(coordinator_pb2.WaitForWorldRequest(),
                                                                       timeout=30)
    return sorted(world.members, key=lambda m: m.rank)


def _set_placement(coordinator: str, placement: Placement) -> int:
    import grpc

    from moemesh.mesh.placement_wire import placement_to_proto
    from moemesh.v1 import coordinator_pb2 as pb
    from moemesh.v1 import coordinator_pb2_grpc as pb_grpc

    with grpc.insecure_channel(coordinator) as ch:
        stub = pb_grpc.CoordinatorStub(ch)
        current = stub.GetPlacement(pb.GetPlacementRequest(), timeout=30).placement
        msg = placement_to_proto(placement, world_generation=current.world_generation)
        return stub.SetPlacement(pb.SetPlacementRequest(placement=msg), timeout=30).placement.epoch


async def _generate(gateway: str, prompts: list[list[int]], new_tokens: int, marks: dict[int, asyncio.Event],
                    streamed: list[int]) -> None:
    from moemesh.client import Client, TokenChunk
    from moemesh.engine.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    async with Client(gateway, timeout=300) as client:
        async def one(i: int) -> None:
            async for ev in client.generate(token_ids=prompts[i], params=params, include_text=False):
                if isinstance(ev, TokenChunk):
                    streamed[i] += len(ev.token_ids)
                    for k, event in marks.items():
                        if min(streamed) >= k:
                            event.set()

        await asyncio.gather(*(one(i) for i in range(len(prompts))))


TEXT = ("To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer the slings and "
        "arrows of outrageous fortune, or to take arms against a sea of troubles and by opposing end them. "
        "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him. All the "
        "world's a stage, and all the men and women merely players; they have their exits and their entrances.")


def _prompts(s: BenchNodesSettings, cfg, model: Path) -> list[list[int]]:
    """A trained model (--model) reads English (its router sees the text it was trained on);
    the random tiny model reads random ids."""
    if s.model is None:
        rng = random.Random(0)
        return [[0, *(rng.randrange(3, cfg.vocab_size) for _ in range(s.prompt_len - 1))] for _ in range(s.requests)]
    from moemesh.text import TextCodec

    ids = TextCodec(model, cfg).encode(TEXT)
    step = max(1, (len(ids) - s.prompt_len) // s.requests)
    return [ids[i * step: i * step + s.prompt_len] for i in range(s.requests)]


def _scrape(members: list) -> dict[tuple[int, int], float]:
    """Every worker's moemesh:collective_bytes_total by (src rank, dst rank)."""
    out: dict[tuple[int, int], float] = {}
    for m in members:
        with urllib.request.urlopen(f"http://{m.metrics_address}/metrics", timeout=10) as reply:
            for line in reply.read().decode().splitlines():
                if line.startswith("moemesh:collective_bytes_total{"):
                    labels, value = line.rsplit(" ", 1)
                    src = int(labels.split('src_rank="')[1].split('"')[0])
                    dst = int(labels.split('dst_rank="')[1].split('"')[0])
                    out[(src, dst)] = float(value)
    return out


@dataclass(frozen=True)
class Snapshot:
    at: float
    statuses: list
    wire: dict[tuple[int, int], float]
    kernel: dict


def _snapshot(coordinator: str, members: list, cluster: ClusterPlan) -> Snapshot:
    from moemesh.simulate.measure import worker_statuses

    kernel = interface_bytes(cluster)
    return Snapshot(time.perf_counter(), asyncio.run(worker_statuses(coordinator)), _scrape(members), kernel)


def _measure(mesh: Mesh, members: list, cluster: ClusterPlan, s: BenchNodesSettings, cfg) -> dict:
    """One decode window: step time, tokens/s, bytes per node pair and link, kernel link bytes."""
    prompts = _prompts(s, cfg, mesh.model_dir)
    first, last = s.window
    streamed = [0] * s.requests
    snaps: dict[int, Snapshot] = {}

    async def run() -> None:
        marks = {first: asyncio.Event(), last: asyncio.Event()}
        load = asyncio.create_task(_generate(mesh.gateway, prompts, last + 4, marks, streamed))
        for k in (first, last):
            await marks[k].wait()
            snaps[k] = await asyncio.to_thread(_snapshot, mesh.coordinator, members, cluster)
        await load

    asyncio.run(run())
    a, b = snaps[first], snaps[last]
    steps = max(y.steps - x.steps for x, y in zip(a.statuses, b.statuses))
    node_of = {m.rank: int(m.node.removeprefix("node")) for m in members}
    N = len(cluster.nodes)
    pairs = np.asarray(bytes_between_nodes(a.wire, b.wire, node_of, N)) / steps  # (source node, destination node)
    np.fill_diagonal(pairs, 0.0)  # inside a node: never on a shaped link
    links = [*(pairs[n].sum() for n in range(N)), *(pairs[:, n].sum() for n in range(N))]  # out-ports, in-ports
    kernel = [(b.kernel[x.name].out_bytes - a.kernel[x.name].out_bytes) / steps for x in cluster.nodes]
    return {
        "steps": steps,
        "step_ms": 1e3 * statistics.fmean((y.step_seconds - x.step_seconds) / steps
                                          for x, y in zip(a.statuses, b.statuses)),
        "collective_ms": 1e3 * statistics.fmean((y.collective_seconds - x.collective_seconds) / steps
                                                for x, y in zip(a.statuses, b.statuses)),
        "tokens_per_s": sum(y.tokens - x.tokens for x, y in zip(a.statuses, b.statuses)) / (b.at - a.at),
        "max_link_bytes": max(links),
        "pairs": pairs.tolist(),
        "kernel_out_bytes": kernel,
        "kernel_vs_workers": sum(kernel) / max(pairs.sum(), 1.0),
        "routed": _routed(members, cfg),
    }


def _routed(members: list, cfg) -> list:
    """[S, L, E] token copies each rank routed so far (moemesh:expert_tokens_routed_total), L = MoE layers."""
    moe = list(cfg.moe_layer_ids)
    out = np.zeros((len(members), len(moe), cfg.num_experts))
    for m in members:
        with urllib.request.urlopen(f"http://{m.metrics_address}/metrics", timeout=10) as reply:
            for line in reply.read().decode().splitlines():
                if line.startswith("moemesh:expert_tokens_routed_total{"):
                    labels, value = line.rsplit(" ", 1)
                    layer = int(labels.split('layer="')[1].split('"')[0])
                    expert = int(labels.split('expert="')[1].split('"')[0])
                    out[m.rank, moe.index(layer), expert] = float(value)
    return out.tolist()


# ---- the run -------------------------------------------------------------------------------------------
def _apply(mesh: Mesh, placement: Placement) -> int:
    """Publish `placement` and drive steps until every worker runs it (an epoch switches at a step)."""
    from moemesh.simulate.measure import worker_statuses

    epoch = _set_placement(mesh.coordinator, placement)
    for _ in range(120):  # hang bound: a tiny model's experts load in well under a second
        asyncio.run(_generate(mesh.gateway, [[0, 5, 6]], 2, {}, [0]))
        if all(st.placement_epoch >= epoch for st in asyncio.run(worker_statuses(mesh.coordinator))):
            return epoch
    raise RuntimeError(f"epoch {epoch} not in force on every worker")


def run_cluster(model: Path, nodes: int, per_node: int, s: BenchNodesSettings, tmp: Path, profile) -> tuple:
    """Measure every placement on one emulated cluster; (rows, profile used, topology text)."""
    from moemesh.launch import running
    from moemesh.model.config import load_config

    cfg = load_config(model)
    up = UpSettings(model=model, workers=nodes * per_node, port=0, http_port=-1, policy="none", max_model_len=256,
                    max_seqs=s.requests)
    with emulated_cluster(nodes, per_node, s.rate) as cluster:
        topo = cluster.topology()
        text = topology_yaml(topo)
        (tmp / f"topology-{nodes}x{per_node}.yaml").write_text(text)
        spec = replace(mesh_spec(up, tmp / f"state-{nodes}x{per_node}", 2), log_dir=tmp / f"logs-{nodes}x{per_node}")
        with running(on_nodes(spec, cluster)) as mesh:
            members = _world(mesh.coordinator)
            rank_of = device_order(members)
            gating = gating_factors(0, _zipf(s), cfg)
            _apply(mesh, on_ranks(_round_robin(model, topo), rank_of, gating))
            passes: dict[str, list[dict]] = {"round-robin": [_measure(mesh, members, cluster, s, cfg)]}
            routed = passes["round-robin"][0]["routed"]
            traffic = traffic_per_step(routed, rank_of, s.requests, cfg)
            context = s.prompt_len + sum(s.window) // 2
            if profile is None:
                profile = _calibrated(model, topo, traffic, s, context, passes["round-robin"][0])
            predicted = predictions(model, topo, traffic, s.requests, context, profile)
            order = [row for row, _, _ in METHODS]
            for k in range(s.passes):  # forward, reverse, forward, ...: drift of the machine's load averages out
                for row in (order if k % 2 == 0 else order[::-1])[1 if k == 0 else 0:]:
                    _apply(mesh, on_ranks(predicted[row]["placement"], rank_of, gating))
                    passes.setdefault(row, []).append(_measure(mesh, members, cluster, s, cfg))
    rows = []
    for row in order:
        p, m = predicted[row], _mean(passes[row])
        padded = padded_link_bytes(nodes, per_node, s.requests, p["max_local"], cfg)
        # the simulator's step with its exchanges priced as the transport sends them (padded blocks)
        layers = len(cfg.moe_layer_ids)
        padded_comm_ms = 1e3 * (padded / topo.inter.bandwidth_bytes_per_s + 2 * layers * topo.inter.latency_s)
        rows.append({"cluster": f"{nodes}x{per_node}", "placement": row, **m,
                     "step_ms_passes": [x["step_ms"] for x in passes[row]],
                     "pred_step_ms": p["step_ms"], "pred_tokens_per_s": p["tokens_per_s"],
                     "pred_max_link_bytes": p["max_link_bytes"], "padded_link_bytes": padded,
                     "pred_padded_step_ms": p["step_ms"] - p["exposed_comm_ms"] + padded_comm_ms,
                     "skew": _skew(routed)})
    return rows, profile, text


def _zipf(s: BenchNodesSettings) -> float:
    return s.zipf if s.zipf is not None else (0.0 if s.model else 1.2)


def _round_robin(model: Path, topo) -> Placement:
    """The paper's starting point over the cluster's devices (routing plays no part in it)."""
    from moemesh.model.config import load_config
    from moemesh.planner.cost import ExpertShape
    from moemesh.planner.search import Problem, plan
    from moemesh.planner.traffic import synthetic

    cfg = load_config(model)
    any_traffic = synthetic(cfg.num_experts, cfg.moe_layer_ids, sources=topo.devices, top_k=cfg.top_k)
    return plan(Problem(topo, any_traffic, ExpertShape.from_config(cfg)), "round-robin").placement


def _calibrated(model: Path, topo, traffic, s: BenchNodesSettings, context: int, m: dict):
    """The field notes' CPU with the per-step serving overhead that makes the simulator's compute
    (step less exposed exchanges and header) equal the measured step less time in collectives."""
    from moemesh.simulate.hardware import FIELD_NOTES_CPU

    first = predictions(model, topo, traffic, s.requests, context, FIELD_NOTES_CPU)["round-robin"]
    compute_ms = first["step_ms"] - first["exposed_comm_ms"] - first["header_ms"]
    return replace(FIELD_NOTES_CPU, serving_overhead_s=max(0.0, m["step_ms"] - m["collective_ms"] - compute_ms) / 1e3)


def _mean(runs: list[dict]) -> dict:
    """The passes of one placement: means of the numbers (the node-pair matrix of the last pass)."""
    out = {k: v for k, v in runs[-1].items() if k != "routed"}
    for k, v in runs[0].items():
        if isinstance(v, (int, float)):
            out[k] = statistics.fmean(r[k] for r in runs)
        elif k == "kernel_out_bytes":
            out[k] = [statistics.fmean(r[k][i] for r in runs) for i in range(len(v))]
    return out


def _skew(routed: list) -> float:
    """max / mean of the experts' routed copies, worst layer."""
    per = np.asarray(routed).sum(axis=0)  # (L, E)
    return float((per.max(axis=1) / per.mean(axis=1)).max())


def main(argv: list[str] | None = None) -> int:
    s = parse_settings(BenchNodesSettings, argv, __doc__.splitlines()[0])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stop the mesh, tear the cluster down
    started = time.perf_counter()
    rows: list[dict] = []
    profile = None
    with tempfile.TemporaryDirectory(prefix="bench-nodes-") as tmp_dir:
        tmp = Path(tmp_dir)
        model_used = s.model.resolve() if s.model else write_tiny_model(tmp / "tiny-mixtral", SPEC)
        topologies = []
        for nodes, per_node in CLUSTERS:
            got, profile, topo_text = run_cluster(model_used, nodes, per_node, s, tmp, profile)
            rows += got
            topologies.append(topo_text)
        from moemesh.model.config import load_config

        cfg = load_config(model_used)
    assert profile is not None
    routing = (f"gating factors 1/rank^{_zipf(s)} (Zipf) per layer" if _zipf(s)
               else f"the model's own router ({s.model})")
    lines = [f"bench-nodes: {model_used.name}: D={cfg.hidden_size} F={cfg.expert_intermediate_size} "
             f"E={cfg.num_experts} "
             f"top-{cfg.top_k} MoE layers={len(cfg.moe_layer_ids)}, fp32, gloo; node links {s.rate} each way (tc tbf); "
             f"{s.requests} concurrent requests, prompt {s.prompt_len}, decode window tokens {s.window[0]}.."
             f"{s.window[1]}; {s.passes} passes per placement (alternating order), means",
             f"routing: {routing}; measured max/mean expert load {rows[0]['skew']:.2f} (worst layer); the planner "
             f"and the simulator get the measured routing",
             f"simulator calibration: serving overhead {profile.serving_overhead_s * 1e3:.1f} ms per step "
             f"(from 2x2 round-robin); links: the shaped rate, loopback {LOCAL_NOTE}",
             "", table(rows), "", *verdict(rows),
             "step ms per pass: " + "; ".join(f"{r['cluster']} {r['placement']} "
                                                + "/".join(f"{x:.0f}" for x in r["step_ms_passes"]) for r in rows),
             "link KB/step: busiest node port (out or in), bytes the workers' collectives sent per decode step; "
             "pred KB: the planner's busiest inter-node port (payload rows, dispatch + combine); padded KB: the "
             "transport's fixed-capacity blocks priced as sent; padded ms: the simulator's step with its exchanges "
             "priced that way; kernel/wkr: node links' bytes (kernel counters) over the workers' inter-node bytes",
             f"bench ran {time.perf_counter() - started:.0f} s"]
    text = "\n".join(lines)
    print(text)
    if s.write:
        tag = "zipf" if _zipf(s) else "trained"
        png = s.write.with_name(f"{s.write.stem}{'' if tag == 'zipf' else '-' + tag}.png")
        write_doc(s.write, png, tag, text)
        picture(rows, png)
        print(f"wrote {s.write} and {png}")
    if s.json_path:
        s.json_path.write_text(json.dumps(rows, indent=2))
    return 0




if __name__ == "__main__":
    sys.exit(main())
