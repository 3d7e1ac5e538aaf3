"""Sampling: seeded draws that depend only on (seed, position, probabilities), on any device."""

from __future__ import annotations

import pytest
import torch

from moemesh.engine.sampling import SamplingParams, invert_cdf, make_generator, sample

HOT = SamplingParams(temperature=1.0, seed=1234)


def draws(logits: torch.Tensor, params: SamplingParams, steps: int) -> list[int]:
    gen = make_generator(params)
    return [sample(logits.unsqueeze(0), [params], [gen])[0] for _ in range(steps)]


def test_same_seed_same_tokens_other_seed_other_tokens():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    assert draws(logits, HOT, 20) == draws(logits, HOT, 20)
    assert draws(logits, HOT, 20) != draws(logits, SamplingParams(temperature=1.0, seed=99), 20)


def test_the_draw_is_the_seeds_uniform_number_inverted_through_the_cdf():
    """What makes CPU and GPU agree: token n of a seeded request is the first whose cumulative
    probability passes u_n x total, u_n the seed's n-th CPU uniform number."""
    logits = torch.randn(30, generator=torch.Generator().manual_seed(1))
    probs = torch.softmax(logits.double(), dim=-1)
    u = torch.rand(10, generator=torch.Generator().manual_seed(HOT.seed), dtype=torch.float64)
    cdf = probs.cumsum(0)
    want = [int((cdf <= x * cdf[-1]).sum()) for x in u]
    assert draws(logits, HOT, 10) == want


def test_tokens_follow_the_probabilities():
    """A chi-square goodness of fit, bound generous (99.9th percentile of chi2 with 3 dof is 16.3)."""
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 20000
    u = torch.rand(n, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    picked = invert_cdf(probs.expand(n, 4), u)
    counts = torch.bincount(picked, minlength=4).double()
    chi2 = float(((counts - n * probs) ** 2 / (n * probs)).sum())
    assert chi2 < 16.3, (counts, chi2)


def test_zero_probability_tokens_are_never_picked_even_at_the_edges():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]] * 3)  # (S, V): top-k filtered rows look like this
    u = torch.tensor([0.0, 0.5, 1.0 - 2**-53], dtype=torch.float64)
    assert invert_cdf(probs, u).tolist() == [1, 3, 3]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_the_tokens_do_not_depend_on_the_logits_dtype_or_layout(dtype):
    """On a GPU the logits live elsewhere and in other precisions; here: other dtypes, and a
    non-contiguous row, give the tokens of the fp32 logits (they are exact in bf16)."""
    logits = torch.tensor([1.0, 2.0, 0.5, 3.0, -1.0, 2.5])  # all exact in bf16
    want = draws(logits, HOT, 30)
    wide = torch.stack([logits.to(dtype), torch.zeros(6, dtype=dtype)], dim=1)[:, 0]  # (V,) strided
    assert not wide.is_contiguous()
    assert draws(wide, HOT, 30) == want


def test_sampled_rows_keep_their_own_streams_whatever_shares_the_batch():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(), HOT, SamplingParams(temperature=0.7, top_k=5, seed=7)]
    gens = [make_generator(p) for p in params]
    together = [sample(logits, params, gens) for _ in range(5)]
    assert [t[0] for t in together] == [int(logits[0].argmax())] * 5  # greedy row
    assert [t[1] for t in together] == draws(logits[1], HOT, 5)
    assert [t[2] for t in together] == draws(logits[2], params[2], 5)
    assert all(t[2] in set(torch.topk(logits[2], 5).indices.tolist()) for t in together)


def test_generators_are_on_the_cpu_whatever_the_model_device():
    assert make_generator(SamplingParams()) is None
    assert make_generator(HOT).device.type == "cpu"
