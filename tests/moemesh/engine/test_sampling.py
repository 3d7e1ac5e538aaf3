"""Sampling: seeded draws that depend only on (seed, position, probabilities), on any device;
validation that refuses what cannot be computed; a broken row fails alone."""

from __future__ import annotations

import math

import pytest
import torch

from moemesh.engine.sampling import RowFailure, SamplingParams, invert_cdf, sample, uniform
from moemesh.errors import InvalidRequestError
from moemesh.mesh.loopback import HostSyncCounter

HOT = SamplingParams(temperature=1.0, seed=1234)


def draws(logits: torch.Tensor, params: SamplingParams, steps: int, start: int = 0) -> list[int]:
    """The tokens of one row drawn at positions start, start + 1, ... from the same logits."""
    return [sample(logits.unsqueeze(0), [params], [pos])[0] for pos in range(start, start + steps)]  # type: ignore[misc]


def test_same_seed_same_tokens_other_seed_other_tokens():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    assert draws(logits, HOT, 20) == draws(logits, HOT, 20)
    assert draws(logits, HOT, 20) != draws(logits, SamplingParams(temperature=1.0, seed=99), 20)


def test_the_draw_is_the_uniform_number_of_seed_and_position_inverted_through_the_cdf():
    """What makes CPU and GPU agree, and a resubmitted request continue: the token at position n
    of a seeded request is the first whose cumulative probability passes uniform(seed, n) x total."""
    logits = torch.randn(30, generator=torch.Generator().manual_seed(1))
    probs = torch.softmax(logits.double(), dim=-1)
    cdf = probs.cumsum(0)
    want = [int((cdf <= uniform(1234, n) * cdf[-1]).sum()) for n in range(7, 17)]
    assert draws(logits, HOT, 10, start=7) == want


def test_the_uniform_numbers_are_a_pure_function_of_seed_and_position_and_uniform():
    assert uniform(5, 9) == uniform(5, 9)
    assert len({uniform(5, n) for n in range(1000)}) == 1000
    assert uniform(5, 9) != uniform(6, 9)
    u = torch.tensor([uniform(seed, 3) for seed in range(10000)], dtype=torch.float64)  # (N,) seeds at one position
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    counts = torch.histc(u, bins=10, min=0.0, max=1.0)
    chi2 = float(((counts - 1000) ** 2 / 1000).sum())
    assert chi2 < 27.9, counts  # 99.9th percentile of chi2 with 9 dof
    assert uniform(2**64 - 1, 10**9) < 1.0


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
    together = [sample(logits, params, [pos, pos + 3, pos + 10]) for pos in range(5)]
    assert [t[0] for t in together] == [int(logits[0].argmax())] * 5  # greedy row
    assert [t[1] for t in together] == draws(logits[1], HOT, 5, start=3)
    assert [t[2] for t in together] == draws(logits[2], params[2], 5, start=10)
    assert all(t[2] in set(torch.topk(logits[2], 5).indices.tolist()) for t in together)


def test_a_step_reads_back_once():
    logits = torch.randn(4, 40, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(), HOT, SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=7), SamplingParams()]
    with HostSyncCounter() as syncs:
        sample(logits, params, [1, 2, 3, 4])
    assert syncs.calls == ["tolist"]


# ---- one broken row fails alone ----------------------------------------------------------------
LOGITS = torch.randn(4, 40, generator=torch.Generator().manual_seed(4))
PARAMS = [SamplingParams(), HOT, SamplingParams(temperature=0.7, top_k=5, seed=7),
          SamplingParams(temperature=2.0, seed=8)]
POSITIONS = [5, 6, 7, 8]


def alone(row: int) -> int:
    token = sample(LOGITS[row : row + 1], [PARAMS[row]], [POSITIONS[row]])[0]
    assert isinstance(token, int)
    return token


@pytest.mark.parametrize("row", [0, 1])
def test_a_row_with_nan_logits_fails_alone_greedy_or_sampled(row):
    logits = LOGITS.clone()
    logits[row, 3] = float("nan")
    out = sample(logits, PARAMS, POSITIONS)
    assert isinstance(out[row], RowFailure) and "not finite" in out[row].message
    assert [out[r] for r in range(4) if r != row] == [alone(r) for r in range(4) if r != row]


def test_an_all_greedy_batch_takes_one_argmax_and_still_fails_a_broken_row_alone():
    greedy = [SamplingParams()] * 4
    assert sample(LOGITS, greedy, POSITIONS) == LOGITS.argmax(dim=-1).tolist()
    logits = LOGITS.clone()
    logits[2, 0] = float("inf")
    out = sample(logits, greedy, POSITIONS)
    assert isinstance(out[2], RowFailure) and "not finite" in out[2].message
    assert [out[0], out[1], out[3]] == [int(LOGITS[r].argmax()) for r in (0, 1, 3)]


def test_a_temperature_that_overflows_fails_its_row_alone():
    """What `--temperature 1e-40` did to a whole mesh: logits / 1e-40 is inf, softmax NaN.
    (Constructed directly: validation refuses it at every front door.)"""
    params = [*PARAMS[:2], SamplingParams(temperature=1e-40, seed=1), PARAMS[3]]
    out = sample(LOGITS, params, POSITIONS)
    assert isinstance(out[2], RowFailure) and "temperature=1e-40" in out[2].message
    assert [out[0], out[1], out[3]] == [alone(0), alone(1), alone(3)]


def test_an_exception_in_one_rows_filtering_fails_that_row_alone():
    broken = SamplingParams(temperature=1.0, top_k="five", seed=1)
    out = sample(LOGITS, [*PARAMS[:3], broken], POSITIONS)
    assert isinstance(out[3], RowFailure) and "TypeError" in out[3].message
    assert out[:3] == [alone(0), alone(1), alone(2)]


# ---- validation: every field, the accepted range in the message --------------------------------
@pytest.mark.parametrize("fields, message", [
    ({"max_new_tokens": 0}, r"max_new_tokens must be > 0"),
    ({"max_new_tokens": 2.5}, r"max_new_tokens must be an integer"),
    ({"max_new_tokens": 101}, r"max_new_tokens=101 is over this server's limit of 100"),
    ({"temperature": -0.5}, r"temperature must be 0 \(greedy\) or in \[0.01, 100\], got -0.5"),
    ({"temperature": 1e-40}, r"temperature must be 0 \(greedy\) or in \[0.01, 100\], got 1e-40"),
    ({"temperature": 0.005}, r"temperature must be 0 \(greedy\) or in \[0.01, 100\]"),
    ({"temperature": 100.5}, r"temperature must be 0 \(greedy\) or in \[0.01, 100\]"),
    ({"temperature": math.nan}, r"temperature .* got nan"),
    ({"temperature": math.inf}, r"temperature .* got inf"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": -0.1}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"top_p": math.nan}, r"top_p must be in \(0, 1\] \(1 = off\), got nan"),
    ({"top_k": -1}, r"top_k must be an integer >= 0"),
    ({"top_k": 2.5}, r"top_k must be an integer"),
    ({"seed": -1}, r"seed must be in \[0, 2\^64\)"),
    ({"seed": 2**64}, r"seed must be in \[0, 2\^64\)"),
    ({"stop_token_ids": (3, 1.5)}, r"stop_token_ids must be an integer"),
    ({"ignore_eos": 1}, r"ignore_eos must be a bool"),
])
def test_validation_refuses_each_bad_field_naming_it_and_its_range(fields, message):
    params = SamplingParams(**{"temperature": 1.0, "max_new_tokens": 4, **fields})
    with pytest.raises(InvalidRequestError, match=message):
        params.validate(100)


def test_validation_accepts_the_edges():
    for fields in ({"temperature": 0.0}, {"temperature": 0.01}, {"temperature": 100.0}, {"top_p": 1.0},
                   {"top_p": 1e-6}, {"top_k": 0}, {"seed": 0}, {"seed": 2**64 - 1}, {"max_new_tokens": 100}):
        SamplingParams(**{"temperature": 1.0, **fields}).validate(100)
    SamplingParams(max_new_tokens=10**6).validate()  # no server limit known (a client)
