"""The byte-level test tokenizer: id layout, exact UTF-8 round trips, files, Hugging Face loading."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from moemesh.errors import CheckpointError
from moemesh.model.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    TOKENIZER_VOCAB_SIZE,
    build_byte_tokenizer,
    load_tokenizer,
    save_tokenizer,
)

TEXTS = [
    "hello world",
    "  leading spaces, trailing tab\t\n",
    "héllo wörld — ñandú, Ελληνικά, русский",
    "日本語のテキスト 中文 한국어",
    "emoji 🙂👍🏽 and ZWJ 👩‍👩‍👧 family",
    "\x00 control \x7f chars \r\n",
    "",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return build_byte_tokenizer()


def test_id_layout(tok: Tokenizer) -> None:
    assert tok.get_vocab_size() == TOKENIZER_VOCAB_SIZE == 259
    assert (tok.token_to_id("<s>"), tok.token_to_id("</s>"), tok.token_to_id("<pad>")) == (BOS_ID, EOS_ID, PAD_ID)
    assert (BOS_ID, EOS_ID, PAD_ID) == (0, 1, 2)
    assert tok.encode("A").ids == [3 + ord("A")]
    assert tok.encode("\x00").ids == [3]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_one_token_per_byte(tok: Tokenizer, text: str) -> None:
    enc = tok.encode(text)
    assert enc.ids == [3 + b for b in text.encode("utf-8")]
    assert tok.decode(enc.ids) == text


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_any_text_round_trips(text: str) -> None:
    tok = build_byte_tokenizer()
    ids = tok.encode(text).ids
    assert all(0 <= i < TOKENIZER_VOCAB_SIZE for i in ids)
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_no_special_tokens_added_and_specials_decode(tok: Tokenizer) -> None:
    assert BOS_ID not in tok.encode("hi").ids and EOS_ID not in tok.encode("hi").ids
    ids = [BOS_ID, *tok.encode("ok").ids, EOS_ID, PAD_ID]
    assert tok.decode(ids) == "ok"
    assert tok.decode(ids, skip_special_tokens=False) == "<s>ok</s><pad>"


def test_save_and_load(tmp_path) -> None:
    path = save_tokenizer(tmp_path)
    assert path == tmp_path / "tokenizer.json"
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<s>" and config["eos_token"] == "</s>"
    for loaded in (load_tokenizer(tmp_path), Tokenizer.from_file(str(path))):
        for text in TEXTS:
            assert loaded.decode(loaded.encode(text).ids) == text


def test_load_missing_raises(tmp_path) -> None:
    with pytest.raises(CheckpointError, match=r"no tokenizer\.json"):
        load_tokenizer(tmp_path)


def test_load_corrupt_raises(tmp_path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid"):
        load_tokenizer(tmp_path)


def test_transformers_fast_tokenizer(tmp_path, tok: Tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    path = save_tokenizer(tmp_path)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    for hf in (fast, auto):
        for text in TEXTS:
            ids = hf.encode(text, add_special_tokens=False)
            assert ids == tok.encode(text).ids
            assert hf.decode(ids) == text
