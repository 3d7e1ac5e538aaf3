"""OpenAI bodies -> the gateway's GenerateRequest: types checked with the field named, unsupported
fields refused, unknown ones ignored, ranges left to the domain's validation."""

from __future__ import annotations

import pytest

from gateway.http.errors import BadParamError
from gateway.http.params import chat_params, completion_params, generate_request
from moemesh.engine.sampling_wire import sampling_from_proto
from moemesh.errors import InvalidRequestError


def test_a_completion_body_becomes_the_grpc_request():
    params = completion_params({"model": "m", "prompt": "Hi", "max_tokens": 5, "temperature": 0.5, "top_p": 0.9,
                                "top_k": 3, "seed": 7, "stop": "\n", "stream": True,
                                "stream_options": {"include_usage": True}, "user": "ignored", "ignore_eos": True},
                               default_max_tokens=16)
    assert (params.prompt, params.common.model, params.common.stop) == ("Hi", "m", ("\n",))
    assert params.common.stream and params.common.include_usage
    request = generate_request(params.prompt, params.common.sampling)
    assert request.text == "Hi" and request.include_text
    sampling = sampling_from_proto(request.sampling)
    assert (sampling.max_new_tokens, sampling.temperature, sampling.top_p, sampling.top_k, sampling.seed,
            sampling.ignore_eos) == (5, 0.5, 0.9, 3, 7, True)


def test_defaults_token_prompts_and_a_batch_of_one():
    params = completion_params({"prompt": [[5, 6, 7]]}, default_max_tokens=16)
    assert params.prompt == (5, 6, 7)
    assert (params.common.sampling.temperature, params.common.sampling.max_new_tokens) == (1.0, 16)
    assert generate_request(params.prompt, params.common.sampling).token_ids.ids == [5, 6, 7]
    assert completion_params({"prompt": ["x"], "top_k": -1}, 16).common.sampling.top_k == 0  # vLLM's "off"


def test_completion_logprobs_and_echo_become_the_requests_scoring():
    plain = completion_params({"prompt": "x", "logprobs": 3}, 16)
    assert (plain.echo, plain.common.sampling.logprobs, plain.common.sampling.prompt_logprobs) == (False, 3, False)
    echoed = completion_params({"prompt": "x", "logprobs": 0, "echo": True}, 16)
    assert (echoed.echo, echoed.common.sampling.logprobs, echoed.common.sampling.prompt_logprobs) == (True, 0, True)
    text_only = completion_params({"prompt": "x", "echo": True}, 16)  # echo without logprobs: no scoring
    assert (text_only.common.sampling.logprobs, text_only.common.sampling.prompt_logprobs) == (None, False)
    chat = {"messages": [{"role": "user", "content": "a"}]}
    assert chat_params({**chat, "logprobs": True, "top_logprobs": 4}, 16).common.sampling.logprobs == 4
    assert chat_params({**chat, "logprobs": True}, 16).common.sampling.logprobs == 0
    assert chat_params({**chat, "logprobs": False}, 16).common.sampling.logprobs is None
    for field in ({"logprobs": 2}, {"top_logprobs": 2}, {"logprobs": True, "top_logprobs": -1}):
        with pytest.raises(BadParamError) as caught:
            chat_params({**chat, **field}, 16)
        assert caught.value.param in field


def test_chat_takes_max_completion_tokens_and_text_parts():
    params = chat_params({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                    {"type": "text", "text": "b"}]}],
                          "max_tokens": 3, "max_completion_tokens": 9}, default_max_tokens=16)
    assert params.messages == ({"role": "user", "content": "ab"},)
    assert params.common.sampling.max_new_tokens == 9 and params.add_generation_prompt


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": "x", "logprobs": -1}, "logprobs"),
    ({"prompt": "x", "logprobs": True}, "logprobs"),
    ({"prompt": "x", "echo": "yes"}, "echo"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, -2]}, "prompt"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": "x", "stop": ["ok", ""]}, "stop"),
    ({"prompt": "x", "stop": 3}, "stop"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "x", "model": 3}, "model"),
])
def test_bad_fields_are_named(body, param):
    with pytest.raises(BadParamError) as caught:
        completion_params(body, 16)
    assert caught.value.param == param and param in str(caught.value)


def test_chat_messages_are_checked_and_ranges_left_to_the_domain():
    for messages in (None, [], [{"content": "no role"}], [{"role": "user", "content": [{"type": "image_url"}]}]):
        with pytest.raises(BadParamError):
            chat_params({"messages": messages}, 16)
    with pytest.raises(InvalidRequestError, match="out of range"):  # too big for the wire's uint64
        generate_request("x", completion_params({"prompt": "x", "seed": 2**64}, 16).common.sampling)
    # -1 reaches the wire as it is: SamplingParams.validate (in ServedModel.prepare) refuses it
    request = generate_request("x", completion_params({"prompt": "x", "temperature": -1}, 16).common.sampling)
    assert request.sampling.temperature == -1
