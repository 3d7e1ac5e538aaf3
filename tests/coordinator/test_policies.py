"""The rebalancer turns load reports into placements: gating every 100 routed tokens; none never."""

from __future__ import annotations

import torch

from coordinator.policies import Rebalancer, RebalanceSettings, resolve_policy
from moemesh.mesh.placement import initial_placement


def test_gating_publishes_new_factors_every_100_tokens_and_keeps_the_placement():
    current = initial_placement(4, [0, 1], world_size=2)
    reb = Rebalancer(RebalanceSettings(policy="gating"), (0, 1), 4)
    skewed = torch.tensor([[150, 20, 20, 10], [50, 50, 50, 50]])  # (L, E) one report of 100 tokens x top-2
    assert reb.observe(60, skewed, current) is None  # 60 tokens: not yet a cycle
    proposal = reb.observe(60, skewed, current)
    assert proposal is not None and proposal.origin == "gating"
    assert proposal.layers == current.layers  # only the gating factors change
    assert proposal.gating[0][0] < proposal.gating[0][1]  # the hot expert is damped
    assert proposal.gating[1] == (1.0, 1.0, 1.0, 1.0)  # the balanced layer is left alone


def test_gating_rule_paper_publishes_the_literal_rules_factors():
    from coordinator.gating import GatingSettings, gating_update, paper_literal_update

    current = initial_placement(4, [0, 1], world_size=2)
    skewed = torch.tensor([[150, 20, 20, 10], [50, 50, 50, 50]])  # (L, E)
    for rule, update in (("paper", paper_literal_update), ("ours", gating_update)):
        reb = Rebalancer(RebalanceSettings(policy="gating", gating=GatingSettings(rule=rule)), (0, 1), 4)
        proposal = reb.observe(100, skewed, current)
        assert proposal is not None
        expected = update(torch.ones(2, 4), skewed)  # (L, E) one cycle from factors of 1
        assert torch.allclose(torch.tensor([proposal.gating[0], proposal.gating[1]]), expected)
    assert not torch.allclose(paper_literal_update(torch.ones(2, 4), skewed), gating_update(torch.ones(2, 4), skewed))


def test_an_unknown_gating_rule_is_a_config_error():
    import pytest

    from coordinator.gating import GatingSettings
    from moemesh.errors import ConfigError

    with pytest.raises(ConfigError, match="--gating-rule"):
        GatingSettings(rule="literal")


def test_policy_none_never_moves_anything():
    current = initial_placement(4, [0], world_size=2)
    reb = Rebalancer(RebalanceSettings(policy="none"), (0,), 4)
    assert all(reb.observe(1000, torch.tensor([[900, 1, 1, 1]]), current) is None for _ in range(5))


def test_replicate_moves_spare_replicas_to_the_hot_experts():
    from coordinator.policies import ModelFacts

    current = initial_placement(4, [0], world_size=6)  # spare ranks 4, 5 replicate experts 0, 1
    assert current.layers[0] == ((0, 4), (1, 5), (2,), (3,))
    reb = Rebalancer(RebalanceSettings(policy="replicate"), (0,), 4, ModelFacts(2, 64, 64, 4))
    hot_2_and_3 = torch.tensor([[10, 10, 90, 90]])  # (L, E): experts 2 and 3 carry the load
    proposal = reb.observe(100, hot_2_and_3, current)
    assert proposal is not None and proposal.origin == "replicate"
    assert [len(ranks) for ranks in proposal.layers[0]] == [1, 1, 2, 2]
    assert proposal.gating == current.gating


def test_replicate_leaves_a_balanced_placement_alone():
    from coordinator.policies import ModelFacts

    current = initial_placement(4, [0], world_size=4)
    reb = Rebalancer(RebalanceSettings(policy="replicate"), (0,), 4, ModelFacts(2, 64, 64, 4))
    assert reb.observe(100, torch.tensor([[50, 50, 50, 50]]), current) is None


def test_auto_policy_replicates_only_where_spare_workers_exist():
    assert resolve_policy("auto", workers=10, num_experts=8) == "replicate"
    assert resolve_policy("auto", workers=8, num_experts=8) == "none"
    assert resolve_policy("gating", workers=10, num_experts=8) == "gating"
