"""Per-request sampling: greedy, temperature, top-k, top-p, seeded.

Shape legend: R rows being sampled this step, V vocab.
Greedy rows are decided together with one argmax; sampled rows each use their request's own
torch.Generator so a seeded request gives the same tokens whatever else shares its batch.
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
    """logits: (R, V) fp32 -> one token id per row."""
    tokens = torch.argmax(logits, dim=-1).tolist()  # (R,) greedy for every row first
    for row, (p, gen) in enumerate(zip(params, generators)):
        if not p.greedy:
            tokens[row] = _sample_row(logits[row], p, gen)
    return tokens


def _sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    """logits: (V,) -> token id, after temperature, top-k then top-p filtering."""
    scores = logits / p.temperature  # (V,)
    if 0 < p.top_k < scores.shape[0]:
        kth = torch.topk(scores, p.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)  # (V,)
        cum = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)  # (V,)
        drop = cum - torch.softmax(sorted_scores, dim=-1) >= p.top_p  # keep the head reaching top_p
        scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = torch.softmax(scores, dim=-1)  # (V,)
    return int(torch.multinomial(probs, 1, generator=gen).item())
