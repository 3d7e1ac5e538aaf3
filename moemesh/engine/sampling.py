"""Per-request sampling: greedy, temperature, top-k, top-p, seeded; a broken row fails alone.

Shape legend: R rows this step, S of them sampled (not greedy), V vocab.

Greedy rows are decided together with one argmax. A sampled row's token is found by inverting
its cumulative distribution (on the logits' device) at one uniform number u, and u is a pure
function of (the request's seed, the absolute position of the token being drawn) (`uniform`,
SplitMix64 on the host: no generator state, no device work). So:
- a seeded request gives the same tokens whatever else shares its batch, on CPU or GPU (up to
  the rounding of the probabilities themselves);
- a request resubmitted elsewhere with its prompt plus the tokens already made (as the prompt)
  and the same seed continues with exactly the draws it would have made;
- the engine gives an unseeded request a random seed once (`Engine.add_request`), and the same
  rule covers it.

Fault isolation: `sample` returns, per row, a token id or a `RowFailure` (non-finite logits,
non-finite probabilities after temperature / top-k / top-p, or an exception in the row's
filtering). The common case keeps the step's one device -> host copy: finiteness is checked on
the device for all rows at once and read back in the same copy as the tokens; only when the
batched path raises are rows re-sampled one by one to find the broken one.
"""

from __future__ import annotations

import logging
import math
import secrets
from dataclasses import dataclass
from typing import Any

import torch

from moemesh.engine.logprobs import MAX_TOP_LOGPROBS
from moemesh.errors import InvalidRequestError

MIN_TEMPERATURE = 1e-2  # below it (other than 0 = greedy), logits / temperature overflows float32
MAX_TEMPERATURE = 100.0
# The smallest temperature a float32 wire value can carry for 1e-2 (float32(0.01) < 0.01).
_MIN_TEMPERATURE_F32 = 0.009999999776482582
log = logging.getLogger(__name__)

SEED_LIMIT = 2**64  # seeds are uint64 on the wire


def new_seed() -> int:
    """A random seed for a sampled request that came without one (drawn once, so a request
    resubmitted elsewhere with it continues with the same draws)."""
    return secrets.randbelow(SEED_LIMIT)
_MASK64 = 2**64 - 1
_GOLDEN64 = 0x9E3779B97F4A7C15


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off
    seed: int | None = None  # None = the engine picks one when the request is added
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None = off; K = each new token's log-probability and K alternatives
    prompt_logprobs: bool = False  # also every prompt token's (from the second), with the same K

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, max_new_tokens_limit: int | None = None) -> None:
        """InvalidRequestError naming the field and its accepted range for any value sampling
        cannot compute; nothing is replaced. `max_new_tokens_limit`: the server's (None: unknown,
        as in a client). Stop ids against the vocabulary: `validate_request`."""
        _check_int("max_new_tokens", self.max_new_tokens)
        if self.max_new_tokens <= 0:
            raise InvalidRequestError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if max_new_tokens_limit is not None and self.max_new_tokens > max_new_tokens_limit:
            raise InvalidRequestError(
                f"max_new_tokens={self.max_new_tokens} is over this server's limit of {max_new_tokens_limit}"
            )
        _check_temperature(self.temperature)
        if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        _check_int("top_k", self.top_k)
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k}")
        if self.seed is not None:
            _check_int("seed", self.seed)
            if not 0 <= self.seed < SEED_LIMIT:
                raise InvalidRequestError(f"seed must be in [0, 2^64), got {self.seed}")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t)
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs)
            if not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
                raise InvalidRequestError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}] (alternatives per token), "
                                          f"got {self.logprobs}")
        if not isinstance(self.prompt_logprobs, bool):
            raise InvalidRequestError(f"prompt_logprobs must be a bool, got {self.prompt_logprobs!r}")

    @property
    def top_logprobs(self) -> int:
        """Alternatives per scored token (0 when only the tokens' own log-probabilities are asked)."""
        return self.logprobs or 0


def _is_real(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _check_int(name: str, x: Any) -> None:
    if not isinstance(x, int) or isinstance(x, bool):
        raise InvalidRequestError(f"{name} must be an integer, got {x!r}")


def _check_temperature(t: Any) -> None:
    if not _is_real(t) or not (t == 0.0 or _MIN_TEMPERATURE_F32 <= t <= MAX_TEMPERATURE):
        raise InvalidRequestError(
            f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE:g}], got {t!r}"
        )


@dataclass(frozen=True)
class RowFailure:
    """Why one row could not be sampled; its request ends with this message, the others go on."""

    message: str


Drawn = int | RowFailure


def uniform(seed: int, position: int) -> float:
    """A uniform number in [0, 1) (53 random bits), a pure function of (seed, position): output
    `position` of the SplitMix64 stream whose state starts at mix(seed)."""
    return (_mix64((_mix64(seed) + (position + 1) * _GOLDEN64) & _MASK64) >> 11) * 2.0**-53


def _mix64(z: int) -> int:
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def sample(logits: torch.Tensor, params: list[SamplingParams], positions: list[int]) -> list[Drawn]:
    """logits: (R, V) on any device; positions: (R,) the absolute position of each row's new
    token (prompt + output so far) -> per row a token id or a RowFailure (one host sync)."""
    try:
        return _sample_rows(logits, params, positions)
    except Exception:  # some row broke the batched path: find it, alone (a device fault breaks every row, loudly)
        log.exception("sampling a step of %d rows failed; sampling each row alone", len(params))
        return [_sample_alone(logits[row : row + 1], params[row], positions[row]) for row in range(len(params))]


def _sample_alone(logits: torch.Tensor, params: SamplingParams, position: int) -> Drawn:
    """logits: (1, V) -> one row's result; an exception fails only this row."""
    try:
        return _sample_rows(logits, [params], [position])[0]
    except Exception as exc:  # isolated to this request by design
        return RowFailure(f"sampling failed: {type(exc).__name__}: {exc}")


def _sample_rows(logits: torch.Tensor, params: list[SamplingParams], positions: list[int]) -> list[Drawn]:
    greedy = torch.argmax(logits, dim=-1)  # (R,) greedy for every row first
    finite = torch.isfinite(logits).all(dim=-1)  # (R,) checked on the device, read with the tokens
    if all(p.greedy for p in params):  # the common case: no per-row work at all
        n = len(params)
        both = torch.cat([greedy, finite.long()]).tolist()  # (2R,) the step's one device -> host copy
        if all(both[n:]):
            return both[:n]
        return [token if ok else RowFailure(_NOT_FINITE) for token, ok in zip(both[:n], both[n:])]
    rows = [row for row, p in enumerate(params) if not p.greedy]
    parts = [greedy, finite.long()]
    if rows:
        probs = torch.stack([_filtered_probs(logits[row], params[row]) for row in rows])  # (S, V)
        u = torch.tensor([uniform(_seed(params[row]), positions[row]) for row in rows], dtype=torch.float64)  # (S,)
        parts += [invert_cdf(probs, u), torch.isfinite(probs).all(dim=-1).long()]  # (S,) (S,)
    both = torch.cat(parts).tolist()  # (2R + 2S,) the step's one device -> host copy
    n, s = len(params), len(rows)
    logits_ok, sampled, probs_ok = both[n : 2 * n], dict(zip(rows, both[2 * n : 2 * n + s])), both[2 * n + s :]
    bad_probs = {row for row, ok in zip(rows, probs_ok) if not ok}
    out: list[Drawn] = []
    for row, p in enumerate(params):
        if not logits_ok[row]:
            out.append(RowFailure(_NOT_FINITE))
        elif row in bad_probs:
            out.append(RowFailure(f"sampling probabilities are not finite after temperature={p.temperature!r}, "
                                  f"top_k={p.top_k}, top_p={p.top_p!r}"))
        else:
            out.append(sampled.get(row, both[row]))
    return out


_NOT_FINITE = "the model's logits for this request are not finite (NaN or inf)"


def _seed(p: SamplingParams) -> int:
    assert p.seed is not None, "a sampled row needs a seed (Engine.add_request gives one)"
    return p.seed


def invert_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs: (S, V) on any device, rows summing to about 1; u: (S,) float64 uniform [0, 1) on the
    CPU -> (S,) int64 token ids on probs' device: the first token whose cumulative probability
    passes u x total. The draw depends only on u and probs (not on where they live), and a token
    of probability 0 is never picked (u x total < total, and it adds nothing to the sum)."""
    cdf = probs.to(torch.float64).cumsum(dim=-1)  # (S, V)
    target = u.to(probs.device) * cdf[:, -1]  # (S,) the step's one host -> device copy
    picked = torch.searchsorted(cdf, target.unsqueeze(1), right=True).squeeze(1)  # (S,)
    return picked.clamp_(max=probs.shape[1] - 1)


def _filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """logits: (V,) -> (V,) probabilities after temperature, top-k then top-p filtering."""
    scores = logits.float() / p.temperature  # (V,)
    if 0 < p.top_k < scores.shape[0]:
        kth = torch.topk(scores, p.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)  # (V,)
        cum = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)  # (V,)
        drop = cum - torch.softmax(sorted_scores, dim=-1) >= p.top_p  # keep the head reaching top_p
        scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))  # (V,)
    return torch.softmax(scores, dim=-1)  # (V,)
