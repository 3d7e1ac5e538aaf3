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
from dataclasses import dataclass, field, replace
from enum import StrEnum

import torch

from moemesh.engine.logprobs import TokenLogprob, token_logprobs
from moemesh.engine.sampling import RowFailure, SamplingParams, new_seed, sample
from moemesh.errors import CapacityError, InvalidRequestError
from moemesh.model.decoder import MoEModel
from moemesh.model.layers import AttentionPlan, Segment, build_attention_plan


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
    max_batched_tokens: int = 4096  # prompt tokens admitted per step (at least one prompt always)
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


@dataclass
class _Sequence:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    output: list[int] = field(default_factory=list)
    slot: int = -1  # -1 = not admitted yet
    cached: int = 0  # tokens whose K/V are in the cache

    @property
    def position(self) -> int:
        """The absolute position of the next token to draw (its seeded draw depends on it)."""
        return len(self.prompt) + len(self.output)


@dataclass(frozen=True)
class MicroBatch:
    """Part of a step's sequences, run as one unit through the model."""

    token_ids: torch.Tensor  # (T,) int64
    plan: AttentionPlan
    logit_rows: torch.Tensor  # (L,) int64: the rows of T projected to logits
    seqs: tuple[_Sequence, ...]  # (R,) the sequence of each sampled row
    sample_at: tuple[int, ...] = ()  # (R,) each sequence's row in this micro-batch's logits; () = 0..R-1
    prompt_at: tuple[int, ...] = ()  # (R,) where the rows scoring its prompt start in the logits; -1 none

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
    def seqs(self) -> tuple[_Sequence, ...]:
        return tuple(s for m in self.micro for s in m.seqs)


class Engine:
    def __init__(self, model: MoEModel, settings: EngineSettings = EngineSettings()):
        self.model = model
        self.settings = settings
        self.max_len = model.max_len
        self._free_slots = list(range(model.runtime.max_seqs - 1, -1, -1))
        self._waiting: deque[_Sequence] = deque()
        self._running: dict[str, _Sequence] = {}

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
        self._waiting.append(_Sequence(request_id, list(prompt), params, frozenset(stop)))

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
        prefill = [s for s in running if not s.output] + self._admit()
        groups = _split(decode, prefill, self.settings.micro_batches)
        return StepBatch(micro=tuple(self._micro_batch(d, p) for d, p in groups))

    def _micro_batch(self, decode: list[_Sequence], prefill: list[_Sequence]) -> MicroBatch:
        tokens = [s.output[-1] for s in decode]
        segments, offset = [], len(decode)
        for seq in prefill:
            segments.append(Segment(slot=seq.slot, offset=offset, length=len(seq.prompt), start_pos=0))
            tokens.extend(seq.prompt)
            offset += len(seq.prompt)
        plan = build_attention_plan(
            decode_slots=[s.slot for s in decode],
            decode_positions=[s.cached for s in decode],
            segments=segments,
            sliding_window=self.model.cfg.sliding_window,
            device=self.model.runtime.device,
        )
        rows, sample_at, prompt_at = _logit_rows(len(decode), prefill, segments)
        device = self.model.runtime.device
        return MicroBatch(
            token_ids=torch.tensor(tokens, dtype=torch.int64, device=device),
            plan=plan,
            logit_rows=torch.tensor(rows, dtype=torch.int64, device=device),
            seqs=tuple(decode + prefill),
            sample_at=sample_at,
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
        seqs = batch.seqs
        if not seqs:
            return []
        sample_at, prompt_at = _step_rows(batch)
        rows = logits if sample_at is None else logits[torch.tensor(sample_at, device=logits.device)]  # (R, V)
        drawn = sample(rows, [s.params for s in seqs], [s.position for s in seqs])
        scored = _score(logits, seqs, drawn, sample_at, prompt_at)
        events = []
        for seq, token in zip(seqs, drawn):
            if isinstance(token, RowFailure):  # this request alone ends; the step goes on
                events.append(TokenEvent(seq.request_id, None, FinishReason.ERROR, token.message))
                self._retire(seq)
                continue
            seq.cached = seq.position
            seq.output.append(token)
            finish = self._finish_reason(seq, token)
            logprob, prompt = scored.get(id(seq), (None, ()))
            events.append(TokenEvent(seq.request_id, token, finish, logprob=logprob, prompt_logprobs=prompt))
            if finish is not None:
                self._retire(seq)
        return events

    def _admit(self) -> list[_Sequence]:
        admitted: list[_Sequence] = []
        budget = self.settings.max_batched_tokens
        while self._waiting and self._free_slots:
            seq = self._waiting[0]
            if admitted and len(seq.prompt) > budget:
                break
            self._waiting.popleft()
            seq.slot = self._free_slots.pop()
            self._running[seq.request_id] = seq
            admitted.append(seq)
            budget -= len(seq.prompt)
        return admitted

    def _finish_reason(self, seq: _Sequence, token: int) -> FinishReason | None:
        if token in seq.stop_ids:
            return FinishReason.STOP
        if len(seq.output) >= seq.params.max_new_tokens:
            return FinishReason.LENGTH
        return None

    def _retire(self, seq: _Sequence) -> None:
        if seq.request_id in self._running:
            self._release(self._running.pop(seq.request_id))

    def _release(self, seq: _Sequence) -> None:
        self._free_slots.append(seq.slot)
        seq.slot = -1


def _logit_rows(decoding: int, prefill: list[_Sequence], segments: list[Segment]
                ) -> tuple[list[int], tuple[int, ...], tuple[int, ...]]:
    """The rows of a micro-batch's T to project -> (rows (L,), sample_at (R,), prompt_at (R,)).
    Decoding rows and prompts' last rows are sampled; a prompt that asked for its log-probabilities
    projects every row (row j predicts prompt token j + 1). sample_at is () when L = R."""
    rows, sample_at, prompt_at = list(range(decoding)), list(range(decoding)), [-1] * decoding
    for seq, seg in zip(prefill, segments):
        if seq.params.prompt_logprobs:
            prompt_at.append(len(rows))
            rows.extend(range(seg.offset, seg.offset + seg.length))
        else:
            prompt_at.append(-1)
            rows.append(seg.offset + seg.length - 1)
        sample_at.append(len(rows) - 1)
    if len(rows) == len(sample_at):
        return rows, (), ()
    return rows, tuple(sample_at), tuple(prompt_at)


def _step_rows(batch: StepBatch) -> tuple[list[int] | None, list[int]]:
    """Across micro-batches: each sequence's sampled row and prompt-rows start in the step's
    concatenated logits (L, V); (None, []) when every projected row is a sampled one."""
    if all(not m.sample_at for m in batch.micro):
        return None, []
    sample_at: list[int] = []
    prompt_at: list[int] = []
    base = 0
    for m in batch.micro:
        if m.sample_at:
            sample_at += [base + i for i in m.sample_at]
            prompt_at += [base + i if i >= 0 else -1 for i in m.prompt_at]
        else:
            sample_at += [base + i for i in range(len(m.seqs))]
            prompt_at += [-1] * len(m.seqs)
        base += int(m.logit_rows.shape[0])
    return sample_at, prompt_at


def _score(logits: torch.Tensor, seqs: tuple[_Sequence, ...], drawn: list, sample_at: list[int] | None,
           prompt_at: list[int]) -> dict[int, tuple[TokenLogprob | None, tuple[TokenLogprob, ...]]]:
    """logits: (L, V) -> id(sequence) -> (its new token's log-probability, its prompt's), for the
    sequences that asked (the rest pay nothing)."""
    out: dict[int, tuple[TokenLogprob | None, tuple[TokenLogprob, ...]]] = {}
    for i, (seq, token) in enumerate(zip(seqs, drawn)):
        if isinstance(token, RowFailure) or (seq.params.logprobs is None and not seq.params.prompt_logprobs):
            continue
        row = i if sample_at is None else sample_at[i]
        new = None
        if seq.params.logprobs is not None:
            new = token_logprobs(logits[row : row + 1], torch.tensor([token]), seq.params.top_logprobs)[0]
        prompt: tuple[TokenLogprob, ...] = ()
        if prompt_at and prompt_at[i] >= 0:
            start, n = prompt_at[i], len(seq.prompt) - 1
            prompt = tuple(token_logprobs(logits[start : start + n], torch.tensor(seq.prompt[1:]),  # (n, V)
                                          seq.params.top_logprobs))
        out[id(seq)] = (new, prompt)
    return out


def _split(
    decode: list[_Sequence], prefill: list[_Sequence], parts: int
) -> list[tuple[list[_Sequence], list[_Sequence]]]:
    """Sequences -> `parts` groups of about equal tokens (decode split evenly, each prompt to
    the lightest group). Always exactly `parts` groups, some possibly empty."""
    groups: list[tuple[list[_Sequence], list[_Sequence]]] = [([], []) for _ in range(parts)]
    for i, seq in enumerate(decode):
        groups[i * parts // max(len(decode), 1)][0].append(seq)
    load = [len(d) for d, _ in groups]
    for seq in prefill:
        lightest = load.index(min(load))
        groups[lightest][1].append(seq)
        load[lightest] += len(seq.prompt)
    return groups


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
