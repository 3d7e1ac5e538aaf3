"""Text <-> token ids for serving: prompt encoding and streaming detokenization.

Wraps a checkpoint's tokenizer.json (the `tokenizers` library). Streaming decodes the whole
output so far and emits only the new suffix, holding back an incomplete UTF-8 sequence so a
multi-byte character split across tokens is never sent as garbage.
"""

from __future__ import annotations

from pathlib import Path

from moemesh.model.config import ModelConfig
from moemesh.model.tokenizer import load_tokenizer

_REPLACEMENT = "\ufffd"


class TextCodec:
    def __init__(self, model_dir: str | Path, cfg: ModelConfig):
        self.tokenizer = load_tokenizer(model_dir)
        self.bos = cfg.bos_token_id

    def encode(self, text: str) -> list[int]:
        """Prompt text -> ids, with the model's BOS in front when it has one. Through encode_batch:
        the same ids as encode, but it lets go of the GIL while it works, so an event loop keeps
        running while another thread tokenizes a long prompt (encode holds the GIL throughout)."""
        ids = self.tokenizer.encode_batch([text], add_special_tokens=False)[0].ids
        return ([self.bos] if self.bos is not None and ids else []) + ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class StreamDecoder:
    """Feeds token ids one chunk at a time; returns the text they complete."""

    def __init__(self, codec: TextCodec):
        self.codec = codec
        self.ids: list[int] = []
        self.sent = 0  # characters already emitted

    def push(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        text = self.codec.decode(self.ids)
        if text.endswith(_REPLACEMENT):  # an unfinished multi-byte character: wait for more
            return ""
        delta, self.sent = text[self.sent :], len(text)
        return delta

    def flush(self) -> str:
        text = self.codec.decode(self.ids)
        delta, self.sent = text[self.sent :], len(text)
        return delta
