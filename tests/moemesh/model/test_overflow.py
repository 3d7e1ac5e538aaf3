"""Capacity overflow policies: dropless, reroute (next-best expert with room), drop (-1)."""

from __future__ import annotations

import pytest
import torch

from moemesh.engine.engine import Engine, generate
from moemesh.engine.sampling import SamplingParams
from moemesh.mesh.loopback import HostSyncCounter
from moemesh.model.decoder import RuntimeShape, build_model
from moemesh.model.moe import (
    GroupedExperts,
    LocalTransport,
    MoELayer,
)
from moemesh.model.overflow import OVERFLOW_POLICIES, enforce_capacity, expert_capacity
from moemesh.model.routers import SoftmaxTopKRouter
from moemesh.model.tiny import TinySpec, write_tiny_model
from moemesh.model.weights import LayerExperts

# 4 tokens all preferring expert 0 then 1; capacity 2 copies per expert.
IDS = torch.tensor([[0, 1], [0, 1], [0, 1], [0, 2]])  # (T, K)
PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3 + [[0.5, 0.05, 0.3, 0.15]])  # (T, E)


def test_drop_marks_copies_beyond_capacity():
    out = enforce_capacity(IDS, PROBS, capacity=2, policy="drop")
    assert out.shape == (4, 2)
    assert out.tolist() == [[0, 1], [0, 1], [-1, -1], [-1, 2]]


def test_reroute_sends_overflow_to_the_next_best_expert_with_room():
    out = enforce_capacity(IDS, PROBS, capacity=2, policy="reroute")
    assert out.tolist() == [[0, 1], [0, 1], [2, 3], [3, 2]]
    assert torch.equal(enforce_capacity(IDS, PROBS, capacity=2, policy="dropless"), IDS)


def test_capacity_is_the_papers_1_2_times_average():
    assert expert_capacity(tokens=100, top_k=2, num_experts=8, capacity_factor=1.2) == 30


def test_dropped_copies_cost_nothing_and_contribute_nothing():
    g = torch.Generator().manual_seed(0)
    E, D, F = 4, 8, 12
    experts = GroupedExperts({0: LayerExperts.stacked(tuple(range(E)), torch.randn(E, D, 2 * F, generator=g),
                                                      torch.randn(E, D, F, generator=g))})
    x, router = torch.randn(16, D, generator=g), torch.randn(E, D, generator=g)
    seen = []
    counting = lambda layer, batch: seen.append(sum(batch.counts)) or experts(layer, batch)
    drop = MoELayer(SoftmaxTopKRouter(2, True, overflow="drop", capacity_factor=0.5), LocalTransport(E), counting)
    y = drop(0, x, router)
    routing = drop.router(x, router, 0)
    dropped = int((routing.expert_ids < 0).sum())
    assert dropped > 0 and seen == [16 * 2 - dropped]  # dropped copies were never computed
    fully = (routing.expert_ids < 0).all(dim=1)
    assert torch.equal(y[fully], torch.zeros_like(y[fully]))


def test_overflow_policies_in_the_engine(tmp_path):
    model_dir = write_tiny_model(tmp_path / "m", TinySpec(arch="mixtral", layers=2, experts=4, top_k=2, hidden=32,
                                                          intermediate=32, heads=4, kv_heads=2, vocab=300))
    prompts = [[0, 5, 6, 7], [0, 100], [0, 7, 7, 7]]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    exact = generate(Engine(build_model(model_dir, RuntimeShape(max_seqs=4, max_model_len=64))), prompts, params)
    for policy in ("dropless", "reroute", "drop"):
        model = build_model(model_dir, RuntimeShape(max_seqs=4, max_model_len=64))
        model.moe.router.overflow = policy
        out = generate(Engine(model), prompts, params)
        assert [len(o) for o in out] == [12, 12, 12]
        if policy == "dropless":
            assert out == exact


def _reroute_one_copy_at_a_time(expert_ids, probs, capacity):
    """The algorithm as it was: tensor writes and reads per overflowing copy (the reference)."""
    T, K = expert_ids.shape
    E = probs.shape[1]
    flat = expert_ids.reshape(-1)
    onehot = torch.nn.functional.one_hot(flat, E)
    over = (onehot.cumsum(0) * onehot).sum(dim=1) - 1 >= capacity
    out = flat.clone()
    out[over] = -1
    load = torch.bincount(out[out >= 0], minlength=E).tolist()
    ranking = torch.argsort(probs, dim=1, descending=True).tolist()
    for c in torch.nonzero(over).squeeze(1).tolist():
        t = c // K
        taken = set(out[t * K : (t + 1) * K].tolist())
        for e in ranking[t]:
            if e not in taken and load[e] < capacity:
                out[c] = e
                load[e] += 1
                break
    return out.view(T, K)


def _on_the_host(expert_ids, probs, capacity, policy):
    """enforce_capacity as it was before it moved to the device: positions by one-hot cumsum, a
    read-back to learn whether anything overflows, and reroute's greedy on host lists (the reference)."""
    T, K = expert_ids.shape
    E = probs.shape[1]
    flat = expert_ids.reshape(-1)  # (T*K,)
    onehot = torch.nn.functional.one_hot(flat, E)  # (T*K, E)
    over = (onehot.cumsum(0) * onehot).sum(dim=1) - 1 >= capacity  # (T*K,)
    if not bool(over.any()):
        return expert_ids
    if policy == "drop":
        return flat.masked_fill(over, -1).view(T, K)  # (T, K)
    ranking = torch.argsort(probs, dim=1, descending=True).tolist()  # T lists of E
    ids, overflowing = flat.tolist(), over.tolist()
    out = [-1 if o else e for e, o in zip(ids, overflowing)]
    load = [0] * E
    for e in out:
        if e >= 0:
            load[e] += 1
    for c in (c for c, o in enumerate(overflowing) if o):
        t = c // K
        taken = set(out[t * K : (t + 1) * K])
        for e in ranking[t]:
            if e not in taken and load[e] < capacity:
                out[c] = e
                load[e] += 1
                break
    return torch.tensor(out, dtype=torch.int64).view(T, K)  # (T, K)


def _random_case(g: torch.Generator, T: int, E: int, K: int, skew: float, gated: bool, ties: bool):
    """(T, K) ids and (T, E) probs; gated: ids chosen by probs x factors, so not each token's
    top of probs (as with load-aware gating); ties: probs rounded so rankings hold ties."""
    probs = torch.softmax(torch.randn(T, E, generator=g) * skew, dim=1)  # (T, E)
    if ties:
        probs = (probs * 4).round() / 4  # (T, E)
    factors = torch.rand(E, generator=g) * 2 if gated else torch.ones(E)  # (E,)
    return torch.topk(probs * factors, K, dim=1).indices, probs  # (T, K), (T, E)


def test_device_policies_equal_the_host_algorithm_with_no_sync():
    g = torch.Generator().manual_seed(3)
    cases, overflowed = 0, 0
    for T in (1, 2, 5, 17, 40, 64):
        for E in (1, 2, 3, 4, 8, 16):
            for K in sorted({1, 2, min(4, E), E}):
                if K > E:
                    continue
                for trial in range(6):
                    ids, probs = _random_case(g, T, E, K, skew=1 + trial, gated=trial % 2 == 1, ties=trial == 4)
                    cap = expert_capacity(T, K, E, capacity_factor=0.3 + trial / 5)
                    with HostSyncCounter() as syncs:
                        dropped = enforce_capacity(ids, probs, cap, "drop")
                        rerouted = enforce_capacity(ids, probs, cap, "reroute")
                    assert syncs.calls == []
                    assert torch.equal(dropped, _on_the_host(ids, probs, cap, "drop"))
                    assert torch.equal(rerouted, _on_the_host(ids, probs, cap, "reroute"))
                    assert torch.equal(rerouted, _reroute_one_copy_at_a_time(ids, probs, cap))
                    cases += 1
                    overflowed += int(not torch.equal(dropped, ids))
    assert overflowed > cases // 3  # the cases exercise the policies, not just the no-overflow path


def test_reroute_on_the_device_equals_the_copy_at_a_time_algorithm_with_no_sync():
    g = torch.Generator().manual_seed(3)
    overflowed = False
    for trial in range(20):
        T, E, K = 40, 8, 2
        probs = torch.softmax(torch.randn(T, E, generator=g) * 3, dim=1)  # (T, E) skewed: overflow
        ids = torch.topk(probs, K, dim=1).indices  # (T, K)
        cap = expert_capacity(T, K, E, capacity_factor=0.5 + trial / 20)
        with HostSyncCounter() as syncs:
            got = enforce_capacity(ids, probs, cap, "reroute")
        assert syncs.calls == []
        assert torch.equal(got, _reroute_one_copy_at_a_time(ids, probs, cap))
        overflowed = overflowed or not torch.equal(got, ids)
    assert overflowed


def test_reroute_follows_a_chain_of_filling_experts_to_its_end():
    """Each token's next-best expert is filled by the token before it: the greedy's longest chain
    (E - 1 experts fill one after another), so every one of reroute's rounds is needed."""
    E = 8
    probs = torch.softmax(-torch.arange(E, dtype=torch.float32), dim=0).expand(E + 1, E)  # (T, E) 0 best, then 1, ...
    ids = torch.zeros(E + 1, 1, dtype=torch.int64)  # (T, K) every token picks expert 0
    got = enforce_capacity(ids, probs, capacity=1, policy="reroute")
    assert got.view(-1).tolist() == [*range(E), -1]  # the last token finds every expert full
    assert torch.equal(got, _on_the_host(ids, probs, 1, "reroute"))


@pytest.mark.parametrize("gated", [False, True], ids=["model-gating", "load-aware-gating"])
@pytest.mark.parametrize("policy", OVERFLOW_POLICIES)
def test_the_router_makes_no_host_sync(policy, gated):
    g = torch.Generator().manual_seed(1)
    T, E, D, K = 24, 6, 16, 2
    x, weight = torch.randn(T, D, generator=g), torch.randn(E, D, generator=g)  # (T, D), (E, D)
    router = SoftmaxTopKRouter(K, True, overflow=policy, capacity_factor=0.5)
    if gated:
        router.factors[0] = torch.rand(E, generator=g) * 2  # (E,)
    with HostSyncCounter() as syncs:
        routing = router(x, weight, 0)
    assert syncs.calls == []
    assert (routing.expert_ids < 0).any() == (policy != "dropless")  # capacity 0.5 x average: it overflows
    if policy == "reroute":
        assert bool((routing.expert_ids >= 0).all(dim=1).any())  # some overflowing copies found room
