"""The whole system as users run it: `moemesh up` (coordinator, workers, gateway as real processes)
against the single-process engine, on real checkpoints."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
import urllib.request

import grpc
import psutil
import pytest

from moemesh.cli import main as cli_main
from moemesh.client import Client
from moemesh.engine.engine import Engine, generate
from moemesh.engine.sampling import SamplingParams
from moemesh.launcher import resolve_workers
from moemesh.model.decoder import RuntimeShape, build_model
from moemesh.model.tiny import TinySpec, write_tiny_model
from moemesh.v1 import coordinator_pb2, coordinator_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.moemesh.epoch_watch import first_worker, move_every_expert, watch_stream

pytestmark = pytest.mark.slow  # starts `moemesh up` meshes

# An idle mesh (nothing in flight) sleeps: each of its processes may use at most this share of one
# core over the window. A resource bound, not a speed check: a busy-polling loop in any process uses
# a whole core (20 times this); the idle mesh's periodic work (a heartbeat a second per worker, long
# polls re-made) measured 0.7-1.1% of a core per process. Bounding each process, not their sum, keeps
# the margin whatever the number of workers (a 7-process sum measured 4.1% here and 5.2% on CI).
IDLE_WINDOW = 6.0  # long enough that the periodic work averages out
IDLE_CPU_SHARE = 0.05

# 8 requests of different lengths, arriving at different times.
PROMPTS = [[0, 5, 6, 7], [0, 9], [0, 300, 301, 302, 303, 304, 305, 306, 307], [0, 42, 43],
           [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [0, 77], [0, 250, 251, 252, 253], [0, 100, 101]]
NEW_TOKENS = [12, 20, 8, 16, 10, 24, 14, 18]


def _spec(arch: str) -> TinySpec:
    return TinySpec(arch=arch, layers=2, experts=4, top_k=2, hidden=64, intermediate=64, heads=4, kv_heads=2,
                    vocab=512, seed=1)


def _model_and_expected(arch: str, tmp_path_factory) -> tuple:
    """A tiny checkpoint of `arch` and the single-process engine's tokens for PROMPTS."""
    model = write_tiny_model(tmp_path_factory.mktemp(arch) / "model", _spec(arch))
    engine = Engine(build_model(model, RuntimeShape(max_seqs=1, max_model_len=256)))
    expected = [generate(engine, [p], SamplingParams(max_new_tokens=n))[0] for p, n in zip(PROMPTS, NEW_TOKENS)]
    return model, expected


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe"])
def family(request, tmp_path_factory):
    return _model_and_expected(request.param, tmp_path_factory)


async def _staggered(target: str) -> list[list[int]]:
    async with Client(target, timeout=120) as client:
        async def one(i: int) -> list[int]:
            await asyncio.sleep(0.05 * i)
            done = await client.generate_text(
                token_ids=PROMPTS[i], params=SamplingParams(max_new_tokens=NEW_TOKENS[i], ignore_eos=False))
            return list(done.token_ids)

        return await asyncio.gather(*(one(i) for i in range(len(PROMPTS))))


def _cpu_used(procs: list[psutil.Process]) -> dict[int, float]:
    """CPU time (user + system) each process has used so far, by pid; one that has exited fails
    the test (counting it as idle would hide a crash)."""
    used = {}
    for p in procs:
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                pytest.fail(f"process {p.pid} exited while the mesh should be idle")
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            pytest.fail(f"process {p.pid} vanished while the mesh should be idle")
        used[p.pid] = t.user + t.system
    return used


async def _settled(coordinator: str) -> None:
    """Until every worker reports nothing running or waiting (bounded by a hang bound)."""
    async def load() -> int:
        async with grpc.aio.insecure_channel(coordinator) as ch:
            world = await coordinator_pb2_grpc.CoordinatorStub(ch).WaitForWorld(
                coordinator_pb2.WaitForWorldRequest(), timeout=10)
        total = 0
        for member in world.members:
            async with grpc.aio.insecure_channel(member.address) as ch:
                s = await worker_pb2_grpc.WorkerStub(ch).Status(worker_pb2.StatusRequest(), timeout=10)
            total += s.running_requests + s.waiting_requests
        return total

    deadline = time.monotonic() + 60  # hang bound
    while await load() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert await load() == 0, "requests still on the workers after every stream ended"


@pytest.mark.parametrize(
    "workers, micro", [(4, 1), (2, 2)], ids=["one-expert-per-worker", "colocated-two-per-worker-overlapped"]
)
def test_mesh_output_is_token_identical_to_local(family, mesh_factory, workers, micro):
    """Then, with nothing in flight, the mesh stays idle; SIGINT to `up` leaves no process.
    The colocated mesh also runs two micro-batches per step (two-batch overlap)."""
    model, expected = family
    mesh = mesh_factory(model, workers, "--micro-batches", str(micro))
    assert asyncio.run(_staggered(mesh.gateway)) == expected
    with urllib.request.urlopen(f"http://{mesh.http}/health", timeout=30) as health:  # the ready line's HTTP API
        assert health.status == 200
    procs = mesh.processes()
    assert len(procs) == 1 + 1 + workers + 1  # up, coordinator, workers, gateway
    asyncio.run(_settled(mesh.coordinator))
    before = _cpu_used(procs)
    time.sleep(IDLE_WINDOW)  # the measurement window (the mesh has settled: nothing is waited for)
    after = _cpu_used(procs)
    busy = {f"{p.pid} {' '.join(p.cmdline()[1:4])}": round(after[p.pid] - before[p.pid], 3) for p in procs
            if after[p.pid] - before[p.pid] > IDLE_CPU_SHARE * IDLE_WINDOW}
    assert not busy, f"idle processes used these CPU-s in {IDLE_WINDOW} s: {busy}"
    assert mesh.stop() == []


@pytest.mark.parametrize("arch", ["qwen2_moe", "olmoe", "glm4_moe", "gpt_oss"])
def test_newer_family_mesh_is_token_identical_to_local(arch, tmp_path_factory, mesh_factory):
    """One mesh run per newer family, 4 workers holding one routed expert each. Qwen2-MoE: the
    gated shared expert; OLMoE: full q/k norms; GLM-4.5: partial rotary, q/k/v biases, grouped
    routing and a shared expert; GPT-OSS: attention sinks, sliding and full layers (the requests
    cross the window), a biased router, biased experts (each worker loads its experts' biases).
    DeepSeek-V3 runs in the next test, colocated, redundant and across an epoch switch.
    Colocation, overlap, shards and epoch switches are family-independent code that the two
    families above run; these families do not run them again (each mesh run costs minutes here)."""
    model, expected = _model_and_expected(arch, tmp_path_factory)
    mesh = mesh_factory(model, 4)
    assert asyncio.run(_staggered(mesh.gateway)) == expected
    assert mesh.stop() == []


LONG_TOKENS = 200  # the watched generation outlives the switch (prompt + 200 fits the mesh's 256)


def test_deepseek_v3_mesh_colocated_redundant_across_an_epoch_switch_is_token_identical(
        tmp_path_factory, mesh_factory):
    """DeepSeek-V3, the family whose work on a worker differs most (MLA latent cache, shared
    experts, grouped sigmoid routing; 1 dense layer, then 1 MoE layer), on 4 workers with
    `--redundant-experts 1`: every routed expert on two workers, two experts per worker
    (colocated; an expert's replicas share its tokens). The staggered requests equal the
    single-process engine's; then a long generation sees an epoch switch mid-stream to one expert
    per worker (expert e moves to worker e + 1, which loads it unless it held a replica) and
    still equals the engine's, token for token. One mesh for all of it (each start costs ~10-20 s)."""
    model, expected = _model_and_expected("deepseek_v3", tmp_path_factory)
    mesh = mesh_factory(model, 4, "--redundant-experts", "1")
    assert asyncio.run(_staggered(mesh.gateway)) == expected
    before = asyncio.run(_worker_statuses(mesh.coordinator))
    holders = sorted(e for s in before for layer in s.experts for e in layer.expert_ids)
    assert holders == [0, 0, 1, 1, 2, 2, 3, 3], "every expert on two workers"
    assert all([len(layer.expert_ids) for layer in s.experts] == [2] for s in before), "two per worker"

    prompt, params = PROMPTS[0], SamplingParams(max_new_tokens=LONG_TOKENS, ignore_eos=True)
    engine = Engine(build_model(model, RuntimeShape(max_seqs=1, max_model_len=256)))
    want = generate(engine, [prompt], params)[0]
    watch, epoch = asyncio.run(_generate_while_moving_experts(mesh, prompt, params))
    assert watch.token_ids == want
    assert [new for _, _, new in watch.switched_mid_stream()] == [epoch], f"no switch mid-stream: {watch.seen}"
    for s in asyncio.run(_worker_statuses(mesh.coordinator)):
        assert [list(layer.expert_ids) for layer in s.experts] == [[(s.rank - 1) % 4]] and s.loaded_epoch == epoch
    assert mesh.stop() == []


async def _worker_statuses(coordinator: str) -> list[worker_pb2.WorkerStatus]:
    async with grpc.aio.insecure_channel(coordinator) as ch:
        world = await coordinator_pb2_grpc.CoordinatorStub(ch).WaitForWorld(
            coordinator_pb2.WaitForWorldRequest(), timeout=10)
    statuses = []
    for member in world.members:
        async with grpc.aio.insecure_channel(member.address) as ch:
            statuses.append(await worker_pb2_grpc.WorkerStub(ch).Status(worker_pb2.StatusRequest(), timeout=10))
    return statuses


async def _generate_while_moving_experts(mesh, prompt: list[int], params: SamplingParams):
    """Stream `prompt`, reading rank 0's epoch after every chunk; once the first chunk is in, move
    every expert. Returns the watched stream and the epoch published."""
    worker = await first_worker(mesh.coordinator)
    watching = asyncio.Event()
    async with Client(mesh.gateway, timeout=120) as client:
        async def move() -> int:
            await watching.wait()
            return await move_every_expert(mesh.coordinator, 4)

        return await asyncio.gather(watch_stream(client, worker, prompt, params, watching), move())


def test_mesh_with_every_expert_split_is_token_identical_to_local(tmp_path_factory, mesh_factory):
    """Expert tensor parallelism: every expert as two column/row-parallel shards on two of the
    4 workers (`moemesh up --expert-shards 2`). The split is family-independent code (the
    transport and the expert weights), so one family runs it as processes; both families run it
    in-process in tests/expert_worker/test_runner.py."""
    model, expected = _model_and_expected("mixtral", tmp_path_factory)
    mesh = mesh_factory(model, 4, "--expert-shards", "2")
    assert asyncio.run(_staggered(mesh.gateway)) == expected
    assert mesh.stop() == []


def test_up_refuses_a_folder_without_a_checkpoint(tmp_path, capsys):
    """Refused before anything starts (in this process: `up` reads config.json before it spawns)."""
    assert cli_main(["up", "--model", str(tmp_path), "--workers", "2"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_resolve_workers():
    assert resolve_workers(16, None, None) == 16
    assert resolve_workers(16, None, 2) == 8
    assert resolve_workers(64, None, 22) == 3
    assert resolve_workers(16, 3, None) == 3
    assert resolve_workers(16, None, None, shards=2) == 32  # one shard per worker


# Gating updates only after a 100-token window whose most loaded expert exceeds 1.2 x the mean;
# which tokens share a window depends on how requests were batched. 80 tokens a request give each
# worker several windows (40 gave one or two, and a balanced first window then meant no update).
GATING_TOKENS = 80
WATCHED_TOKENS = 200  # the watched stream outlives the first windows (prompt + 200 fits the mesh's 256)


def test_gating_policy_rebalances_live_and_loses_no_request(tmp_path, mesh_factory):
    """Policy "gating" on a real mesh: ModelInfo names it, epochs advance as tokens flow (every
    100 routed tokens), and every request still completes (outputs may differ: it changes routing)."""
    model = write_tiny_model(tmp_path / "model", _spec("mixtral"))
    mesh = mesh_factory(model, 2, "--policy", "gating")

    async def run():
        worker = await first_worker(mesh.coordinator)
        async with Client(mesh.gateway, timeout=120) as client:
            before = await client.model_info()
            params = SamplingParams(max_new_tokens=GATING_TOKENS, ignore_eos=True)
            # The watched request outlives the others by far: the first windows of routed tokens
            # (100 each) publish factors while it still generates, whatever the batching.
            long = SamplingParams(max_new_tokens=WATCHED_TOKENS, ignore_eos=True)
            rest = (client.generate_text(token_ids=p, params=params) for p in PROMPTS[1:])
            watch, *done = await asyncio.gather(watch_stream(client, worker, PROMPTS[0], long), *rest)
            return before, [watch.token_ids, *(d.token_ids for d in done)], await client.model_info(), watch

    before, done, after, watch = asyncio.run(run())
    assert before.balancing_policy == "gating"
    assert [len(d) for d in done] == [WATCHED_TOKENS] + [GATING_TOKENS] * (len(PROMPTS) - 1)
    assert after.placement_epoch > before.placement_epoch  # the coordinator published new factors
    assert watch.switched_mid_stream(), f"no epoch switch seen while generating: {watch.seen}"
    assert mesh.stop() == []


def test_up_tls_serves_only_clients_with_its_certificates_and_listens_on_loopback(tmp_path, capsys):
    """`moemesh up --tls`: every service runs mTLS with certificates up wrote into its run folder
    (the ready line names them); a plaintext client is refused, the CLI with the client flags gets
    the reference tokens, `placement show` needs a service or admin certificate; every socket the
    mesh listens on is a loopback one (the TCPStore included)."""
    from moemesh.certs import role_files
    from moemesh.errors import UnavailableError
    from moemesh.launcher import UpProcess

    model = write_tiny_model(tmp_path / "model", _spec("mixtral"))
    engine = Engine(build_model(model, RuntimeShape(max_seqs=1, max_model_len=256)))
    expected = generate(engine, [PROMPTS[0]], SamplingParams(max_new_tokens=6))[0]
    up = UpProcess(model, 2, ["--tls"], quiet=True)
    try:
        assert up.certs is not None and (up.certs / "ca.pem").is_file()
        listening = {ipaddress.ip_address(c.laddr.ip) for p in up.processes() for c in p.net_connections("inet")
                     if c.status == psutil.CONN_LISTEN}
        assert listening and all(ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped and ip.ipv4_mapped.is_loopback)
                                 for ip in listening), listening

        async def plaintext() -> None:
            async with Client(up.gateway, timeout=10) as client:
                await client.model_info(timeout=10)

        with pytest.raises((UnavailableError, grpc.aio.AioRpcError)):
            asyncio.run(plaintext())
        client, admin = role_files(up.certs, "client").flags(), role_files(up.certs, "admin").flags()
        capsys.readouterr()
        assert cli_main(["generate", "--target", up.gateway, "--token-ids", ",".join(map(str, PROMPTS[0])),
                         "--max-new-tokens", "6", "--json", *client]) == 0
        assert json.loads(capsys.readouterr().out)["token_ids"] == expected
        assert cli_main(["placement", "show", "--coordinator", up.coordinator, *client]) == 2
        assert "PERMISSION_DENIED" in capsys.readouterr().err
        assert cli_main(["placement", "show", "--coordinator", up.coordinator, *admin]) == 0
        assert "placement epoch" in capsys.readouterr().out
    finally:
        assert up.stop() == []
