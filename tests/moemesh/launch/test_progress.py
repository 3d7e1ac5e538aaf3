"""moemesh.launch.progress: the lines `moemesh up` prints while workers start (the pure part; a real
mesh's progress is checked in tests/moemesh/test_launch.py)."""

from __future__ import annotations

from moemesh.launch.progress import Seen, lines


def test_a_line_per_stage_change_and_loading_bytes_at_most_every_interval():
    out, seen = lines({}, {"worker0": ("registering", 0.0), "worker1": ("waiting", 0.0)}, now=0.0, every_s=2.0)
    assert out == ["moemesh up: worker0 registering with the coordinator",
                   "moemesh up: worker1 waiting for a world that lists it"]
    out, seen = lines(seen, {"worker0": ("loading", 1e6), "worker1": ("waiting", 0.0)}, now=1.0, every_s=2.0)
    assert out == ["moemesh up: worker0 loading weights and joining the world (1.0 MB read)"]
    out, seen = lines(seen, {"worker0": ("loading", 2e6)}, now=2.5, every_s=2.0)
    assert out == []  # bytes moved, but only 1.5 s since the last line
    out, seen = lines(seen, {"worker0": ("loading", 3e6)}, now=3.0, every_s=2.0)
    assert out == ["moemesh up: worker0 loading weights and joining the world (3.0 MB read)"]
    out, seen = lines(seen, {"worker0": ("loading", 3e6)}, now=9.0, every_s=2.0)
    assert out == []  # nothing new to say
    out, seen = lines(seen, {"worker0": ("serving", 3.5e6)}, now=9.1, every_s=2.0)
    assert out == ["moemesh up: worker0 serving (3.5 MB read)"]
    assert seen["worker0"] == Seen("serving", 3.5e6, 9.1) and seen["worker1"] == Seen("waiting", 0.0, 0.0)
