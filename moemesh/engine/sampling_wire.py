"""SamplingParams <-> moemesh.v1.SamplingParams (proto3 zeros mean "off", see common.proto), and
TokenLogprob <-> moemesh.v1.TokenLogprob.

Only an exact 0 means "unset" (top_p 0 -> 1 = off); every other value, NaN, inf or negative
included, reaches `SamplingParams.validate` as it was sent. float32 fields come back as the
shortest decimal that round-trips through float32 (what the sender wrote: 0.7, not
0.699999988), so the gateway, the workers and a local engine sample with the same numbers.
"""

from __future__ import annotations

import numpy as np

from moemesh.engine.logprobs import TokenLogprob
from moemesh.engine.sampling import SamplingParams
from moemesh.errors import InvalidRequestError
from moemesh.v1 import common_pb2


def sampling_from_proto(msg: common_pb2.SamplingParams) -> SamplingParams:
    """Unvalidated: the engine's `validate` (or `validate_request`) reports what is wrong."""
    return SamplingParams(
        max_new_tokens=msg.max_new_tokens,
        temperature=_from_f32(msg.temperature),
        top_p=1.0 if msg.top_p == 0.0 else _from_f32(msg.top_p),
        top_k=msg.top_k,
        seed=msg.seed if msg.HasField("seed") else None,
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
        prompt_logprobs=msg.prompt_logprobs,
    )


def sampling_to_proto(p: SamplingParams) -> common_pb2.SamplingParams:
    """The wire form; InvalidRequestError for a value the wire cannot carry as itself (a negative
    integer, or a float that float32 would turn into 0, which means "off"). Range checks are
    `SamplingParams.validate`'s (a bad but representable value is sent as it is)."""
    for name in ("temperature", "top_p"):
        value = getattr(p, name)
        if value != 0.0 and _to_f32(value) == 0.0:
            raise InvalidRequestError(f"{name}={value!r} is 0 in float32 (the wire's type), which means off")
    for name, value in (("max_new_tokens", p.max_new_tokens), ("top_k", p.top_k), ("seed", p.seed),
                        ("logprobs", p.logprobs),
                        *(("stop_token_ids", t) for t in p.stop_token_ids)):
        if isinstance(value, int) and value < 0:
            raise InvalidRequestError(f"{name} must be >= 0, got {value}")
    if p.top_p == 0.0:
        raise InvalidRequestError("top_p must be in (0, 1] (1 = off), got 0.0 (0 on the wire means off)")
    msg = common_pb2.SamplingParams(
        max_new_tokens=p.max_new_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
        stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos, prompt_logprobs=p.prompt_logprobs,
    )
    if p.seed is not None:
        msg.seed = p.seed
    if p.logprobs is not None:
        msg.logprobs = p.logprobs
    return msg


def logprob_to_proto(lp: TokenLogprob) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(token_id=lp.token, logprob=lp.logprob, top_token_ids=[t for t, _ in lp.top],
                                   top_logprobs=[v for _, v in lp.top])


def logprob_from_proto(msg: common_pb2.TokenLogprob) -> TokenLogprob:
    """float32 on the wire: values come back rounded to float32."""
    return TokenLogprob(msg.token_id, msg.logprob, tuple(zip(msg.top_token_ids, msg.top_logprobs)))


def _to_f32(x: float) -> float:
    with np.errstate(over="ignore"):  # too big becomes inf, which validation refuses
        return float(np.float32(x))


def _from_f32(x: float) -> float:
    """A float32 wire value as the shortest decimal that float32 rounds to it."""
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))
