"""moemesh.planner.traffic: synthetic routing, measured counts, trace files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moemesh.errors import ConfigError, InvalidRequestError
from moemesh.planner.traffic import (
    Skew,
    dump_trace,
    from_counts,
    independent_coactivation,
    load_trace,
    parse_skew,
    parse_trace,
    save_trace,
    shifted,
    synthetic,
)


def test_synthetic_counts_are_consistent():
    t = synthetic(16, (3, 5), sources=4, top_k=2, skew=1.2, tokens_per_source=100, seed=1)
    assert t.tokens.shape == (2, 4, 16) and t.coactivation.shape == (2, 16, 16) and t.layer_ids == (3, 5)
    # every source routes its 100 tokens to K experts; sources are uniform
    np.testing.assert_allclose(t.tokens.sum(axis=2), 200.0)
    np.testing.assert_allclose(t.tokens_per_layer, 400.0)
    # co-activation: symmetric, zero diagonal, each copy of e has K - 1 partners
    np.testing.assert_allclose(t.coactivation, t.coactivation.transpose(0, 2, 1))
    assert np.all(np.diagonal(t.coactivation, axis1=1, axis2=2) == 0)
    np.testing.assert_allclose(t.coactivation.sum(axis=2), t.expert_tokens * (2 - 1))


def test_synthetic_is_seeded_and_skew_concentrates_load():
    a = synthetic(32, 2, 8, skew=1.2, seed=3)
    np.testing.assert_array_equal(a.tokens, synthetic(32, 2, 8, skew=1.2, seed=3).tokens)
    assert not np.array_equal(a.tokens, synthetic(32, 2, 8, skew=1.2, seed=4).tokens)
    share = [synthetic(32, 4, 8, skew=s, seed=0).expert_tokens.max(axis=1).mean() for s in (0.0, 0.8, 1.6)]
    assert share[0] < share[1] < share[2]
    # a token never picks one expert twice: no expert gets more copies than tokens
    hot = synthetic(8, 2, 2, top_k=4, skew=3.0, seed=0)
    assert (hot.expert_tokens <= hot.tokens_per_layer[:, None] + 1e-9).all()


def test_affinity_groups_make_cluster_mates_co_fire():
    plain = synthetic(16, 1, 4, skew=0.0, seed=0)
    grouped = synthetic(16, 1, 4, skew=Skew(0.0, groups=2, affinity=50.0), seed=0)

    def top_pair_share(t):  # share of co-activation held by each expert's 7 strongest partners
        c = np.sort(t.coactivation[0], axis=1)[:, ::-1]
        return c[:, :7].sum() / c.sum()

    assert top_pair_share(grouped) > 0.9 > top_pair_share(plain)


@pytest.mark.parametrize("spec, skew", [("zipf:1.2", Skew(1.2)), ("uniform", Skew(0.0)),
                                        ("zipf:0.8,groups:4,affinity:3", Skew(0.8, 4, 3.0))])
def test_parse_skew(spec, skew):
    assert parse_skew(spec) == skew


@pytest.mark.parametrize("spec", ["zipf", "zipf:x", "pareto:1", "groups:2", "zipf:1,groups:1.5", "zipf:1,affinity:0.5"])
def test_bad_skew(spec):
    with pytest.raises(InvalidRequestError, match="skew"):
        parse_skew(spec)


def test_from_counts_spreads_a_load_window_over_sources():
    counts = torch.tensor([[6, 0, 2], [1, 1, 6]], dtype=torch.int64)  # the coordinator's [moe_layers, experts]
    t = from_counts(counts, top_k=2, sources=2, layer_ids=(1, 3))
    assert t.tokens.shape == (2, 2, 3) and t.layer_ids == (1, 3)
    np.testing.assert_allclose(t.tokens[0], [[3, 0, 1], [3, 0, 1]])
    # independent co-activation adds up to the (K-1) N pairs of the N / K tokens
    np.testing.assert_allclose(t.coactivation.sum(axis=(1, 2)), [8.0, 8.0])
    per_source = from_counts(np.arange(12).reshape(2, 2, 3), top_k=1)  # [S, L, E]
    np.testing.assert_allclose(per_source.tokens[0, 1], [6, 7, 8])  # layer 0, source 1
    with pytest.raises(InvalidRequestError, match="need sources"):
        from_counts(counts, top_k=2)
    with pytest.raises(InvalidRequestError, match="non-negative"):
        from_counts(-counts, top_k=2, sources=1)


def test_independent_coactivation_matches_sampling_roughly():
    t = synthetic(8, 1, 1, top_k=2, skew=0.5, seed=0, sample_tokens=20000)
    model = independent_coactivation(t.expert_tokens, 2)
    assert np.abs(model - t.coactivation).sum() / t.coactivation.sum() < 0.1


def test_trace_round_trip(tmp_path):
    t = synthetic(6, (0, 2), 3, top_k=2, skew=1.0, seed=2, tokens_per_source=10)
    back = load_trace(save_trace(t, tmp_path / "trace.json"))
    assert back.layer_ids == (0, 2) and back.top_k == 2
    np.testing.assert_allclose(back.tokens, t.tokens, atol=1e-3)
    np.testing.assert_allclose(back.coactivation, t.coactivation, atol=1e-3)
    totals = parse_trace(dump_trace(t, per_source=False))
    np.testing.assert_allclose(totals.tokens, t.tokens, atol=1e-3)  # sources were uniform anyway


def _trace(**layer):
    doc = {"format": "moemesh-trace", "version": 1, "top_k": 2, "num_experts": 3, "sources": 2,
           "layers": [{"layer": 0, **layer}]}
    return json.dumps(doc)


@pytest.mark.parametrize("text, message", [
    ("{", "not valid JSON"),
    (json.dumps({"format": "other"}), "format must be 'moemesh-trace'"),
    (_trace(tokens=[[1, 2, 3]]), "layers[0].tokens has shape [1, 3], expected [2, 3]"),
    (_trace(expert_tokens=[1, 2, -3]), "layers[0].expert_tokens must be finite and non-negative"),
    (_trace(tokens=[[1, 2, 3], [1, 2, 3]], expert_tokens=[1, 2, 3]), "exactly one of tokens"),
    (_trace(expert_tokens=[1, 2, 3], coactivation=[[2, 1, 1.0]]), "layers[0].coactivation[0] must be [e, f, tokens]"),
    (_trace(expert_tokens=[1, 2, 3]).replace('"top_k": 2', '"top_k": 0'), "top_k must be a positive integer"),
])
def test_bad_traces_name_the_field(text, message):
    with pytest.raises(InvalidRequestError) as err:
        parse_trace(text, source="r.json")
    assert message in str(err.value)


def test_shift_moves_popularity_but_keeps_totals():
    t = synthetic(16, 2, 4, skew=1.2, seed=0)
    s = shifted(t, 0.5, seed=1)
    np.testing.assert_allclose(np.sort(s.expert_tokens, axis=1), np.sort(t.expert_tokens, axis=1))
    assert not np.allclose(s.expert_tokens, t.expert_tokens)
    np.testing.assert_allclose(s.coactivation.sum(), t.coactivation.sum())


def test_group_limited_synthetic_traffic_stays_inside_the_kept_groups():
    """One group of 4 kept per token (4 groups): no token pairs experts of two groups, so the
    co-activation between groups is 0; every token still has K copies."""
    t = synthetic(16, 2, 2, top_k=3, skew=0.0, tokens_per_source=10, group_limit=(4, 1))
    group = np.arange(16) // 4
    across = group[:, None] != group[None, :]
    assert (t.coactivation[:, across] == 0).all() and t.coactivation.sum() > 0
    assert t.tokens.sum() == pytest.approx(2 * 2 * 10 * 3)
    with pytest.raises(ConfigError):
        synthetic(16, 1, 2, top_k=5, group_limit=(4, 1))  # 5 experts from one group of 4
