"""A step's bookkeeping: which rows of T are projected, sampled and scored; how sequences split."""

from __future__ import annotations

from moemesh.engine.batch import Chunk, SequenceState, logit_rows, split
from moemesh.engine.sampling import SamplingParams
from moemesh.model.layers import Segment


def seq(prompt_len: int, scored: bool = False) -> SequenceState:
    params = SamplingParams(logprobs=0 if scored else None, prompt_logprobs=scored)
    return SequenceState("r", list(range(prompt_len)), params, frozenset())


def test_only_sampled_rows_are_projected_when_nobody_scores_a_prompt():
    chunks = [Chunk(seq(5), 0, 5), Chunk(seq(3), 0, 3)]
    segments = [Segment(slot=0, offset=2, length=5, start_pos=0), Segment(slot=1, offset=7, length=3, start_pos=0)]
    assert logit_rows(2, chunks, segments) == ([0, 1, 6, 9], (), ())


def test_a_scored_prompt_projects_every_row_and_samples_its_last():
    chunks = [Chunk(seq(4, scored=True), 0, 4), Chunk(seq(3), 0, 3)]
    segments = [Segment(slot=0, offset=1, length=4, start_pos=0), Segment(slot=1, offset=5, length=3, start_pos=0)]
    rows, sample_at, prompt_at = logit_rows(1, chunks, segments)
    assert rows == [0, 1, 2, 3, 4, 7]  # decode row, the scored prompt's 4 rows, the other's last
    assert sample_at == (0, 4, 5) and prompt_at == (1, -1)


def test_a_middle_chunk_samples_nothing():
    long = seq(10)
    rows, sample_at, prompt_at = logit_rows(0, [Chunk(long, 0, 4)], [Segment(0, 0, 4, 0)])
    assert rows == [] and sample_at == () and prompt_at == ()
    assert not Chunk(long, 0, 4).last and Chunk(long, 4, 6).last


def test_split_spreads_decodes_evenly_and_chunks_to_the_lightest_group():
    decode = [seq(1) for _ in range(4)]
    chunks = [Chunk(seq(6), 0, 6), Chunk(seq(2), 0, 2)]
    groups = split(decode, chunks, 2)
    assert [len(d) for d, _ in groups] == [2, 2]
    assert [[c.length for c in cs] for _, cs in groups] == [[6], [2]]
    assert split([], [], 3) == [([], []), ([], []), ([], [])]
