"""Log-probabilities of chosen tokens and their most likely alternatives, from raw logits.

Shape legend: N rows scored, V vocab, K alternatives per row.

The distribution is the model's own (log-softmax of the raw logits, before temperature, top-k or
top-p), as OpenAI's API and vLLM report it: a score of the model, not of the sampler. Scoring a
text (`moemesh eval`) reads the prompt tokens' log-probabilities and each position's most likely
token (K >= 1) from here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_TOP_LOGPROBS = 20  # the most alternatives a request may ask for per token (OpenAI's chat limit)


@dataclass(frozen=True)
class TokenLogprob:
    """One position: the token there, its log-probability, and the `top` most likely tokens at
    that position (token id, log-probability), most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, top: int) -> list[TokenLogprob]:
    """logits: (N, V) raw; targets: (N,) int64 the token at each position; top: K >= 0 -> one
    TokenLogprob per row (one device -> host copy)."""
    if logits.shape[0] == 0:
        return []
    lp = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    chosen = lp.gather(1, targets.to(lp.device).unsqueeze(1)).squeeze(1)  # (N,)
    tokens = targets.tolist()
    if top == 0:
        return [TokenLogprob(t, v) for t, v in zip(tokens, chosen.tolist())]
    values, ids = lp.topk(min(top, lp.shape[1]), dim=-1)  # (N, K) (N, K)
    return [TokenLogprob(t, c, tuple(zip(i, v)))
            for t, c, i, v in zip(tokens, chosen.tolist(), ids.tolist(), values.tolist())]
