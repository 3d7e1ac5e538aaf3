"""Per-request sampling: greedy, temperature, top-k, top-p, seeded.

Shape legend: R rows this step, S of them sampled (not greedy), V vocab.
Greedy rows are decided together with one argmax. A sampled row draws one uniform number per
step from its request's own CPU torch.Generator (so a seeded request gives the same tokens
whatever else shares its batch), and the token is found by inverting the row's cumulative
distribution on the logits' device. The draw depends only on (seed, position, probabilities):
the same on CPU and GPU, up to the rounding of the probabilities themselves; a CPU generator
never meets CUDA probabilities (torch.multinomial would refuse the mix).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moemesh.errors import InvalidRequestError


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off
    seed: int | None = None  # None = nondeterministic
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, max_new_tokens_limit: int) -> None:
        if self.max_new_tokens <= 0:
            raise InvalidRequestError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.max_new_tokens > max_new_tokens_limit:
            raise InvalidRequestError(
                f"max_new_tokens={self.max_new_tokens} is over this server's limit of {max_new_tokens_limit}"
            )
        if not (self.temperature >= 0.0 and self.temperature <= 100.0):
            raise InvalidRequestError(f"temperature must be in [0, 100], got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidRequestError(f"seed must be in [0, 2^63), got {self.seed}")


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """A CPU generator whatever the logits' device: it only draws each step's uniform number."""
    if params.greedy:
        return None
    gen = torch.Generator()
    if params.seed is None:
        gen.seed()
    else:
        gen.manual_seed(params.seed)
    return gen


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """logits: (R, V) on any device -> one token id per row (one host sync for the step)."""
    greedy = torch.argmax(logits, dim=-1)  # (R,) greedy for every row first
    rows = [row for row, p in enumerate(params) if not p.greedy]
    if not rows:
        return greedy.tolist()
    probs = torch.stack([_filtered_probs(logits[row], params[row]) for row in rows])  # (S, V)
    u = torch.cat([torch.rand(1, generator=_cpu(generators[row]), dtype=torch.float64) for row in rows])  # (S,)
    both = torch.cat([greedy, invert_cdf(probs, u)]).tolist()  # (R + S,) one device -> host copy
    tokens = both[: len(params)]
    for row, token in zip(rows, both[len(params) :]):
        tokens[row] = token
    return tokens


def invert_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs: (S, V) on any device, rows summing to about 1; u: (S,) float64 uniform [0, 1) on the
    CPU -> (S,) int64 token ids on probs' device: the first token whose cumulative probability
    passes u x total. The draw depends only on u and probs (not on where they live), and a token
    of probability 0 is never picked (u x total < total, and it adds nothing to the sum)."""
    cdf = probs.to(torch.float64).cumsum(dim=-1)  # (S, V)
    target = u.to(probs.device) * cdf[:, -1]  # (S,) the step's one host -> device copy
    picked = torch.searchsorted(cdf, target.unsqueeze(1), right=True).squeeze(1)  # (S,)
    return picked.clamp_(max=probs.shape[1] - 1)


def _cpu(gen: torch.Generator | None) -> torch.Generator:
    assert gen is not None and gen.device.type == "cpu", "a sampled row needs its request's CPU generator"
    return gen


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
