"""Start-up progress of a mesh's workers, read from their metrics: what `moemesh up` prints while
the weights load.

Each worker's metrics endpoint is up before it registers and says its start-up stage
(`moemesh:worker_stage`: registering, waiting for a world, loading, serving) and the checkpoint
bytes it has read (`moemesh:weights_loaded_bytes`). `StartupWatch.poll` scrapes every worker (a
short deadline each) and returns a line for each worker whose stage changed, and for one still
loading, its bytes every `every_s`; `lines` is the pure part.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from moemesh.metrics import by_label, scrape, value

SCRAPE_TIMEOUT_S = 0.5
WORDS = {"starting": "starting", "registering": "registering with the coordinator",
         "waiting": "waiting for a world that lists it", "loading": "loading weights and joining the world",
         "serving": "serving"}


@dataclass(frozen=True)
class Seen:
    """One worker's stage and bytes read, and when a line last said so."""

    stage: str
    loaded_bytes: float
    said_at: float


def lines(before: dict[str, Seen], now_seen: dict[str, tuple[str, float]], now: float, every_s: float
          ) -> tuple[list[str], dict[str, Seen]]:
    """The lines to print for `now_seen` (name -> (stage, bytes)) after `before`, and the new state."""
    out, after = [], dict(before)
    for name, (stage, loaded) in sorted(now_seen.items()):
        last = before.get(name)
        changed = last is None or last.stage != stage
        still_loading = (last is not None and stage == "loading" and loaded != last.loaded_bytes
                         and now - last.said_at >= every_s)
        if changed or still_loading:
            read = f" ({loaded / 1e6:,.1f} MB read)" if stage in ("loading", "serving") and loaded else ""
            out.append(f"moemesh up: {name} {WORDS.get(stage, stage)}{read}")
            after[name] = Seen(stage, loaded, now)
    return out, after


class StartupWatch:
    """Polls workers' metrics (`endpoints()`: name -> HOST:PORT) and says what changed through `say`."""

    def __init__(self, endpoints: Callable[[], dict[str, str]], say: Callable[[str], None], every_s: float = 2.0):
        self.endpoints, self.say, self.every_s = endpoints, say, every_s
        self.seen: dict[str, Seen] = {}
        self.polled_at = 0.0

    def poll(self) -> None:
        """At most every 0.5 s: `poll_now`."""
        if time.monotonic() - self.polled_at >= 0.5:
            self.poll_now()

    def poll_now(self) -> None:
        """Scrape, print the lines; an endpoint that does not answer is skipped."""
        now = self.polled_at = time.monotonic()
        current = {}
        for name, address in self.endpoints().items():
            try:
                samples = scrape(address, SCRAPE_TIMEOUT_S)
            except OSError:
                continue  # not up yet, or restarting: the next poll asks again
            stages = [k[0] for k, v in by_label(samples, "moemesh:worker_stage", "stage").items() if v]
            if stages:
                current[name] = (stages[0], value(samples, "moemesh:weights_loaded_bytes"))
        out, self.seen = lines(self.seen, current, now, self.every_s)
        for line in out:
            self.say(line)
