"""moemesh.engine.sampling against the reference: transformers' logits processors
(TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, applied in generate()'s order) on
the same logits give the distribution moemesh's sampler must draw from.

The sampler exposes no distribution, only draws (`sample`, the public seam), so the comparison is
of distributions estimated from many seeded draws: tokens the reference filters out are never
drawn (exact), and every token's frequency is within 5 standard errors of its reference
probability (N draws: se <= 0.5 / sqrt(N)). Seeded, so the outcome is fixed, not a chance."""

from __future__ import annotations

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from moemesh.engine.sampling import SamplingParams, sample

# (V,) = 6: distinct gaps, so no top-k or top-p boundary falls on a tie
LOGITS = torch.tensor([2.0, 1.1, 0.3, -0.4, 1.6, -1.5])
N = 8000


def reference_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """(V,) transformers' softmax of the warped logits."""
    scores = logits[None].clone()  # (1, V)
    ids = torch.zeros((1, 1), dtype=torch.long)
    scores = TemperatureLogitsWarper(p.temperature)(ids, scores)
    if p.top_k > 0:
        scores = TopKLogitsWarper(p.top_k)(ids, scores)
    if p.top_p < 1.0:
        scores = TopPLogitsWarper(p.top_p)(ids, scores)
    return torch.softmax(scores[0], dim=-1)  # (V,)


def drawn_frequencies(logits: torch.Tensor, p: SamplingParams, n: int = N) -> torch.Tensor:
    """(V,) frequencies of n tokens drawn by `sample`: one seed, n rows at positions 0..n-1."""
    tokens = sample(logits.expand(n, -1).contiguous(), [p] * n, list(range(n)))  # (n, V) -> n ids
    return torch.bincount(torch.tensor(tokens), minlength=logits.shape[0]).double() / n


CASES = {
    "temperature 1": SamplingParams(temperature=1.0, seed=1),
    "temperature 0.5": SamplingParams(temperature=0.5, seed=2),
    "temperature 2": SamplingParams(temperature=2.0, seed=3),
    "top-k 3": SamplingParams(temperature=1.0, top_k=3, seed=4),
    "top-p 0.8": SamplingParams(temperature=1.0, top_p=0.8, seed=5),
    "temperature 0.7, top-k 4, top-p 0.9": SamplingParams(temperature=0.7, top_k=4, top_p=0.9, seed=6),
}


@pytest.mark.parametrize("name", CASES)
def test_sampled_distribution_matches_transformers_warpers(name):
    p = CASES[name]
    want = reference_probs(LOGITS, p).double()
    got = drawn_frequencies(LOGITS, p)
    assert torch.equal(got > 0, want > 0), (got, want)  # the same tokens survive filtering
    tolerance = 5 * 0.5 / N**0.5  # 5 standard errors at worst (p = 1/2)
    assert torch.allclose(got, want, atol=tolerance), (got, want)


def test_the_reference_filters_as_documented():
    """The cases above really filter: top-k 3 keeps the 3 largest logits, top-p 0.8 keeps the head
    whose mass first reaches 0.8 (softmax of LOGITS: 0.42, 0.17, 0.08, 0.04, 0.28, 0.01 -> tokens
    0, 4, 1 hold 0.87)."""
    assert (reference_probs(LOGITS, CASES["top-k 3"]) > 0).nonzero().flatten().tolist() == [0, 1, 4]
    assert (reference_probs(LOGITS, CASES["top-p 0.8"]) > 0).nonzero().flatten().tolist() == [0, 1, 4]


def test_same_seed_same_draws_other_seed_other_draws():
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    draws = lambda q: sample(LOGITS.expand(64, -1).contiguous(), [q] * 64, list(range(64)))
    assert draws(p) == draws(p)
    assert draws(p) != draws(SamplingParams(temperature=1.0, top_p=0.95, seed=4321))


def test_seeded_row_ignores_its_batch_neighbours():
    """A seeded request draws the same tokens alone or next to other sampled rows."""
    seeded = SamplingParams(temperature=1.0, seed=7)
    other = SamplingParams(temperature=1.5, seed=99)
    alone = [sample(LOGITS[None], [seeded], [pos])[0] for pos in range(20)]
    shared = [sample(torch.stack([LOGITS, LOGITS.flip(0)]), [seeded, other], [pos, 40 - pos])[0] for pos in range(20)]
    assert alone == shared


def test_greedy_is_the_argmax():
    assert sample(torch.stack([LOGITS, -LOGITS]), [SamplingParams()] * 2, [0, 0]) == [0, 5]
