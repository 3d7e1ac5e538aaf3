"""Request validation and tokenization in the gateway, on a real tiny checkpoint (no processes)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.served_model import INLINE_TOKENIZE_CHARS, ServedModel
from moemesh.engine.sampling import SamplingParams
from moemesh.engine.sampling_wire import sampling_to_proto
from moemesh.errors import InvalidRequestError
from moemesh.model.tiny import TinySpec, write_tiny_model
from moemesh.model.tokenizer import BOS_ID
from moemesh.v1 import common_pb2, gateway_pb2

SPEC = TinySpec(hidden=64, intermediate=64, layers=2, experts=8, heads=4, kv_heads=2, vocab=512,
                max_position_embeddings=256)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> ServedModel:
    ckpt = write_tiny_model(tmp_path_factory.mktemp("gateway") / "tiny", SPEC)
    return ServedModel(Path(ckpt), max_model_len=2048, max_new_tokens_limit=100, default_max_new_tokens=16)


def request(text: str | None = None, ids: list[int] | None = None, **sampling) -> gateway_pb2.GenerateRequest:
    req = gateway_pb2.GenerateRequest()
    if text is not None:
        req.text = text
    if ids is not None:
        req.token_ids.ids.extend(ids)
    if sampling:
        req.sampling.CopyFrom(sampling_to_proto(SamplingParams(**sampling)))
    return req


def test_text_is_tokenized_with_bos_and_ids_are_used_as_given(model):
    p = model.prepare(request("hi", max_new_tokens=4), "gen-1")
    assert p.prompt == (BOS_ID, 3 + ord("h"), 3 + ord("i"))
    assert p.request_id == "gen-1" and p.params.max_new_tokens == 4
    given = request(ids=[7, 8], max_new_tokens=2)
    given.request_id = "mine"
    assert model.prepare(given, "gen-2").prompt == (7, 8)
    assert model.prepare(given, "gen-2").request_id == "mine"


def test_context_is_the_smaller_of_the_flag_and_the_checkpoint(model):
    assert model.context == 256
    assert model.spec().max_context == 256
    assert model.spec().architecture == "MixtralForCausalLM"
    assert list(model.spec().moe_layer_ids) == [0, 1]


def test_unset_sampling_is_greedy_up_to_the_default_length_within_the_context(model):
    p = model.prepare(request(ids=[5]), "x")
    assert p.params == SamplingParams(max_new_tokens=16)
    nearly_full = model.prepare(request(ids=[5] * 250), "x")
    assert nearly_full.params.max_new_tokens == 6


@pytest.mark.parametrize("req, message", [
    (gateway_pb2.GenerateRequest(), "no prompt"),
    (request(""), "prompt text is empty"),
    (request(ids=[], max_new_tokens=3), "prompt is empty"),
    (request(ids=[5, 512], max_new_tokens=3), "token id 512 out of range 0..511"),
    (request(ids=[5], max_new_tokens=0), "max_new_tokens must be > 0"),
    (request(ids=[5], max_new_tokens=101), "over this server's limit of 100"),
    (request(ids=[5] * 200, max_new_tokens=57), "exceeds the context of 256 tokens"),
    (request(ids=[5], max_new_tokens=3, temperature=-1.0), "temperature"),
    (request(ids=[5], max_new_tokens=3, top_p=1.5), "top_p"),
    (request(ids=[5], max_new_tokens=3, stop_token_ids=(600,)), "stop token id 600"),
])
def test_bad_requests_are_refused_with_a_clear_message(model, req, message):
    with pytest.raises(InvalidRequestError, match=message):
        model.prepare(req, "x", where="requests[3]: ")
    with pytest.raises(InvalidRequestError, match=r"^requests\[3\]: "):
        model.prepare(req, "x", where="requests[3]: ")


def test_a_sampled_request_without_a_seed_gets_one_so_a_migration_draws_the_same(model):
    unseeded = [model.prepare(request(ids=[5], max_new_tokens=4, temperature=0.8), "x") for _ in range(2)]
    for p in unseeded:
        assert p.params.seed is not None and 0 <= p.params.seed < 2**64
    assert unseeded[0].params.seed != unseeded[1].params.seed  # drawn per request (2^-64 to collide)
    assert model.prepare(request(ids=[5], max_new_tokens=4, temperature=0.8, seed=7), "x").params.seed == 7
    assert model.prepare(request(ids=[5], max_new_tokens=4), "x").params.seed is None  # greedy: no draws


def raw(**fields) -> gateway_pb2.GenerateRequest:
    """A request whose SamplingParams proto is set field by field, as any gRPC client may send it."""
    return gateway_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=[5]),
                                       sampling=common_pb2.SamplingParams(**{"max_new_tokens": 3, **fields}))


@pytest.mark.parametrize("fields, message", [
    ({"temperature": 1e-40}, r"temperature must be 0 \(greedy\) or in \[0.01, 100\], got 1e-40"),
    ({"temperature": float("nan")}, r"temperature .*got nan"),
    ({"temperature": float("inf")}, r"temperature .*got inf"),
    ({"temperature": 1000.0}, r"temperature .*got 1000"),
    ({"temperature": 1.0, "top_p": -0.5}, r"top_p must be in \(0, 1\] \(1 = off\), got -0.5"),
    ({"temperature": 1.0, "top_p": float("nan")}, r"top_p must be in \(0, 1\] \(1 = off\), got nan"),
    ({"temperature": 1.0, "seed": 2**64 - 1, "stop_token_ids": [3, 512]}, r"stop token id 512 in stop_token_ids"),
])
def test_bad_sampling_fields_on_the_wire_are_refused_never_replaced(model, fields, message):
    with pytest.raises(InvalidRequestError, match=message):
        model.prepare(raw(**fields), "x")


def test_only_an_exact_zero_means_unset_and_float32_values_come_back_as_sent(model):
    p = model.prepare(raw(temperature=0.7, top_p=0.9, top_k=5, seed=2**64 - 1), "x").params
    assert (p.temperature, p.top_p, p.top_k, p.seed) == (0.7, 0.9, 5, 2**64 - 1)
    assert model.prepare(raw(temperature=0.01), "x").params.temperature == 0.01  # the lowest, over float32
    assert model.prepare(raw(temperature=1.0), "x").params.top_p == 1.0  # 0 on the wire: off


@pytest.fixture(scope="module")
def small(model: ServedModel) -> ServedModel:
    """The same checkpoint behind a 64-byte prompt limit."""
    return ServedModel(model.model_dir, max_model_len=2048, max_new_tokens_limit=100, default_max_new_tokens=16,
                       max_prompt_bytes=64)


def test_the_prompt_limit_counts_utf8_bytes_not_characters(small):
    assert len(small.prepare(request("a" * 64, max_new_tokens=4), "x").prompt) == 65  # BOS + 64
    for text in ("a" * 65, "é" * 33, "a" * 10_000_000):  # 65, 66 bytes; far over: refused without encoding
        with pytest.raises(InvalidRequestError, match=r"over this gateway's limit of 64 bytes of UTF-8 "
                                                      r"\(--max-prompt-bytes\)"):
            small.prepare(request(text, max_new_tokens=4), "x")


def test_token_ids_that_fill_the_context_are_refused_before_anything_else(model):
    with pytest.raises(InvalidRequestError, match="prompt of 256 tokens exceeds the context of 256 tokens"):
        model.prepare(request(ids=[5] * 256, max_new_tokens=1), "x")


async def _ticks_while_preparing(model: ServedModel, text: str) -> tuple[str, int]:
    """What prepare_off_loop makes of `text` (its prompt, or its refusal), and how often another
    task ran meanwhile."""
    ticks, done = 0, False

    async def tick() -> None:
        nonlocal ticks
        while not done:
            await asyncio.sleep(0)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        outcome = str((await model.prepare_off_loop(request(text, max_new_tokens=4), "x")).prompt)
    except InvalidRequestError as exc:
        outcome = str(exc)
    done = True
    await ticker
    return outcome, ticks


def test_a_long_text_is_tokenized_off_the_event_loop_and_a_short_one_inline(model):
    short, long = "hi" * 100, "hello world " * 40_000  # 480 KB: off the loop (and far over the context)
    short_outcome, short_ticks = asyncio.run(_ticks_while_preparing(model, short))
    long_outcome, long_ticks = asyncio.run(_ticks_while_preparing(model, long))
    assert short_outcome == str(model.prepare(request(short, max_new_tokens=4), "x").prompt)
    assert long_outcome.startswith(f"prompt of {len(model.codec.encode(long))} tokens + max_new_tokens=4 exceeds")
    assert len(short) <= INLINE_TOKENIZE_CHARS < len(long)
    assert short_ticks == 0  # no hop: the loop never ran another task
    assert long_ticks > 2  # the loop kept running while a thread tokenized (the tokenizer lets go of the GIL);
    # one tick may come after the outcome (the ticker's last round), none without the hop
