"""What the gateway knows about the model: tokenizer, limits, and request validation.

The gateway holds no weights: only config.json (vocabulary, context, shape for ModelInfo) and
tokenizer.json (prompt text -> ids, streamed ids -> text). Every request is checked here with the
engine's own `validate_request`, so a bad request fails with INVALID_ARGUMENT before it reaches a
worker. A prompt's size is checked before any work on it (text: `max_prompt_bytes` of UTF-8; ids:
the context), and `prepare_off_loop` tokenizes a text longer than INLINE_TOKENIZE_CHARS in a thread.
Sampling fields come from the wire as they were sent (`sampling_from_proto`: only an exact
0 means "unset"; NaN, inf and negative values reach validation and are refused, never replaced).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from pathlib import Path

from moemesh.engine.engine import validate_request
from moemesh.engine.sampling import SamplingParams, new_seed
from moemesh.engine.sampling_wire import sampling_from_proto
from moemesh.errors import InvalidRequestError
from moemesh.model.config import ModelConfig, load_config
from moemesh.model.spec import model_spec
from moemesh.text import StreamDecoder, TextCodec
from moemesh.v1 import common_pb2, gateway_pb2

DEFAULT_MAX_PROMPT_BYTES = 1024 * 1024
# Texts up to this many characters are tokenized on the event loop: a few KiB take well under a
# millisecond, less than the hop to a worker thread and back; longer ones go to a thread, so the
# loop keeps relaying tokens while a long prompt is tokenized (the tokenizer lets go of the GIL).
INLINE_TOKENIZE_CHARS = 4096


@dataclass(frozen=True)
class Prepared:
    """A validated request, ready to submit: prompt ids, complete sampling, client options."""

    prompt: tuple[int, ...]
    params: SamplingParams
    request_id: str  # the client's id, or the one the gateway assigned
    include_text: bool


class ServedModel:
    """Config + tokenizer of the served checkpoint and the limits requests are checked against."""

    def __init__(self, model_dir: Path, max_model_len: int, max_new_tokens_limit: int, default_max_new_tokens: int,
                 max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES):
        self.model_dir = Path(model_dir)
        self.config: ModelConfig = load_config(self.model_dir)
        self.codec = TextCodec(self.model_dir, self.config)
        self.context = min(max_model_len, self.config.max_position_embeddings)
        self.max_new_tokens_limit = max_new_tokens_limit
        self.default_max_new_tokens = default_max_new_tokens
        self.max_prompt_bytes = max_prompt_bytes

    async def prepare_off_loop(self, req: gateway_pb2.GenerateRequest, request_id: str, where: str = "") -> Prepared:
        """`prepare`, in a worker thread when the prompt is a text long enough to be worth it
        (a text over the byte limit is refused here, before any hop)."""
        size = len(req.text) if req.WhichOneof("prompt") == "text" else 0
        if size <= INLINE_TOKENIZE_CHARS or size > self.max_prompt_bytes:
            return self.prepare(req, request_id, where)
        return await asyncio.to_thread(self.prepare, req, request_id, where)

    def prepare(self, req: gateway_pb2.GenerateRequest, request_id: str, where: str = "") -> Prepared:
        """Tokenize and validate one request; InvalidRequestError (prefixed by `where`) if bad."""
        try:
            prompt = self._prompt(req)
            params = self._sampling(req, len(prompt))
            validate_request(prompt, params, self.config.vocab_size, self.context, self.max_new_tokens_limit)
        except InvalidRequestError as exc:
            raise InvalidRequestError(f"{where}{exc}") from None
        return Prepared(tuple(prompt), params, req.request_id or request_id, req.include_text)

    def _prompt(self, req: gateway_pb2.GenerateRequest) -> list[int]:
        which = req.WhichOneof("prompt")
        if which is None:
            raise InvalidRequestError("no prompt: set either text or token_ids")
        if which == "text":
            return self.tokenize(req.text)
        count = len(req.token_ids.ids)
        if count >= self.context:  # before copying them: at least one new token must fit
            raise InvalidRequestError(f"prompt of {count} tokens exceeds the context of {self.context} tokens "
                                      "(no room for a new token)")
        return list(req.token_ids.ids)

    def tokenize(self, text: str) -> list[int]:
        """A prompt text's ids, BOS included, as every request's are made; InvalidRequestError for an
        empty text or one over --max-prompt-bytes."""
        self._check_text_size(text)
        return self.codec.encode(text)

    def _check_text_size(self, text: str) -> None:
        """InvalidRequestError for an empty text or one over max_prompt_bytes of UTF-8 (a character is
        1..4 bytes, so only a text of limit/4..limit characters needs encoding to tell)."""
        if not text:
            raise InvalidRequestError("prompt text is empty")
        size = len(text) if len(text) > self.max_prompt_bytes else len(text.encode("utf-8"))
        if size > self.max_prompt_bytes:
            raise InvalidRequestError(f"prompt text is over this gateway's limit of {self.max_prompt_bytes} bytes "
                                      f"of UTF-8 (--max-prompt-bytes): it has at least {size}")

    def _sampling(self, req: gateway_pb2.GenerateRequest, prompt_len: int) -> SamplingParams:
        """The request's sampling; unset = greedy up to the default length (clamped to the context).
        A sampled request without a seed gets one here, so that a worker resuming it after a
        migration draws exactly what the first worker would have (draws depend on (seed, position))."""
        if req.HasField("sampling"):
            params = sampling_from_proto(req.sampling)
            if params.greedy or params.seed is not None:
                return params
            return replace(params, seed=new_seed())
        room = self.context - prompt_len
        return replace(SamplingParams(), max_new_tokens=max(1, min(self.default_max_new_tokens, room)))

    def decoder(self) -> StreamDecoder:
        """A fresh streaming detokenizer for one completion."""
        return StreamDecoder(self.codec)

    def spec(self) -> common_pb2.ModelSpec:
        """ModelSpec for ModelInfo (max_context is the effective context the gateway enforces)."""
        return model_spec(self.config, self.model_dir.resolve().name, max_context=self.context)
