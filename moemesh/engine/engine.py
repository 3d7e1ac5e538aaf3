"""The engine: continuous batching of requests over one MoEModel.

Requests join and leave between steps. A step is `schedule()` (decide which tokens run: one
decode token for every running sequence, whole prompts for newly admitted ones) then
`execute()` (forward, sample, retire finished sequences). A mesh worker calls the two halves
separately so that it can agree with its peers between them; `step()` does both.

Fault isolation: whatever goes wrong for ONE request after the forward pass (non-finite logits or
probabilities, an exception in its sampling) ends that request alone with a
`TokenEvent(finish=ERROR, error=...)` and frees its KV slot; every other row of the step gets its
token. Bad inputs never get that far: `validate_request` refuses them at every front door.

Log-probabilities: a request with `logprobs` gets each new token's (TokenEvent.logprob); one with
`prompt_logprobs` also gets its prompt's (TokenEvent.prompt_logprobs, on its first event), for which
its prefill projects every prompt row through the lm head, not only the last.

Shape legend: T tokens in the step, B decoding sequences, R rows sampled, L rows projected
(R, plus the prompt rows of requests that asked for prompt log-probabilities), V vocab.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace
from enum import StrEnum

import torch

from moemesh.engine.batch import (
    Chunk,
    MicroBatch,
    SequenceState,
    StepBatch,
    logit_rows,
    score_new_tokens,
    score_prompts,
    split,
    step_rows,
)
from moemesh.engine.logprobs import TokenLogprob
from moemesh.engine.sampling import RowFailure, SamplingParams, new_seed, sample
from moemesh.errors import CapacityError, InvalidRequestError
from moemesh.model.decoder import MoEModel
from moemesh.model.layers import Segment, build_attention_plan


def validate_request(
    prompt: list[int], params: SamplingParams, vocab_size: int, max_len: int, max_new_tokens_limit: int
) -> None:
    """The checks every front door runs (engine, worker, gateway): InvalidRequestError if bad."""
    if not prompt:
        raise InvalidRequestError("prompt is empty: give at least one token")
    params.validate(max_new_tokens_limit)
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(f"token id {bad[0]} out of range 0..{vocab_size - 1}")
    bad_stop = [t for t in params.stop_token_ids if not 0 <= t < vocab_size]
    if bad_stop:
        raise InvalidRequestError(f"stop token id {bad_stop[0]} in stop_token_ids is out of range 0..{vocab_size - 1}")
    if len(prompt) + params.max_new_tokens > max_len:
        raise InvalidRequestError(
            f"prompt of {len(prompt)} tokens + max_new_tokens={params.max_new_tokens} exceeds the "
            f"context of {max_len} tokens"
        )


@dataclass(frozen=True)
class EngineSettings:
    # Without chunked prefill: prompt tokens admitted per step (at least one whole prompt always).
    # With it: every token of a step, one per decoding sequence first, then prefill chunks.
    max_batched_tokens: int = 4096
    chunked_prefill: bool = False
    max_new_tokens_limit: int = 4096
    max_waiting: int = 1024  # queued requests beyond the running ones; more is CapacityError
    micro_batches: int = 1  # >1: split each step so exchanges overlap compute (mesh only)


class FinishReason(StrEnum):
    LENGTH = "length"
    STOP = "stop"
    CANCELLED = "cancelled"
    ERROR = "error"  # this request alone failed (see TokenEvent.error); the engine goes on


@dataclass(frozen=True)
class TokenEvent:
    """One new token of a request; `finish` is set on its last event."""

    request_id: str
    token_id: int | None  # None only for a cancelled or failed request's closing event
    finish: FinishReason | None = None
    error: str = ""  # why, when finish is ERROR
    logprob: TokenLogprob | None = None  # the token's, when the request asked for logprobs
    prompt_logprobs: tuple[TokenLogprob, ...] = ()  # prompt tokens 1.., on the first event when asked


class Engine:
    def __init__(self, model: MoEModel, settings: EngineSettings = EngineSettings()):
        self.model = model
        self.settings = settings
        self.max_len = model.max_len
        self._free_slots = list(range(model.runtime.max_seqs - 1, -1, -1))
        self._waiting: deque[SequenceState] = deque()
        self._running: dict[str, SequenceState] = {}

    # ---- requests ----------------------------------------------------------------------------
    def validate(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequestError if this request can never run here."""
        validate_request(prompt, params, self.model.cfg.vocab_size, self.max_len,
                         self.settings.max_new_tokens_limit)

    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        self.validate(prompt, params)
        if request_id in self._running or any(s.request_id == request_id for s in self._waiting):
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if len(self._waiting) >= self.settings.max_waiting:
            raise CapacityError(f"{len(self._waiting)} requests already waiting; try again later")
        stop = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop.update(self.model.cfg.eos_token_ids)
        if params.seed is None and not params.greedy:  # seeded once: draws follow (seed, position)
            params = replace(params, seed=new_seed())
        self._waiting.append(SequenceState(request_id, list(prompt), params, frozenset(stop)))

    def cancel(self, request_id: str) -> bool:
        """Drop a request; its slot is free before the next step. False if unknown/finished."""
        for seq in self._waiting:
            if seq.request_id == request_id:
                self._waiting.remove(seq)
                return True
        if request_id in self._running:
            self._release(self._running.pop(request_id))
            return True
        return False

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    def request_ids(self) -> list[str]:
        return list(self._running) + [s.request_id for s in self._waiting]

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def free_slots(self) -> int:
        return len(self._free_slots)

    def outstanding_tokens(self) -> int:
        """Tokens still to produce for every request here (the gateway balances on this)."""
        seqs = list(self._running.values()) + list(self._waiting)
        return sum(s.params.max_new_tokens - len(s.output) for s in seqs)

    # ---- steps -------------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        return self.execute(self.schedule())

    def schedule(self) -> StepBatch:
        """Pick this step's tokens: every running sequence decodes; waiting ones are admitted. A
        running sequence with no output yet is prefilled (again: a step whose forward pass broke
        off, on a mesh that lost a peer, committed nothing and is simply run again)."""
        running = list(self._running.values())
        decode = [s for s in running if s.output]
        prefilling = [s for s in running if not s.output]
        if self.settings.chunked_prefill:
            chunks = self._chunks(prefilling, self.settings.max_batched_tokens - len(decode))
        else:
            chunks = [Chunk(s, 0, len(s.prompt)) for s in prefilling + self._admit()]
        groups = split(decode, chunks, self.settings.micro_batches)
        return StepBatch(micro=tuple(self._micro_batch(d, c) for d, c in groups))

    def _chunks(self, prefilling: list[SequenceState], budget: int) -> list[Chunk]:
        """Chunked prefill: the step's tokens left after the decodes (`budget`) go to the prompts
        being prefilled, oldest first, each from its first token not cached, then to new ones."""
        chunks = []
        for seq in prefilling:
            if budget <= 0:
                break
            n = min(len(seq.prompt) - seq.cached, budget)
            chunks.append(Chunk(seq, seq.cached, n))
            budget -= n
        while budget > 0 and self._waiting and self._free_slots:
            seq = self._take_waiting()
            n = min(len(seq.prompt), budget)
            chunks.append(Chunk(seq, 0, n))
            budget -= n
        return chunks

    def _micro_batch(self, decode: list[SequenceState], chunks: list[Chunk]) -> MicroBatch:
        tokens = [s.output[-1] for s in decode]
        segments, offset = [], len(decode)
        for c in chunks:
            segments.append(Segment(slot=c.seq.slot, offset=offset, length=c.length, start_pos=c.start))
            tokens.extend(c.seq.prompt[c.start : c.start + c.length])
            offset += c.length
        plan = build_attention_plan(
            decode_slots=[s.slot for s in decode],
            decode_positions=[s.cached for s in decode],
            segments=segments,
            sliding_window=self.model.cfg.sliding_window,
            device=self.model.runtime.device,
        )
        rows, sample_at, prompt_at = logit_rows(len(decode), chunks, segments)
        device = self.model.runtime.device
        return MicroBatch(
            token_ids=torch.tensor(tokens, dtype=torch.int64, device=device),
            plan=plan,
            logit_rows=torch.tensor(rows, dtype=torch.int64, device=device),
            seqs=tuple(decode + [c.seq for c in chunks if c.last]),
            sample_at=sample_at,
            chunks=tuple(chunks),
            prompt_at=prompt_at,
        )

    def execute(self, batch: StepBatch, max_tokens: tuple[int, ...] | None = None) -> list[TokenEvent]:
        """Run the step's forward pass, sample, and retire finished sequences. `max_tokens`: (M,)
        on a mesh, the most tokens any rank runs in each micro-batch (the step header's; it sizes
        the exchanges); None in a single process."""
        if len(batch.micro) == 1:
            m = batch.micro[0]
            t_max = max_tokens[0] if max_tokens is not None else None
            logits = self.model.forward(m.token_ids, m.plan, m.logit_rows, t_max)  # (L, V)
        else:
            parts = self.model.forward_overlapped([(m.token_ids, m.plan, m.logit_rows) for m in batch.micro],
                                                  max_tokens)
            logits = torch.cat(parts)  # (L, V) in micro-batch order
        sample_at, prompt_at = step_rows(batch)
        chunks = [c for m in batch.micro for c in m.chunks]
        score_prompts(logits, chunks, prompt_at)
        for c in chunks:  # committed: the next chunk starts after it (a last chunk's sequence is set below)
            c.seq.cached = c.start + c.length
        seqs = batch.seqs
        if not seqs:
            return []
        rows = logits if sample_at is None else logits[torch.tensor(sample_at, device=logits.device)]  # (R, V)
        drawn = sample(rows, [s.params for s in seqs], [s.position for s in seqs])
        scored = score_new_tokens(logits, seqs, drawn, sample_at)
        events = []
        for seq, token in zip(seqs, drawn):
            if isinstance(token, RowFailure):  # this request alone ends; the step goes on
                events.append(TokenEvent(seq.request_id, None, FinishReason.ERROR, token.message))
                self._retire(seq)
                continue
            seq.cached = seq.position
            seq.output.append(token)
            finish = self._finish_reason(seq, token)
            prompt = tuple(seq.prompt_scores) if len(seq.output) == 1 else ()  # on the first event
            events.append(TokenEvent(seq.request_id, token, finish, logprob=scored.get(id(seq)),
                                     prompt_logprobs=prompt))
            if finish is not None:
                self._retire(seq)
        return events

    def _admit(self) -> list[SequenceState]:
        """Whole prompts: admit waiting requests while slots and the prompt-token budget last."""
        admitted: list[SequenceState] = []
        budget = self.settings.max_batched_tokens
        while self._waiting and self._free_slots:
            if admitted and len(self._waiting[0].prompt) > budget:
                break
            seq = self._take_waiting()
            admitted.append(seq)
            budget -= len(seq.prompt)
        return admitted

    def _take_waiting(self) -> SequenceState:
        seq = self._waiting.popleft()
        seq.slot = self._free_slots.pop()
        seq.cached = 0
        seq.prompt_scores = []
        self._running[seq.request_id] = seq
        return seq

    def _finish_reason(self, seq: SequenceState, token: int) -> FinishReason | None:
        if token in seq.stop_ids:
            return FinishReason.STOP
        if len(seq.output) >= seq.params.max_new_tokens:
            return FinishReason.LENGTH
        return None

    def _retire(self, seq: SequenceState) -> None:
        if seq.request_id in self._running:
            self._release(self._running.pop(seq.request_id))

    def _release(self, seq: SequenceState) -> None:
        self._free_slots.append(seq.slot)
        seq.slot = -1


def generate(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """Run prompts to completion together; returns each one's new tokens (a convenience for tests/CLI)."""
    ids = [f"req-{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, prompt, params)
    out: dict[str, list[int]] = {rid: [] for rid in ids}
    while engine.has_work:
        for ev in engine.step():
            if ev.token_id is not None and ev.request_id in out:
                out[ev.request_id].append(ev.token_id)
    return [out[rid] for rid in ids]
