"""`moemesh eval`: how well the served model predicts a text, measured through the serving path.

The text is cut into consecutive windows that fit the model's context (`split_text`); each window
is one request with `prompt_logprobs` (and one alternative, the model's top guess at every
position), so the mesh computes every figure itself: whatever placement, balancing policy or
overflow mode it runs is what gets measured. Per window the tokenizer's BOS (when it adds one)
gives the first token its context; every text token is scored. Figures:

- bits per byte: the scored tokens' negative log-likelihood, in bits, over the text's UTF-8 bytes;
- token accuracy: how often the model's most likely token is the text's next token;
- the unigram baseline: the entropy of the text's own byte frequencies, what a model that ignores
  context could reach at best on this text.

The same windows run in this process (`score_local`, the engine without a mesh) or through a
gateway (`score_remote`); both return the per-token log-probabilities, so they can be compared
token by token.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from moemesh.engine.logprobs import TokenLogprob
from moemesh.engine.sampling import SamplingParams
from moemesh.errors import ConfigError, UnavailableError

LN2 = math.log(2.0)
# One token generated per window (a request must make one); its alternatives: the top guess only.
SCORING = SamplingParams(max_new_tokens=1, logprobs=1, prompt_logprobs=True, ignore_eos=True)


@dataclass(frozen=True)
class TextScore:
    """A text's score; `per_window` keeps every scored token (compare two runs token by token)."""

    text_bytes: int
    per_window: tuple[tuple[TokenLogprob, ...], ...]
    seconds: float = 0.0

    @property
    def tokens(self) -> int:
        return sum(len(w) for w in self.per_window)

    @property
    def nats(self) -> float:
        return -sum(lp.logprob for w in self.per_window for lp in w)

    @property
    def bits_per_byte(self) -> float:
        return self.nats / LN2 / self.text_bytes

    @property
    def token_accuracy(self) -> float:
        hits = sum(1 for w in self.per_window for lp in w if lp.top and lp.top[0][0] == lp.token)
        return hits / max(1, self.tokens)


def split_text(text: str, max_bytes: int) -> list[str]:
    """Consecutive windows of at most `max_bytes` UTF-8 bytes, cut at character boundaries, that
    concatenate to `text`. Pure."""
    if max_bytes < 4:
        raise ConfigError(f"a window must hold at least 4 bytes (one UTF-8 character), got {max_bytes}")
    windows, start, used = [], 0, 0
    for i, ch in enumerate(text):
        size = len(ch.encode("utf-8"))
        if used + size > max_bytes:
            windows.append(text[start:i])
            start, used = i, 0
        used += size
    if start < len(text):
        windows.append(text[start:])
    return windows


def window_bytes(max_context: int, window: int | None) -> int:
    """Bytes per window: --window, or as many as fit the context with BOS and the one generated token
    (a tokenizer never makes more tokens than bytes, specials aside)."""
    most = max_context - 2
    if window is None:
        return most
    if not 4 <= window <= most:
        raise ConfigError(f"--window must be in [4, {most}] bytes for a context of {max_context}, got {window}")
    return window


def unigram_bits_per_byte(data: bytes) -> float:
    """The entropy of `data`'s own byte frequencies, bits per byte: the best any context-free model
    of these bytes can do (fitted to the text itself, so a strict baseline)."""
    counts = Counter(data)
    return -sum(n / len(data) * math.log2(n / len(data)) for n in counts.values())


def score_local(model_dir: Path, text: str, window: int | None = None, batch: int = 8,
                progress: Callable[[int, int], None] | None = None) -> TextScore:
    """Score `text` with the engine in this process (no mesh): the reference a mesh must match."""
    from moemesh.engine.engine import Engine
    from moemesh.model.config import load_config
    from moemesh.model.decoder import RuntimeShape, build_model
    from moemesh.text import TextCodec

    cfg = load_config(model_dir)
    max_len = min(cfg.max_position_embeddings, 4096)
    engine = Engine(build_model(model_dir, RuntimeShape(max_seqs=batch, max_model_len=max_len)))
    return score_engine(engine, TextCodec(model_dir, cfg).encode, text, window, progress)


def score_engine(engine, encode: Callable[[str], list[int]], text: str, window: int | None = None,
                 progress: Callable[[int, int], None] | None = None) -> TextScore:
    """Score `text` on an idle moemesh.engine.engine.Engine (its model as it is: a benchmark may set
    gating factors on its router first); `encode`: the model's text -> ids (BOS included)."""
    windows = split_text(text, window_bytes(engine.max_len, window))
    start, scored = time.monotonic(), {}  # window -> its prompt's scores
    for i, piece in enumerate(windows):
        engine.add_request(str(i), encode(piece), SCORING)
    while engine.has_work:
        for ev in engine.step():  # one event per window: SCORING makes one token
            if ev.token_id is None:
                raise UnavailableError(f"window {ev.request_id} failed: {ev.error}")
            scored[ev.request_id] = ev.prompt_logprobs
            if progress is not None:
                progress(len(scored), len(windows))
    per_window = tuple(tuple(scored[str(i)]) for i in range(len(windows)))
    return TextScore(len(text.encode("utf-8")), per_window, time.monotonic() - start)


async def score_remote(client, text: str, max_context: int, window: int | None = None, concurrency: int = 8,
                       timeout_s: float = 120.0, progress: Callable[[int, int], None] | None = None) -> TextScore:
    """Score `text` through a gateway (`client`: an entered moemesh.client.Client), `concurrency`
    windows in flight."""
    from moemesh.client import GenerationError, TokenChunk

    windows = split_text(text, window_bytes(max_context, window))
    scored: list[tuple[TokenLogprob, ...] | None] = [None] * len(windows)
    todo: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(windows)):
        todo.put_nowait(i)
    start, done = time.monotonic(), 0

    async def one(i: int) -> tuple[TokenLogprob, ...]:
        async for event in client.generate(windows[i], params=SCORING, include_text=False, timeout=timeout_s):
            if isinstance(event, TokenChunk) and event.offset == 0:
                return event.prompt_logprobs
            if not isinstance(event, TokenChunk) and event.reason == "error":
                raise GenerationError(f"window {i}: {event.error}")
        raise UnavailableError(f"window {i} ended without its first chunk")

    async def lane() -> None:
        nonlocal done
        while not todo.empty():
            i = todo.get_nowait()
            scored[i] = await one(i)
            done += 1
            if progress is not None:
                progress(done, len(windows))

    await asyncio.gather(*(lane() for _ in range(max(1, concurrency))))
    per_window = tuple(tuple(w or ()) for w in scored)
    return TextScore(len(text.encode("utf-8")), per_window, time.monotonic() - start)


def largest_difference(a: TextScore, b: TextScore) -> tuple[bool, float]:
    """(same tokens at every position, the largest |logprob difference|) between two scores of one text."""
    same = [[lp.token for lp in w] for w in a.per_window] == [[lp.token for lp in w] for w in b.per_window]
    pairs: Sequence[tuple[TokenLogprob, TokenLogprob]] = [
        (x, y) for wa, wb in zip(a.per_window, b.per_window) for x, y in zip(wa, wb)]
    return same, max((abs(x.logprob - y.logprob) for x, y in pairs), default=0.0)
