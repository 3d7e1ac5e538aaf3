"""`moemesh eval`: bits per byte and token accuracy of a text, computed by a running mesh
(--target) or by the engine in this process (--local --model DIR). See moemesh/scoring.py."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from moemesh.errors import ConfigError
from moemesh.scoring import TextScore, score_local, score_remote, unigram_bits_per_byte
from moemesh.settings import add_options, option, parse_bool, settings_from
from moemesh.tls import ca_option, cert_option, key_option, tls_of


@dataclass(frozen=True)
class EvalSettings:
    """`moemesh eval --target HOST:PORT --text FILE` (or --local --model DIR). Flags only: a one-shot
    tool whose command line says what ran."""

    ENV_PREFIX: ClassVar[str | None] = None

    text: Path = option("--text", "the UTF-8 text to score", Path, metavar="FILE")
    target: str | None = option("--target", "a running gateway", default=None, metavar="HOST:PORT")
    local: bool = option("--local", "score with the engine in this process (needs --model)", parse_bool,
                         default=False)
    model: Path | None = option("--model", "checkpoint folder (for --local)", Path, default=None)
    window: int | None = option("--window", "bytes per request (default: as many as the context holds)", int,
                                default=None)
    concurrency: int = option("--concurrency", "windows in flight (--target) or batched (--local)", int, default=8)
    max_bytes: int | None = option("--max-bytes", "score only the text's first N bytes", int, default=None)
    timeout_s: float = option("--timeout", "deadline of each window's request in seconds (--target)", float,
                              default=120.0)
    json: bool = option("--json", "print one JSON object instead of the report", parse_bool, default=False)
    tls_cert: Path | None = cert_option(env="MOEMESH_TLS_CERT")
    tls_key: Path | None = key_option(env="MOEMESH_TLS_KEY")
    tls_ca: Path | None = ca_option(env="MOEMESH_TLS_CA")
    api_key: str | None = option("--api-key", "API key sent as 'authorization: Bearer <key>'", default=None,
                                 env="MOEMESH_API_KEY", metavar="KEY")

    def __post_init__(self) -> None:
        tls_of(self)
        if self.local == (self.target is not None):
            raise ConfigError("give one of --local (with --model DIR) or --target HOST:PORT")
        if self.local and self.model is None:
            raise ConfigError("--local needs --model DIR")
        if self.concurrency < 1 or (self.max_bytes is not None and self.max_bytes < 1):
            raise ConfigError("--concurrency and --max-bytes must be >= 1")


def add_eval_command(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    p = sub.add_parser("eval", help="bits per byte and token accuracy of a text, as the mesh (or this process) "
                                    "computes them")
    add_options(p, EvalSettings)

    def run(args: argparse.Namespace) -> int:
        return evaluate(settings_from(EvalSettings, args, {}))

    return run


def read_text(path: Path, max_bytes: int | None) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read --text {path}: {exc.strerror}") from None
    if max_bytes is not None:
        data = data[:max_bytes]
    text = data.decode("utf-8", errors="ignore")  # a cut in a character loses that character only
    if not text:
        raise ConfigError(f"--text {path} is empty")
    return text


def evaluate(s: EvalSettings) -> int:
    text = read_text(s.text, s.max_bytes)
    progress = _Progress(quiet=s.json)
    if s.local:
        assert s.model is not None, "EvalSettings requires --model with --local"
        score = score_local(s.model, text, s.window, s.concurrency, progress)
        where = f"the engine in this process ({s.model})"
    else:
        assert s.target is not None, "EvalSettings requires --target without --local"
        score = asyncio.run(_remote(s, text, progress))
        where = f"the mesh at {s.target}"
    progress.end()
    report = summary(score, text)
    if s.json:
        print(json.dumps(report))
    else:
        print(render(report, s.text, where))
    return 0


async def _remote(s: EvalSettings, text: str, progress: Callable[[int, int], None]) -> TextScore:
    from moemesh.client import Client

    async with Client(s.target or "", timeout=s.timeout_s, tls=tls_of(s), api_key=s.api_key) as client:
        await client.wait_until_serving(timeout=s.timeout_s)
        info = await client.model_info()
        return await score_remote(client, text, info.model.max_context, s.window, s.concurrency, s.timeout_s,
                                  progress)


def summary(score: TextScore, text: str) -> dict[str, float | int]:
    """The figures of one score, as `--json` prints them."""
    data = text.encode("utf-8")
    return {"bits_per_byte": score.bits_per_byte, "token_accuracy": score.token_accuracy,
            "unigram_bits_per_byte": unigram_bits_per_byte(data), "bytes": len(data), "tokens": score.tokens,
            "windows": len(score.per_window), "seconds": score.seconds}


def render(r: dict[str, float | int], path: Path, where: str) -> str:
    return "\n".join([
        f"{path}: {r['bytes']:,} bytes in {r['windows']} windows, scored by {where}",
        f"  bits per byte   {r['bits_per_byte']:.4f}   (the text's unigram entropy: {r['unigram_bits_per_byte']:.4f}; "
        f"the model needs {r['unigram_bits_per_byte'] - r['bits_per_byte']:.3f} bits/byte less)",
        f"  token accuracy  {100 * r['token_accuracy']:.2f}%   ({r['tokens']:,} tokens)",
        f"  took {r['seconds']:.1f} s ({r['bytes'] / max(r['seconds'], 1e-9):,.0f} bytes/s)",
    ])


class _Progress:
    """'windows i/n, ETA' on stderr at most twice a second (nothing with --json)."""

    def __init__(self, quiet: bool):
        self.quiet, self.start, self.last = quiet, time.monotonic(), 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self.quiet or (now - self.last < 0.5 and done < total):
            return
        self.last = now
        eta = (now - self.start) / done * (total - done)
        print(f"\r  windows {done}/{total}, ETA {eta:.0f} s   ", end="", file=sys.stderr, flush=True)

    def end(self) -> None:
        if not self.quiet:
            print(file=sys.stderr)

