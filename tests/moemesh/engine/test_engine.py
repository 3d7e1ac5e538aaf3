"""Continuous batching, sampling and input validation of the engine, on a real checkpoint."""

from __future__ import annotations

import pytest

from moemesh.engine.engine import Engine, EngineSettings, FinishReason, generate
from moemesh.engine.sampling import SamplingParams
from moemesh.errors import CapacityError, InvalidRequestError
from moemesh.model.decoder import RuntimeShape, build_model

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [100, 200, 250, 3, 4, 5, 6, 7], [42], [7, 7, 7, 7]]


@pytest.fixture
def model(hf_model):
    ckpt, _ = hf_model("mixtral", experts=8, top_k=2)
    return build_model(ckpt, RuntimeShape(max_seqs=4, max_model_len=64))


def test_requests_joining_mid_flight_match_running_alone(model):
    params = SamplingParams(max_new_tokens=10)
    alone = [generate(Engine(model), [p], params)[0] for p in PROMPTS]
    engine = Engine(model)  # 4 slots for 5 requests: the last one also waits for a free slot
    out: dict[str, list[int]] = {}
    arrivals = {0: [0, 1], 3: [2], 5: [3, 4]}  # step -> prompts that arrive before it
    step = 0
    while step <= max(arrivals) or engine.has_work:
        for i in arrivals.get(step, []):
            engine.add_request(f"r{i}", PROMPTS[i], params)
        for ev in engine.step():
            out.setdefault(ev.request_id, []).append(ev.token_id)
        step += 1
    assert [out[f"r{i}"] for i in range(len(PROMPTS))] == alone
    assert engine.free_slots == 4


def test_seeded_sampling_is_reproducible_whatever_the_batch(model):
    sampled = SamplingParams(max_new_tokens=8, temperature=0.8, top_p=0.9, top_k=20, seed=1234)
    alone = generate(Engine(model), [PROMPTS[0]], sampled)[0]
    engine = Engine(model)
    engine.add_request("noise", PROMPTS[1], SamplingParams(max_new_tokens=8, temperature=1.0, seed=7))
    together = generate(engine, [PROMPTS[0]], sampled)[0]
    assert together == alone
    other_seed = generate(Engine(model), [PROMPTS[0]], SamplingParams(max_new_tokens=8, temperature=5.0, seed=99))[0]
    assert other_seed != alone


def test_top_k_one_is_greedy(model):
    greedy = generate(Engine(model), [PROMPTS[2]], SamplingParams(max_new_tokens=6))[0]
    top1 = generate(Engine(model), [PROMPTS[2]], SamplingParams(max_new_tokens=6, temperature=2.0, top_k=1, seed=3))[0]
    assert top1 == greedy


def test_stop_token_and_length_finish(model):
    greedy = generate(Engine(model), [PROMPTS[0]], SamplingParams(max_new_tokens=6))[0]
    engine = Engine(model)
    engine.add_request("s", PROMPTS[0], SamplingParams(max_new_tokens=6, stop_token_ids=(greedy[2],)))
    events = []
    while engine.has_work:
        events += engine.step()
    assert [e.token_id for e in events] == greedy[: greedy.index(greedy[2]) + 1]
    assert events[-1].finish == FinishReason.STOP
    assert all(e.finish is None for e in events[:-1])


def test_cancel_frees_the_slot(model):
    engine = Engine(model)
    engine.add_request("a", PROMPTS[0], SamplingParams(max_new_tokens=20))
    engine.add_request("b", PROMPTS[1], SamplingParams(max_new_tokens=3))
    engine.step()
    assert engine.free_slots == 2
    assert engine.cancel("a") is True
    assert engine.cancel("a") is False
    assert engine.free_slots == 3
    while engine.has_work:
        engine.step()
    assert engine.free_slots == 4


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ([], SamplingParams(), "prompt is empty"),
        ([1, 2], SamplingParams(max_new_tokens=0), "max_new_tokens must be > 0"),
        ([1, 2], SamplingParams(max_new_tokens=-3), "max_new_tokens must be > 0"),
        ([1] * 60, SamplingParams(max_new_tokens=10), "exceeds the context of 64 tokens"),
        ([1, 2], SamplingParams(temperature=-1.0), "temperature"),
        ([1, 2], SamplingParams(top_p=0.0), "top_p"),
        ([1, 2], SamplingParams(top_k=-2), "top_k"),
        ([1, 999], SamplingParams(), "token id 999 out of range"),
    ],
)
def test_bad_requests_are_clear_errors(model, prompt, params, message):
    engine = Engine(model)
    with pytest.raises(InvalidRequestError, match=message):
        engine.add_request("x", prompt, params)
    assert not engine.has_work


def test_queue_limit_is_capacity_error(model):
    engine = Engine(model, EngineSettings(max_waiting=2))
    engine.add_request("a", [1], SamplingParams())
    engine.add_request("b", [1], SamplingParams())
    with pytest.raises(CapacityError):
        engine.add_request("c", [1], SamplingParams())
    other = Engine(model)
    other.add_request("a", [1], SamplingParams())
    with pytest.raises(InvalidRequestError, match="already in use"):
        other.add_request("a", [2], SamplingParams())
