"""MeshRunner, the engine thread, on the loopback collective (ranks as threads, one process):
tokens equal the local engine's, epoch switches, stop, cancel, rejection, a lost world and the
next generation."""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

from expert_worker.epochs import prepare_epoch
from expert_worker.requests import Rejected as TableRejected
from expert_worker.requests import RequestTable, Submission
from expert_worker.runner import Cancel, MeshRunner, Rejected, Submit, World
from moemesh.engine.engine import (
    Engine,
    EngineSettings,
    FinishReason,
    TokenEvent,
    generate,
)
from moemesh.engine.sampling import SamplingParams
from moemesh.errors import InvalidRequestError
from moemesh.mesh.loopback import LoopbackWaker, LoopbackWorld
from moemesh.mesh.placement import Placement, initial_placement, split_placement, whole_replicas
from moemesh.mesh.routing_counts import LoadRecorder, LoadSample
from moemesh.mesh.transport import AllToAllTransport
from moemesh.model.checkpoint import CheckpointReader
from moemesh.model.decoder import RuntimeShape, build_model
from moemesh.model.tiny import TinySpec, write_tiny_model
from moemesh.status import status_for

SPEC = TinySpec(layers=2, experts=4, hidden=32, intermediate=48, heads=4, kv_heads=2, vocab=300)
RUNTIME = RuntimeShape(max_seqs=8, max_model_len=128)
PARAMS = SamplingParams(max_new_tokens=10, ignore_eos=True)
PROMPTS = {0: [[5, 6, 7, 8, 9], [12, 13]], 1: [[100, 200, 250, 3, 4, 5, 6, 7]], 2: []}  # rank -> its requests
HANG_S = 120.0  # bounds a hang only


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model", SPEC)


@pytest.fixture(scope="module")
def local_tokens(checkpoint) -> dict[tuple[int, ...], list[int]]:
    prompts = [p for ps in PROMPTS.values() for p in ps]
    out = generate(Engine(build_model(checkpoint, RUNTIME)), prompts, PARAMS)
    return {tuple(p): tokens for p, tokens in zip(prompts, out)}


class Events:
    """Every event a rank delivered; wait_for() blocks on a condition until a predicate holds."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.events: list[TokenEvent | Rejected] = []

    def __call__(self, events) -> None:
        with self.cond:
            self.events.extend(events)
            self.cond.notify_all()

    def wait_for(self, predicate) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: predicate(self.events), timeout=HANG_S), "hang"

    def wait_finished(self, rid: str) -> None:
        self.wait_for(lambda _: self.finished(rid))

    def tokens(self, rid: str) -> list[int]:
        return [e.token_id for e in self.events if isinstance(e, TokenEvent) and e.request_id == rid
                and e.token_id is not None]

    def finished(self, rid: str) -> bool:
        return any((isinstance(e, Rejected) and e.request_id == rid)
                   or (isinstance(e, TokenEvent) and e.request_id == rid and e.finish is not None) for e in self.events)


@dataclass
class Mesh:
    runners: list[MeshRunner]
    events: list[Events]
    threads: list[threading.Thread]
    world: LoopbackWorld
    samples: list[list[LoadSample]]  # per rank: the load windows reported

    def stop(self, rank: int = 0) -> None:
        """Rank `rank` stops: every rank leaves the world after that header; the others, asked to
        stop too, end instead of waiting for a next world generation."""
        self.runners[rank].request_stop()
        self.threads[rank].join(HANG_S)
        for runner in self.runners:
            runner.request_stop()
        for t in self.threads:
            t.join(HANG_S)
        assert not any(t.is_alive() for t in self.threads), "a rank did not stop"


def start_mesh(checkpoint: Path, placement: Placement, micro_batches: int | list[int] = 1, chunk_budget: int = 0
               ) -> Mesh:
    """One engine thread per rank; `micro_batches` per rank when a list (a misconfiguration);
    `chunk_budget` > 0: chunked prefill with that many tokens per step."""
    world, waker = LoopbackWorld(placement.world_size, timeout_s=HANG_S), LoopbackWaker(timeout_s=HANG_S)
    runners, events, samples = [], [], []
    for rank in range(placement.world_size):
        collective = world.collective(rank)
        recorder = LoadRecorder.for_placement(placement)
        transport = AllToAllTransport(collective, placement, observer=recorder)
        pieces = {layer: placement.pieces_on(rank, layer) for layer in placement.layers}
        model = build_model(checkpoint, RUNTIME, transport=transport, assignment=placement.assignment(rank),
                            shards=pieces, recorder=recorder)
        m = micro_batches[rank] if isinstance(micro_batches, list) else micro_batches
        engine = Engine(model, EngineSettings(micro_batches=m, chunked_prefill=chunk_budget > 0,
                                              max_batched_tokens=chunk_budget or 4096))
        events.append(Events())
        samples.append([])
        runners.append(MeshRunner(engine, collective, waker, placement.epoch, on_events=events[-1],
                                  on_load=samples[-1].append, recorder=recorder, report_every_tokens=8))
    threads = [threading.Thread(target=r.run, name=f"engine-{i}", daemon=True) for i, r in enumerate(runners)]
    for t in threads:
        t.start()
    return Mesh(runners, events, threads, world, samples)


def submit_all(mesh: Mesh) -> dict[str, tuple[int, list[int]]]:
    """rid -> (rank, prompt) for every request of PROMPTS."""
    sent = {}
    for rank, prompts in PROMPTS.items():
        for i, prompt in enumerate(prompts):
            rid = f"r{rank}-{i}"
            mesh.runners[rank].submit(Submit(rid, prompt, PARAMS))
            sent[rid] = (rank, prompt)
    return sent


def assert_same_tokens(mesh: Mesh, sent, local_tokens) -> None:
    for rid, (rank, prompt) in sent.items():
        mesh.events[rank].wait_finished(rid)
        assert mesh.events[rank].tokens(rid) == local_tokens[tuple(prompt)], rid


@pytest.mark.parametrize(("micro_batches", "chunk_budget"), [(1, 0), (2, 0), (1, 3), (2, 3)])
def test_tokens_equal_the_local_engine_and_ranks_stay_in_lockstep(checkpoint, local_tokens, micro_batches,
                                                                  chunk_budget):
    """Also with chunked prefill (3 tokens per step: prompts of 5 and 8 tokens go in chunks)."""
    placement = initial_placement(SPEC.experts, [0, 1], world_size=3)
    mesh = start_mesh(checkpoint, placement, micro_batches, chunk_budget)
    try:
        assert_same_tokens(mesh, submit_all(mesh), local_tokens)
    finally:
        mesh.stop(rank=2)  # a rank with no requests of its own asks
    assert all(r.failure is None for r in mesh.runners)
    # Every rank ran the same forward passes (idle rounds ran none) and counted the same idle rounds.
    assert len({r.steps for r in mesh.runners}) == 1 and len({r.idle_round for r in mesh.runners}) == 1
    for r in mesh.runners:
        exchanges = r.collective.exchanges
        assert exchanges == r.steps * micro_batches * 2 * len(placement.layers)  # dispatch + combine per layer
    # Load windows: reported every 8 routed tokens; each token made K copies in every MoE layer.
    for rank, samples in enumerate(mesh.samples):
        assert bool(samples) == bool(PROMPTS[rank])
        for sample in samples:
            assert sample.tokens >= 8
            assert sample.expert_counts.sum(dim=1).tolist() == [sample.tokens * SPEC.top_k] * 2
            assert sample.link_counts.sum(dim=1).tolist() == [sample.tokens * SPEC.top_k] * 2


def test_an_epoch_switch_mid_generation_keeps_tokens_and_happens_at_one_step(checkpoint, local_tokens):
    first = initial_placement(SPEC.experts, [0, 1], world_size=3)
    moved = whole_replicas(epoch=2, world_size=3, holders={layer: ((2,), (0, 1), (1,), (0, 2)) for layer in (0, 1)})
    mesh = start_mesh(checkpoint, first)
    reader = CheckpointReader(checkpoint)

    def prepare(rank: int):
        model = mesh.runners[rank].engine.model
        return prepare_epoch(moved, rank, dict(model.moe.experts.layers), reader, model.cfg, torch.float32, "cpu")

    prepared = [prepare(rank) for rank in range(3)]
    mesh.runners[0].offer_epoch(prepared[0], generation=1)  # rank 0 is ready early: nobody may switch yet
    try:
        sent = submit_all(mesh)
        mesh.events[0].wait_for(lambda events: len(mesh.events[0].tokens("r0-0")) >= 3)
        mesh.runners[1].offer_epoch(prepared[1], generation=1)
        mesh.runners[2].offer_epoch(prepared[2], generation=1)
        assert_same_tokens(mesh, sent, local_tokens)
    finally:
        mesh.stop()
    switches = [r.switches for r in mesh.runners]
    assert switches[0] == switches[1] == switches[2] and [e for e, _ in switches[0]] == [2]
    assert switches[0][0][1] >= 3  # after rank 0 had its third token: when the last rank had loaded
    assert all(r.engine.model.moe.transport.placement.epoch == 2 for r in mesh.runners)


def test_cancel_reject_and_stop(checkpoint):
    mesh = start_mesh(checkpoint, initial_placement(SPEC.experts, [0, 1], world_size=2))
    long = SamplingParams(max_new_tokens=100, ignore_eos=True)
    try:
        mesh.runners[1].submit(Submit("long", [5, 6, 7], long))
        mesh.runners[0].submit(Submit("bad", [], PARAMS))  # an empty prompt is invalid
        mesh.events[0].wait_for(lambda _: mesh.events[0].finished("bad"))
        rejected = [e for e in mesh.events[0].events if isinstance(e, Rejected)]
        assert [e.request_id for e in rejected] == ["bad"] and isinstance(rejected[0].error, InvalidRequestError)
        mesh.events[1].wait_for(lambda _: len(mesh.events[1].tokens("long")) >= 2)
        mesh.runners[1].submit(Cancel("long"))
        mesh.events[1].wait_for(lambda _: mesh.events[1].finished("long"))
        last = [e for e in mesh.events[1].events if e.request_id == "long"][-1]
        assert isinstance(last, TokenEvent) and last.finish == FinishReason.CANCELLED
        assert len(mesh.events[1].tokens("long")) < 100
        mesh.runners[0].submit(Submit("late", [5, 6, 7], long))  # still running when the mesh stops
        mesh.events[0].wait_for(lambda _: len(mesh.events[0].tokens("late")) >= 1)
    finally:
        mesh.stop(rank=1)
    assert all(r.failure is None for r in mesh.runners)
    assert not mesh.runners[0].accepting
    closing = [e for e in mesh.events[0].events if e.request_id == "late"][-1]
    assert isinstance(closing, Rejected)  # a request still here at the stop gets a closing event


def test_ranks_disagreeing_on_micro_batches_fail_instead_of_hanging(checkpoint):
    mesh = start_mesh(checkpoint, initial_placement(SPEC.experts, [0, 1], world_size=2), micro_batches=[1, 2])
    for t in mesh.threads:
        t.join(HANG_S)
    assert not any(t.is_alive() for t in mesh.threads), "a rank hung"
    assert all(isinstance(r.failure, RuntimeError) and "micro-batches" in str(r.failure) for r in mesh.runners)
    assert not any(r.accepting for r in mesh.runners)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_every_expert_split_over_two_ranks_equals_the_local_engine_for_both_families(tmp_path, arch):
    """Expert tensor parallelism (`moemesh up --expert-shards 2`) for both model families; the
    process mesh runs Mixtral only (tests/moemesh/test_launcher.py)."""
    checkpoint = write_tiny_model(tmp_path / arch, dataclasses.replace(SPEC, arch=arch))
    prompts = [p for ps in PROMPTS.values() for p in ps]
    expected = dict(zip(map(tuple, prompts), generate(Engine(build_model(checkpoint, RUNTIME)), prompts, PARAMS)))
    placement = split_placement(SPEC.experts, [0, 1], world_size=3, shards=2)
    assert all(len(group) == 2 for layer in placement.replicas.values() for groups in layer for group in groups)
    mesh = start_mesh(checkpoint, placement)
    try:
        assert_same_tokens(mesh, submit_all(mesh), expected)
    finally:
        mesh.stop()
    assert all(r.failure is None for r in mesh.runners)


def test_a_rank_that_lost_its_world_keeps_its_requests_and_finishes_them_in_the_next_generation(
        checkpoint, local_tokens):
    """The world breaks mid-generation (a peer died). The surviving rank reports the loss, keeps
    its running requests (KV caches, positions) and takes new ones meanwhile; offered generation 2
    (here: a world of one holding every expert), it runs the broken step again and finishes every
    request with exactly the local engine's tokens. Stopped, it refuses new work as UNAVAILABLE."""
    mesh = start_mesh(checkpoint, initial_placement(SPEC.experts, [0, 1], world_size=2))
    lost: list[tuple[int, str]] = []
    survivor = mesh.runners[0]
    survivor.on_world_lost = lambda generation, reason: lost.append((generation, reason))
    long = SamplingParams(max_new_tokens=40, ignore_eos=True)
    survivor.submit(Submit("running", [5, 6, 7, 8, 9], long))
    mesh.events[0].wait_for(lambda _: len(mesh.events[0].tokens("running")) >= 2)
    mesh.world.abort("rank 1 died")
    mesh.runners[1].request_stop()  # rank 1 plays the dead peer: it must end too
    mesh.threads[1].join(HANG_S)
    survivor.submit(Submit("between", [12, 13], PARAMS))  # between worlds: it waits, it is not refused
    assert survivor.accepting

    alone = dataclasses.replace(initial_placement(SPEC.experts, [0, 1], world_size=1), epoch=2)
    model = survivor.engine.model
    prepared = prepare_epoch(alone, 0, dict(model.moe.experts.layers), CheckpointReader(checkpoint), model.cfg,
                             torch.float32, "cpu")
    world = LoopbackWorld(1, timeout_s=HANG_S)
    survivor.offer_world(World(generation=2, collective=world.collective(0), waker=LoopbackWaker(HANG_S),
                               first=prepared))
    try:
        mesh.events[0].wait_finished("running")
        mesh.events[0].wait_finished("between")
    finally:
        survivor.request_stop()
        mesh.threads[0].join(HANG_S)
    assert not mesh.threads[0].is_alive(), "the surviving rank hung"
    reference = generate(Engine(build_model(checkpoint, RUNTIME)), [[5, 6, 7, 8, 9]], long)[0]
    assert mesh.events[0].tokens("running") == reference  # no token lost, repeated or changed
    assert mesh.events[0].tokens("between") == local_tokens[(12, 13)]
    assert [g for g, _ in lost] == [1] and "rank 1 died" in lost[0][1]
    assert survivor.failure is None and survivor.worlds_lost == 1 and survivor.generation == 2
    assert survivor.switches[-1][0] == 2 and survivor.engine.model.moe.transport.world_size == 1

    table = RequestTable(survivor.submit, lambda: survivor.accepting, survivor.engine.validate)
    stream = table.open_stream()
    table.submit(stream, Submission("next", (5, 6), PARAMS, ()))
    (refused,) = [one for batch in _drain(stream) for one in batch]
    assert isinstance(refused, TableRejected) and status_for(refused.error) == grpc.StatusCode.UNAVAILABLE


def _drain(stream) -> list[list]:
    out = []
    while not stream.out.empty():
        out.append(stream.out.get_nowait())
    return out
