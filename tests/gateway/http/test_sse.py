"""SSE framing: one `data:` line of JSON per event, a blank line after, [DONE] last."""

from __future__ import annotations

import json

from gateway.http import sse


def test_an_event_is_one_data_line_of_json_then_a_blank_line():
    payload = {"text": "two\nlines é", "n": 1}
    frame = sse.event(payload)
    assert frame.startswith(b"data: ") and frame.endswith(b"\n\n")
    assert frame.count(b"\n") == 2  # the newline inside the text is escaped by JSON
    assert json.loads(frame[len(b"data: "):]) == payload
    assert sse.DONE == b"data: [DONE]\n\n"
