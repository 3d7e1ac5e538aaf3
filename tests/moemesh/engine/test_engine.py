"""Continuous batching, sampling and input validation of the engine, on a real checkpoint."""

from __future__ import annotations

from dataclasses import replace

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
        ([1, 2], SamplingParams(temperature=1e-40), r"temperature must be 0 \(greedy\) or in \[0.01, 100\]"),
        ([1, 2], SamplingParams(stop_token_ids=(512,)), "stop token id 512 in stop_token_ids is out of range"),
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


def test_a_seeded_request_resumed_elsewhere_continues_with_the_draws_it_would_have_made(model):
    """Draws follow (seed, position): 20 tokens == 8 tokens, then a new request (on another
    engine) whose prompt is the prompt plus those 8, same seed, 12 more."""
    params = SamplingParams(max_new_tokens=20, temperature=1.5, top_k=100, seed=42, ignore_eos=True)
    whole = generate(Engine(model), [PROMPTS[0]], params)[0]
    rest = generate(Engine(model), [PROMPTS[0] + whole[:8]], replace(params, max_new_tokens=12))[0]
    assert len(whole) == 20 and whole == whole[:8] + rest
    assert len(set(whole)) > 5  # really sampled, not a greedy loop


@pytest.mark.parametrize("victim", ["greedy", "sampled"])
def test_a_request_whose_logits_go_nan_ends_alone_and_frees_its_slot(model, victim):
    """Poison one sequence's KV cache (slot 1: the second admitted) so its logits are NaN: that
    request ends with FinishReason.ERROR, its slot is free, the others keep their tokens."""
    params = {"greedy": SamplingParams(max_new_tokens=6, ignore_eos=True),
              "sampled": SamplingParams(max_new_tokens=6, temperature=1.0, seed=5, ignore_eos=True)}[victim]
    others = SamplingParams(max_new_tokens=6, ignore_eos=True)
    alone = [generate(Engine(model), [PROMPTS[i]], others)[0] for i in (0, 2)]
    engine = Engine(model)
    for rid, prompt, p in (("a", PROMPTS[0], others), ("victim", PROMPTS[1], params), ("c", PROMPTS[2], others)):
        engine.add_request(rid, prompt, p)
    events = engine.step()  # prefill: slots 0, 1, 2
    model.cache.k[0][1, :, 0] = float("nan")  # (G, Dh) position 0 of slot 1, layer 0
    while engine.has_work:
        events += engine.step()
    failed = [e for e in events if e.request_id == "victim" and e.finish is FinishReason.ERROR]
    assert len(failed) == 1 and failed[0].token_id is None and "not finite" in failed[0].error
    assert [e for e in events if e.request_id == "victim"][-1] is failed[0]
    assert [[e.token_id for e in events if e.request_id == rid] for rid in ("a", "c")] == alone
    assert engine.free_slots == 4
    reuse = Engine(model)  # the freed slot serves again: its prefill overwrites the poisoned row
    assert generate(reuse, [PROMPTS[3], PROMPTS[4]], others) == [generate(Engine(model), [p], others)[0]
                                                                 for p in (PROMPTS[3], PROMPTS[4])]


def test_logprobs_are_the_reference_models_own_whatever_shares_the_step(hf_model):
    """Prompt and new-token log-probabilities (and the top alternatives) equal transformers'
    log-softmax of its logits, for a request prefilled beside one that asked for nothing and one
    already decoding."""
    import torch

    ckpt, ref = hf_model("mixtral", experts=8, top_k=2)
    engine = Engine(build_model(ckpt, RuntimeShape(max_seqs=4, max_model_len=64)))
    engine.add_request("busy", PROMPTS[0], SamplingParams(max_new_tokens=6))
    engine.step()  # "busy" decodes while the next two prefill
    scored = SamplingParams(max_new_tokens=3, logprobs=3, prompt_logprobs=True)
    engine.add_request("plain", PROMPTS[1], SamplingParams(max_new_tokens=3))
    engine.add_request("scored", PROMPTS[2], scored)
    events: dict[str, list] = {}
    while engine.has_work:
        for ev in engine.step():
            events.setdefault(ev.request_id, []).append(ev)
    assert all(ev.logprob is None and not ev.prompt_logprobs for ev in events["plain"] + events["busy"])
    got = events["scored"]
    full = PROMPTS[2] + [ev.token_id for ev in got]
    with torch.no_grad():
        want = torch.log_softmax(ref(torch.tensor([full])).logits[0].float(), dim=-1)  # (S, V)
    prompt = got[0].prompt_logprobs
    assert len(prompt) == len(PROMPTS[2]) - 1 and all(not ev.prompt_logprobs for ev in got[1:])
    scores = list(prompt) + [ev.logprob for ev in got]
    for pos, lp in enumerate(scores):  # position pos predicts full[pos + 1]
        assert lp.token == full[pos + 1]
        assert lp.logprob == pytest.approx(want[pos, full[pos + 1]].item(), abs=1e-4)
        top = torch.topk(want[pos], 3)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_logprobs_out_of_range_are_clear_errors(model):
    with pytest.raises(InvalidRequestError, match="logprobs must be in"):
        Engine(model).add_request("r", [1, 2], SamplingParams(logprobs=21))


def test_chunked_prefill_keeps_tokens_and_prompt_logprobs_and_decodes_every_step(model):
    """A budget of 4 tokens per step: the 8-token prompt goes in chunks while the others decode;
    tokens and prompt log-probabilities equal whole-prompt prefill's."""
    params = SamplingParams(max_new_tokens=6, logprobs=2, prompt_logprobs=True)
    whole = Engine(model)
    chunked = Engine(model, EngineSettings(max_batched_tokens=4, chunked_prefill=True))
    runs: list[dict[str, list]] = []
    for engine in (whole, chunked):
        engine.add_request("short", PROMPTS[0], params)
        events: dict[str, list] = {"short": engine.step()}  # "short" decodes from here on
        engine.add_request("long", PROMPTS[2], params)
        while engine.has_work:
            batch = engine.schedule()
            if engine is chunked:
                assert batch.num_tokens <= 4
            for ev in engine.execute(batch):
                events.setdefault(ev.request_id, []).append(ev)
        runs.append(events)
    for rid in ("short", "long"):
        a, b = runs[0][rid], runs[1][rid]
        assert [e.token_id for e in a] == [e.token_id for e in b]
        assert [lp.token for lp in a[0].prompt_logprobs] == [lp.token for lp in b[0].prompt_logprobs]
        assert len(b[0].prompt_logprobs) == len(PROMPTS[0] if rid == "short" else PROMPTS[2]) - 1
        for x, y in zip(a[0].prompt_logprobs + tuple(e.logprob for e in a),
                        b[0].prompt_logprobs + tuple(e.logprob for e in b)):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-5)
            assert [t for t, _ in x.top] == [t for t, _ in y.top]
    assert len(runs[1]["long"]) == 6 and len(runs[1]["short"]) == 6


def test_chunked_prefill_gives_a_running_request_a_token_every_step(model):
    engine = Engine(model, EngineSettings(max_batched_tokens=3, chunked_prefill=True))
    engine.add_request("running", PROMPTS[3], SamplingParams(max_new_tokens=12))
    engine.step()
    engine.add_request("long", PROMPTS[2], SamplingParams(max_new_tokens=2))
    first_long = None
    for step in range(1, 5):
        events = {ev.request_id: ev for ev in engine.step()}
        assert "running" in events  # never stalled by the 8-token prompt
        if "long" in events and first_long is None:
            first_long = step
    assert first_long == 4  # 8 prompt tokens at 2 per step (one of 3 goes to the decode)
