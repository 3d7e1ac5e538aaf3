"""OpenAI request bodies -> what the gateway's domain takes. Pure (no web framework, no grpc).

`completion_params` / `chat_params` read a decoded JSON body; every field has its type checked
here (BadParamError names it), ranges are the domain's (`SamplingParams.validate`, run by
`ServedModel.prepare`), and `generate_request` builds the one `gateway_pb2.GenerateRequest` the
gRPC API takes too. Fields OpenAI defines that the gateway cannot honour (n > 1, best_of > 1,
penalties, logit_bias, tools, a response_format other than text, a batch of prompts) are a 400
saying so, never silently dropped; fields it does not know (user, metadata, ...) are ignored, as
OpenAI does. Completions take `logprobs` (0..20 alternatives per token) and `echo` (the prompt in
front of the completion; with logprobs, the prompt tokens' too: how a text is scored); chat takes
`logprobs` (a boolean) and `top_logprobs` (0..20).

Defaults: temperature 1 (OpenAI's; 0 = greedy), max_tokens the gateway's
--default-max-new-tokens (OpenAI's completions default is 16, which is also the gateway's).
Extensions (vLLM's names): top_k (0 or -1 = off), ignore_eos, stop_token_ids.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from gateway.http.errors import BadParamError
from moemesh.engine.logprobs import MAX_TOP_LOGPROBS
from moemesh.engine.sampling import SamplingParams
from moemesh.engine.sampling_wire import sampling_to_proto
from moemesh.errors import InvalidRequestError
from moemesh.v1 import gateway_pb2

DEFAULT_TEMPERATURE = 1.0  # OpenAI's default when the request leaves it out
# field -> the values that mean "not asked for"; anything else is refused with a 400
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "suffix": (None, ""),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}),
}


@dataclass(frozen=True)
class Sampled:
    """The fields every generation request has, read and type-checked."""

    model: str | None
    sampling: SamplingParams
    stop: tuple[str, ...]  # text-level stop strings (gateway.http.stops)
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage


@dataclass(frozen=True)
class CompletionParams:
    prompt: str | tuple[int, ...]
    common: Sampled
    echo: bool = False  # the prompt in front of the completion (and its logprobs, when asked)


@dataclass(frozen=True)
class ChatParams:
    messages: tuple[dict[str, Any], ...]
    add_generation_prompt: bool
    common: Sampled


def completion_params(body: Any, default_max_tokens: int) -> CompletionParams:
    """A /v1/completions body."""
    body = _object(body, allowed=("logprobs", "echo"))
    echo = body.get("echo") or False
    _check(isinstance(echo, bool), "echo", "must be a boolean")
    logprobs = body.get("logprobs")
    _check(logprobs is None or (_is_int(logprobs) and logprobs >= 0), "logprobs",
           f"must be an integer in [0, {MAX_TOP_LOGPROBS}] (alternatives per token)")
    common = _sampled(body, default_max_tokens, "max_tokens")
    sampling = replace(common.sampling, logprobs=logprobs, prompt_logprobs=echo and logprobs is not None)
    return CompletionParams(_prompt(body.get("prompt")), replace(common, sampling=sampling), echo)


def chat_params(body: Any, default_max_tokens: int) -> ChatParams:
    """A /v1/chat/completions body (max_completion_tokens wins over the older max_tokens)."""
    body = _object(body, allowed=("logprobs", "top_logprobs"))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadParamError("messages", "messages must be a non-empty list of {role, content} objects")
    add_generation_prompt = body.get("add_generation_prompt", True)
    _check(isinstance(add_generation_prompt, bool), "add_generation_prompt", "must be a boolean")
    limit = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    common = _sampled(body, default_max_tokens, limit)
    return ChatParams(tuple(_message(m, i) for i, m in enumerate(messages)), add_generation_prompt,
                      replace(common, sampling=replace(common.sampling, logprobs=_chat_logprobs(body))))


def _chat_logprobs(body: Mapping[str, Any]) -> int | None:
    """Chat's logprobs (a boolean) and top_logprobs (alternatives; only with logprobs) -> the
    alternatives per token, None when not asked."""
    logprobs = body.get("logprobs") or False
    _check(isinstance(logprobs, bool), "logprobs", "must be a boolean (top_logprobs says how many alternatives)")
    top = body.get("top_logprobs")
    _check(top is None or (_is_int(top) and top >= 0), "top_logprobs",
           f"must be an integer in [0, {MAX_TOP_LOGPROBS}]")
    _check(top is None or logprobs, "top_logprobs", "needs logprobs: true")
    return (top or 0) if logprobs else None


def generate_request(prompt: str | tuple[int, ...], sampling: SamplingParams, request_id: str = "",
                     ) -> gateway_pb2.GenerateRequest:
    """The gRPC API's request for `prompt` (text, or token ids as given), with text in the chunks."""
    try:
        wire = sampling_to_proto(sampling)
    except ValueError as exc:  # an integer too big for its wire field (uint32 / uint64)
        raise InvalidRequestError(f"a sampling value is out of range: {exc}") from None
    request = gateway_pb2.GenerateRequest(sampling=wire, request_id=request_id, include_text=True)
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    return request


def tokens_param(value: Any, name: str) -> tuple[int, ...]:
    """A list of token ids (non-negative integers)."""
    _check(isinstance(value, list) and all(_is_int(t) and t >= 0 for t in value), name,
           "must be a list of token ids (integers >= 0)")
    return tuple(value)


# --- fields -------------------------------------------------------------------------------------


def _object(body: Any, allowed: tuple[str, ...] = ()) -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise BadParamError("body", "the request body must be a JSON object")
    for name, unset in UNSUPPORTED.items():
        if name not in allowed and body.get(name) not in unset:
            raise BadParamError(name, f"{name}={body[name]!r} is not supported by this server "
                                      f"(leave it out or send {unset[1]!r})")
    return body


def _sampled(body: Mapping[str, Any], default_max_tokens: int, limit_field: str) -> Sampled:
    model = body.get("model")
    _check(model is None or isinstance(model, str), "model", "must be a string")
    max_tokens = body.get(limit_field)
    max_tokens = default_max_tokens if max_tokens is None else max_tokens
    _check(_is_int(max_tokens) and max_tokens >= 1, limit_field, "must be an integer >= 1")
    temperature = _number(body, "temperature", DEFAULT_TEMPERATURE)
    top_p = _number(body, "top_p", 1.0)
    _check(top_p != 0.0, "top_p", "must be in (0, 1] (1 = off)")
    top_k = body.get("top_k")
    top_k = 0 if top_k in (None, -1) else top_k  # vLLM's -1 means off, like 0
    _check(_is_int(top_k) and top_k >= 0, "top_k", "must be an integer >= 0 (0 or -1 = off)")
    seed = body.get("seed")
    _check(seed is None or (_is_int(seed) and seed >= 0), "seed", "must be an integer in [0, 2^64)")
    ignore_eos = body.get("ignore_eos", False)
    _check(isinstance(ignore_eos, bool), "ignore_eos", "must be a boolean")
    stop_ids = body.get("stop_token_ids")
    stop_token_ids = () if stop_ids is None else tokens_param(stop_ids, "stop_token_ids")
    stream = body.get("stream", False)
    _check(isinstance(stream, bool), "stream", "must be a boolean")
    sampling = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                              seed=seed, stop_token_ids=stop_token_ids, ignore_eos=ignore_eos)
    return Sampled(model, sampling, _stop(body.get("stop")), stream, _include_usage(body, stream))


def _number(body: Mapping[str, Any], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    _check(isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value), name,
           "must be a finite number")
    return float(value)


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    _check(isinstance(stops, list) and all(isinstance(s, str) and s for s in stops), "stop",
           "must be a non-empty string or a list of non-empty strings")
    return tuple(stops)


def _include_usage(body: Mapping[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    _check(isinstance(options, dict), "stream_options", "must be an object")
    _check(stream, "stream_options", "is only allowed with stream: true")
    include = options.get("include_usage", False)
    _check(isinstance(include, bool), "stream_options.include_usage", "must be a boolean")
    return include


def _prompt(value: Any) -> str | tuple[int, ...]:
    """A string or a list of token ids; a batch (a list of several prompts) is refused."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str | list):
        value = value[0]  # a batch of one prompt is that prompt
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(p, str | list) for p in value):
        raise BadParamError("prompt", "a batch of prompts is not supported: send one prompt per request")
    _check(isinstance(value, list) and bool(value), "prompt", "must be a string or a non-empty list of token ids")
    return tokens_param(value, "prompt")


def _message(message: Any, index: int) -> dict[str, Any]:
    """One chat message for the template: role and content (text parts joined), other fields kept."""
    where = f"messages[{index}]"
    _check(isinstance(message, dict) and isinstance(message.get("role"), str), where,
           "must be an object with a string role")
    content = message.get("content")
    if isinstance(content, list):
        _check(all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content), f"{where}.content", "only text parts ({type: text, text}) are supported")
        content = "".join(p["text"] for p in content)
    _check(content is None or isinstance(content, str), f"{where}.content", "must be a string or a list of parts")
    return {**message, "content": content if content is not None else ""}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, param: str, what: str) -> None:
    if not ok:
        raise BadParamError(param, f"{param} {what}")
