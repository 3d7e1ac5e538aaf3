"""Capacity overflow policies: dropless, reroute (next-best expert with room), drop (-1)."""

from __future__ import annotations

import torch

from moemesh.engine.engine import Engine, generate
from moemesh.engine.sampling import SamplingParams
from moemesh.model.decoder import RuntimeShape, build_model
from moemesh.model.moe import (
    GroupedExperts,
    LocalTransport,
    MoELayer,
    SoftmaxTopKRouter,
)
from moemesh.model.overflow import enforce_capacity, expert_capacity
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


def test_reroute_on_the_host_equals_the_copy_at_a_time_algorithm_with_one_transfer_each_way(monkeypatch):
    from moemesh.model import overflow

    copies = {"to_host": 0, "to_device": 0}
    for name in copies:
        real = getattr(overflow, name)

        def counted(*args, _real=real, _name=name):
            copies[_name] += 1
            return _real(*args)

        monkeypatch.setattr(overflow, name, counted)
    g = torch.Generator().manual_seed(3)
    for trial in range(20):
        T, E, K = 40, 8, 2
        probs = torch.softmax(torch.randn(T, E, generator=g) * 3, dim=1)  # (T, E) skewed: overflow
        ids = torch.topk(probs, K, dim=1).indices  # (T, K)
        cap = expert_capacity(T, K, E, capacity_factor=0.5 + trial / 20)
        before = dict(copies)
        got = enforce_capacity(ids, probs, cap, "reroute")
        assert torch.equal(got, _reroute_one_copy_at_a_time(ids, probs, cap))
        overflowed = not torch.equal(got, ids)
        assert copies["to_host"] - before["to_host"] == copies["to_device"] - before["to_device"] == int(overflowed)
    assert copies["to_host"] > 0
