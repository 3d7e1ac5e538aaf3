"""What one engine step runs: the sequences' state, prompt chunks, micro-batches, and the rows of
the step's tokens projected to logits (sampled rows, and the prompt rows of requests that asked for
their log-probabilities). Pure bookkeeping over tensors the engine hands in; no model calls.

Shape legend: T tokens in the step, R rows sampled, L rows projected (R, plus prompt-scoring rows),
P prompt chunks, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moemesh.engine.logprobs import TokenLogprob, token_logprobs
from moemesh.engine.sampling import RowFailure, SamplingParams
from moemesh.model.layers import AttentionPlan, Segment


@dataclass
class SequenceState:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    output: list[int] = field(default_factory=list)
    slot: int = -1  # -1 = not admitted yet
    cached: int = 0  # tokens whose K/V are in the cache
    prompt_scores: list[TokenLogprob] = field(default_factory=list)  # prompt log-probabilities so far (chunks)

    @property
    def position(self) -> int:
        """The absolute position of the next token to draw (its seeded draw depends on it)."""
        return len(self.prompt) + len(self.output)


@dataclass(frozen=True)
class Chunk:
    """Prompt tokens [start, start + length) of one sequence, prefilled in one step (the whole
    prompt without chunked prefill)."""

    seq: SequenceState
    start: int
    length: int

    @property
    def last(self) -> bool:
        """This chunk ends the prompt: its last row's logits draw the sequence's first new token."""
        return self.start + self.length == len(self.seq.prompt)


@dataclass(frozen=True)
class MicroBatch:
    """Part of a step's sequences, run as one unit through the model."""

    token_ids: torch.Tensor  # (T,) int64
    plan: AttentionPlan
    logit_rows: torch.Tensor  # (L,) int64: the rows of T projected to logits
    seqs: tuple[SequenceState, ...]  # (R,) the sequence of each sampled row
    sample_at: tuple[int, ...] = ()  # (R,) each sequence's row in this micro-batch's logits; () = 0..R-1
    chunks: tuple[Chunk, ...] = ()  # (P,) the prompt chunks prefilled here
    prompt_at: tuple[int, ...] = ()  # (P,) where the rows scoring each chunk's prompt tokens start; -1 none

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])


@dataclass(frozen=True)
class StepBatch:
    """What one step runs on this rank; empty (T = 0) when the rank only joins its peers.
    Always `micro_batches` micro-batches, some possibly empty: every rank runs the same number."""

    micro: tuple[MicroBatch, ...]

    @property
    def num_tokens(self) -> int:
        return sum(m.num_tokens for m in self.micro)

    @property
    def tokens_per_micro(self) -> tuple[int, ...]:
        return tuple(m.num_tokens for m in self.micro)

    @property
    def seqs(self) -> tuple[SequenceState, ...]:
        return tuple(s for m in self.micro for s in m.seqs)


def logit_rows(decoding: int, chunks: list[Chunk], segments: list[Segment]
                ) -> tuple[list[int], tuple[int, ...], tuple[int, ...]]:
    """The rows of a micro-batch's T to project -> (rows (L,), sample_at (R,), prompt_at (P,)).
    Decoding rows and the last rows of prompts' last chunks are sampled; a chunk of a prompt that
    asked for its log-probabilities projects every row (row j predicts prompt token j + 1).
    sample_at and prompt_at are () when the rows are exactly the sampled ones, in order (then no
    chunk scores its prompt); otherwise prompt_at is explicit and sample_at may be empty."""
    rows, sample_at, prompt_at = list(range(decoding)), list(range(decoding)), []
    for c, seg in zip(chunks, segments):
        if c.seq.params.prompt_logprobs:
            prompt_at.append(len(rows))
            rows.extend(range(seg.offset, seg.offset + seg.length))
        else:
            prompt_at.append(-1)
            if c.last:
                rows.append(seg.offset + seg.length - 1)
        if c.last:
            sample_at.append(len(rows) - 1)
    if len(rows) == len(sample_at):
        return rows, (), ()
    return rows, tuple(sample_at), tuple(prompt_at)


def step_rows(batch: StepBatch) -> tuple[list[int] | None, list[int]]:
    """Across micro-batches: each sampled sequence's row, and where each chunk's prompt-scoring
    rows start (-1: none), in the step's concatenated logits (L, V); (None, []) when every
    projected row is a sampled one."""
    if all(not m.sample_at and not m.prompt_at for m in batch.micro):
        return None, []
    sample_at: list[int] = []
    prompt_at: list[int] = []
    base = 0
    for m in batch.micro:
        if m.sample_at or m.prompt_at:  # explicit rows (sample_at may be empty: no chunk ends here)
            sample_at += [base + i for i in m.sample_at]
            prompt_at += [base + i if i >= 0 else -1 for i in m.prompt_at]
        else:
            sample_at += [base + i for i in range(len(m.seqs))]
            prompt_at += [-1] * len(m.chunks)
        base += int(m.logit_rows.shape[0])
    return sample_at, prompt_at


def score_prompts(logits: torch.Tensor, chunks: list[Chunk], prompt_at: list[int]) -> None:
    """logits: (L, V) -> each chunk that asked adds its prompt tokens' log-probabilities to its
    sequence (rows start..start+n-1 predict prompt tokens start+1..; the prompt's last row predicts
    the first new token, scored with it)."""
    for c, at in zip(chunks, prompt_at):
        if at < 0:
            continue
        n = min(c.length, len(c.seq.prompt) - 1 - c.start)  # (n,) rows whose next token is a prompt token
        targets = torch.tensor(c.seq.prompt[c.start + 1 : c.start + 1 + n])  # (n,)
        c.seq.prompt_scores.extend(token_logprobs(logits[at : at + n], targets, c.seq.params.top_logprobs))


def score_new_tokens(logits: torch.Tensor, seqs: tuple[SequenceState, ...], drawn: list, sample_at: list[int] | None
           ) -> dict[int, TokenLogprob]:
    """logits: (L, V) -> id(sequence) -> its new token's log-probability, for the sequences that
    asked (the rest pay nothing)."""
    out: dict[int, TokenLogprob] = {}
    for i, (seq, token) in enumerate(zip(seqs, drawn)):
        if isinstance(token, RowFailure) or seq.params.logprobs is None:
            continue
        row = i if sample_at is None else sample_at[i]
        out[id(seq)] = token_logprobs(logits[row : row + 1], torch.tensor([token]), seq.params.top_logprobs)[0]
    return out


def split(
    decode: list[SequenceState], chunks: list[Chunk], parts: int
) -> list[tuple[list[SequenceState], list[Chunk]]]:
    """Sequences -> `parts` groups of about equal tokens (decode split evenly, each prompt chunk
    to the lightest group). Always exactly `parts` groups, some possibly empty."""
    groups: list[tuple[list[SequenceState], list[Chunk]]] = [([], []) for _ in range(parts)]
    for i, seq in enumerate(decode):
        groups[i * parts // max(len(decode), 1)][0].append(seq)
    load = [len(d) for d, _ in groups]
    for c in chunks:
        lightest = load.index(min(load))
        groups[lightest][1].append(c)
        load[lightest] += c.length
    return groups
