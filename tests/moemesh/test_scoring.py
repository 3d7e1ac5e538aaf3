"""Scoring a text: the windows, the baseline, and the engine's figures against transformers'."""

from __future__ import annotations

import math

import pytest
import torch

from moemesh.errors import ConfigError
from moemesh.model.config import load_config
from moemesh.scoring import TextScore, split_text, unigram_bits_per_byte, window_bytes
from moemesh.text import TextCodec

TEXT = "Ay, marry, is't.\nBut to my mind, though I am native here\nAnd to the manner born — ‘tis a custom\n"


@pytest.mark.parametrize("size", [4, 5, 7, 16, 1000])
def test_windows_cover_the_text_at_character_boundaries(size):
    windows = split_text(TEXT, size)
    assert "".join(windows) == TEXT
    assert all(0 < len(w.encode()) <= size for w in windows)
    assert all(len(a.encode()) + len(b[0].encode()) > size for a, b in zip(windows, windows[1:]))  # each is full


def test_window_sizes_are_checked():
    assert window_bytes(512, None) == 510
    with pytest.raises(ConfigError, match=r"--window must be in \[4, 510\]"):
        window_bytes(512, 511)
    with pytest.raises(ConfigError, match="at least 4 bytes"):
        split_text(TEXT, 3)


def test_unigram_baseline_is_the_texts_own_byte_entropy():
    assert unigram_bits_per_byte(b"abab") == pytest.approx(1.0)
    assert unigram_bits_per_byte(b"aaaa") == 0.0
    assert unigram_bits_per_byte(bytes(range(256))) == pytest.approx(8.0)


def test_local_score_is_transformers_own_log_likelihood(tmp_path):
    """Every window's token log-probabilities, the bits per byte and the accuracy are what
    transformers computes for the same BOS-prefixed windows."""
    from transformers import AutoModelForCausalLM

    from moemesh.model.tiny import TinySpec, write_tiny_model
    from moemesh.scoring import score_local

    ckpt = write_tiny_model(tmp_path / "model", TinySpec(layers=2, experts=4, hidden=64, intermediate=96, heads=4,
                                                         kv_heads=2, vocab=300, max_position_embeddings=128))
    ref = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    score = score_local(ckpt, TEXT, window=40, batch=3)
    codec = TextCodec(ckpt, load_config(ckpt))
    windows = split_text(TEXT, 40)
    assert len(score.per_window) == len(windows)
    nats, hits, tokens = 0.0, 0, 0
    for piece, scored in zip(windows, score.per_window):
        ids = codec.encode(piece)  # BOS + bytes
        with torch.no_grad():
            lp = torch.log_softmax(ref(torch.tensor([ids])).logits[0].float(), dim=-1)  # (S, V)
        want = lp[:-1].gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)  # (S-1,)
        assert [s.token for s in scored] == ids[1:]
        assert [s.logprob for s in scored] == pytest.approx(want.tolist(), abs=1e-4)
        nats -= want.sum().item()
        hits += int((lp[:-1].argmax(-1) == torch.tensor(ids[1:])).sum())
        tokens += len(ids) - 1
    assert score.tokens == tokens == len(TEXT.encode())  # a byte tokenizer scores every byte
    assert score.bits_per_byte == pytest.approx(nats / math.log(2) / len(TEXT.encode()), rel=1e-5)
    assert score.token_accuracy == pytest.approx(hits / tokens)


def test_an_empty_score_has_no_accuracy_to_divide():
    assert TextScore(1, ()).token_accuracy == 0.0
