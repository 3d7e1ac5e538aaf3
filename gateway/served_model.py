"""What the gateway knows about the model: tokenizer, limits, and request validation.

The gateway holds no weights: only config.json (vocabulary, context, shape for ModelInfo) and
tokenizer.json (prompt text -> ids, streamed ids -> text). Every request is checked here with the
engine's own `validate_request`, so a bad request fails with INVALID_ARGUMENT before it reaches a
worker. Sampling fields come from the wire as they were sent (`sampling_from_proto`: only an exact
0 means "unset"; NaN, inf and negative values reach validation and are refused, never replaced).
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class Prepared:
    """A validated request, ready to submit: prompt ids, complete sampling, client options."""

    prompt: tuple[int, ...]
    params: SamplingParams
    request_id: str  # the client's id, or the one the gateway assigned
    include_text: bool


class ServedModel:
    """Config + tokenizer of the served checkpoint and the limits requests are checked against."""

    def __init__(self, model_dir: Path, max_model_len: int, max_new_tokens_limit: int, default_max_new_tokens: int):
        self.model_dir = Path(model_dir)
        self.config: ModelConfig = load_config(self.model_dir)
        self.codec = TextCodec(self.model_dir, self.config)
        self.context = min(max_model_len, self.config.max_position_embeddings)
        self.max_new_tokens_limit = max_new_tokens_limit
        self.default_max_new_tokens = default_max_new_tokens

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
            if not req.text:
                raise InvalidRequestError("prompt text is empty")
            return self.codec.encode(req.text)
        return list(req.token_ids.ids)

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
