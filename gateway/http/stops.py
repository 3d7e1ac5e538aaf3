"""Text-level stop strings over a stream of text deltas. Pure.

OpenAI's `stop`: the completion ends at the first occurrence of any stop string, and the returned
text stops before it (the stop string itself is not returned). Tokens arrive in pieces, so a stop
string may be split across deltas: text that could still be the start of a stop string is held
back until the next delta decides it (emitted, or cut), or until the end (emitted).
"""

from __future__ import annotations

from collections.abc import Sequence


class StopCutter:
    """Feed deltas with `push`; it returns the text safe to send and whether a stop string was met."""

    def __init__(self, stops: Sequence[str]):
        assert all(stops), "stop strings are non-empty (checked where they are parsed)"
        self.stops = tuple(stops)
        self.held = ""  # text not sent yet: the longest tail that begins some stop string
        self.stopped = False

    def push(self, delta: str) -> tuple[str, bool]:
        """(text to send, stopped). After a stop nothing more is sent."""
        if self.stopped:
            return "", True
        text = self.held + delta
        at = self._first_stop(text)
        if at is not None:
            self.held, self.stopped = "", True
            return text[:at], True
        keep = self._partial_tail(text)
        self.held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """The held text, at the end of the completion (no stop string can complete any more)."""
        text, self.held = ("" if self.stopped else self.held), ""
        return text

    def _first_stop(self, text: str) -> int | None:
        found = [i for i in (text.find(stop) for stop in self.stops) if i >= 0]
        return min(found) if found else None

    def _partial_tail(self, text: str) -> int:
        """Length of the longest proper suffix of `text` that is a prefix of some stop string."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
