"""Stop strings over a stream of deltas: cut before the first stop, whatever the split."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from gateway.http.stops import StopCutter


def run(deltas: list[str], stops: list[str]) -> tuple[str, bool]:
    cutter = StopCutter(stops)
    sent = []
    stopped = False
    for delta in deltas:
        text, stopped = cutter.push(delta)
        sent.append(text)
        if stopped:
            break
    if not stopped:
        sent.append(cutter.flush())
    return "".join(sent), stopped


def test_cuts_before_the_stop_string_and_says_so():
    assert run(["Hello, wor", "ld! Bye"], ["!"]) == ("Hello, world", True)
    assert run(["no stop here"], ["###"]) == ("no stop here", False)


def test_a_stop_split_across_deltas_is_found_and_never_sent_in_part():
    cutter = StopCutter(["END"])
    assert cutter.push("abcE") == ("abc", False)  # "E" may begin "END": held back
    assert cutter.push("N") == ("", False)
    assert cutter.push("Dxyz") == ("", True)


def test_held_text_that_turns_out_not_to_stop_is_sent():
    cutter = StopCutter(["END"])
    assert cutter.push("abcEN") == ("abc", False)
    assert cutter.push("x") == ("ENx", False)
    assert cutter.push("E") == ("", False)
    assert cutter.flush() == "E"


def test_the_earliest_of_several_stops_wins():
    assert run(["one two three"], ["three", "two"]) == ("one ", True)


@given(st.text(alphabet="abc", max_size=30), st.lists(st.text(alphabet="abc", min_size=1, max_size=3), min_size=1,
                                                      max_size=3), st.lists(st.integers(0, 30), max_size=6))
def test_any_split_gives_the_text_before_the_first_stop(text, stops, cuts):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    deltas = [text[a:b] for a, b in itertools.pairwise(bounds)]
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    expected = (text[:min(found)], True) if found else (text, False)
    assert run(deltas, stops) == expected
