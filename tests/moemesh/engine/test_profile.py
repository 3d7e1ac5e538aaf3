"""The step profiler: every seam of a decode step shows up as a phase, the split adds up, and the
engine runs the same tokens after it was profiled (the marks are gone)."""

from __future__ import annotations

import pytest

from moemesh.engine.engine import Engine, generate
from moemesh.engine.profile import ORDER, WAITS, decode_split
from moemesh.engine.sampling import SamplingParams
from moemesh.model.decoder import RuntimeShape, build_model
from moemesh.model.tiny import TinySpec, write_tiny_model

SPEC = TinySpec(layers=2, experts=4, hidden=32, intermediate=48, heads=4, kv_heads=2, vocab=300)
PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model", SPEC)


def test_a_decode_step_splits_into_its_seams_and_the_marks_come_off(checkpoint):
    model = build_model(checkpoint, RuntimeShape(max_seqs=4, max_model_len=64))
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    before = generate(Engine(model), PROMPTS, params)
    engine = Engine(model)
    split = decode_split(engine, PROMPTS, params, steps=4)
    names = {name for name, _, _ in split.rows()}
    assert {"schedule", "attention", "router", "dispatch", "experts", "combine", "sampling",
            "other model work"} <= names
    assert not names & set(WAITS)  # a single process waits on no collective
    assert [n for n in ORDER if n in names] == [n for n, _, _ in split.rows()]
    for _, wall, ops in split.rows():
        assert wall >= 0 and ops >= 0
    summary = split.summary()
    assert summary["torch ops"] > 0 and summary["collectives"] == 0
    assert "attention" in split.table("engine")
    while engine.has_work:  # the profiled requests finish normally
        engine.step()
    assert type(model.attention).__name__ == "GroupedQueryAttention"  # unwrapped
    assert "schedule" not in engine.__dict__ and "execute" not in engine.__dict__
    assert generate(Engine(model), PROMPTS, params) == before
