"""The per-layer timeline of one forward step: compute and communication on two resources. Pure.

Each micro-batch runs, layer after layer, its stages in order: attention (compute), dispatch
(network), shared (compute: the shared experts, layers that have them), experts (compute), combine
(network). A device computes one thing at a time and its network moves one exchange at a time;
different micro-batches may use the two at once, which is how communication hides behind compute
(the paper's layer-wise pipelining; DeepSeek's two-batch overlap). The shared experts need only
the attention's output, so they run while their own micro-batch's dispatch flies (as
`MoELayer.stages` computes them after posting the dispatch), and the routed experts wait for both.
`schedule` is a greedy list scheduler: whichever next stage of any micro-batch can start earliest
runs first (ties: lower layer, then lower micro-batch). With one micro-batch the step is the plain
sum, except that a layer's shared experts and dispatch overlap: attention + max(dispatch, shared)
+ experts + combine.

Hidden share = 1 - exposed / total communication, where exposed communication is the time the
compute resource sits idle (makespan - busy compute time).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

STAGES = ("attention", "dispatch", "shared", "experts", "combine")
RESOURCE = {"attention": "compute", "dispatch": "network", "shared": "compute", "experts": "compute",
            "combine": "network"}
# what each stage of a layer waits for, in the same micro-batch (besides its resource); attention
# waits for the previous layer's last stage
AFTER = {"dispatch": ("attention",), "shared": ("attention",), "experts": ("dispatch", "shared"),
         "combine": ("experts",)}


@dataclass(frozen=True)
class StageTimes:
    """Seconds one micro-batch spends in each stage of one layer (slowest device: lockstep)."""

    attention_s: float
    dispatch_s: float
    experts_s: float
    combine_s: float
    shared_s: float = 0.0  # shared experts: compute that overlaps this layer's dispatch

    def of(self, stage: str) -> float:
        return getattr(self, f"{stage}_s")

    @property
    def compute_s(self) -> float:
        return self.attention_s + self.shared_s + self.experts_s

    @property
    def comm_s(self) -> float:
        return self.dispatch_s + self.combine_s


@dataclass(frozen=True)
class Interval:
    layer: int  # index into the scheduled layers (0-based)
    micro: int
    stage: str
    start_s: float
    end_s: float

    @property
    def resource(self) -> str:
        return RESOURCE[self.stage]


@dataclass(frozen=True)
class Timeline:
    intervals: tuple[Interval, ...]
    layers: int
    micro_batches: int

    @property
    def makespan_s(self) -> float:
        return max((iv.end_s for iv in self.intervals), default=0.0)

    def _busy(self, resource: str, layer: int | None = None) -> float:
        return sum(iv.end_s - iv.start_s for iv in self.intervals
                   if iv.resource == resource and (layer is None or iv.layer == layer))

    @property
    def compute_s(self) -> float:
        """Busy compute time, all layers and micro-batches."""
        return self._busy("compute")

    @property
    def comm_s(self) -> float:
        """Busy network time, all layers and micro-batches."""
        return self._busy("network")

    @property
    def exposed_comm_s(self) -> float:
        """Time the compute resource idles, waiting on exchanges."""
        return max(0.0, self.makespan_s - self.compute_s)

    @property
    def hidden_share(self) -> float | None:
        """Share of communication hidden behind compute; None when there is none."""
        comm = self.comm_s
        return None if comm <= 0 else min(1.0, max(0.0, 1.0 - self.exposed_comm_s / comm))

    def layer_end_s(self, layer: int) -> float:
        return max(iv.end_s for iv in self.intervals if iv.layer == layer)

    def layer_span_s(self, layer: int) -> float:
        """Wall time the step spends on `layer`: from the previous layer's end to this one's."""
        return self.layer_end_s(layer) - (self.layer_end_s(layer - 1) if layer else 0.0)

    def layer_hidden_share(self, layer: int) -> float | None:
        comm = self._busy("network", layer)
        if comm <= 0:
            return None
        exposed = max(0.0, self.layer_span_s(layer) - self._busy("compute", layer))
        return min(1.0, max(0.0, 1.0 - exposed / comm))

    def stage_s(self, layer: int, stage: str) -> float:
        """Busy seconds of `stage` in `layer`, summed over micro-batches."""
        return sum(iv.end_s - iv.start_s for iv in self.intervals if iv.layer == layer and iv.stage == stage)


def schedule(layers: Sequence[StageTimes], micro_batches: int = 1) -> Timeline:
    """Schedule `micro_batches` identical micro-batches (each with `layers[l]` stage times); a
    layer without shared experts has no shared stage."""
    tasks = [(l, stage) for l in range(len(layers)) for stage in STAGES
             if stage != "shared" or layers[l].shared_s > 0]
    next_task = [0] * micro_batches
    done: list[dict[tuple[int, str], float]] = [{} for _ in range(micro_batches)]  # end of each stage
    last = [0.0] * micro_batches  # end of the micro-batch's previous layer
    free = {"compute": 0.0, "network": 0.0}
    out: list[Interval] = []
    while True:
        best = None
        for m in range(micro_batches):
            if next_task[m] == len(tasks):
                continue
            l, stage = tasks[next_task[m]]
            ready = max((done[m].get((l, s), 0.0) for s in AFTER[stage]), default=0.0) if stage in AFTER else last[m]
            start = max(ready, free[RESOURCE[stage]])
            key = (start, l, m)
            if best is None or key < best[0]:
                best = (key, m, l, stage)
        if best is None:
            break
        (start, _, _), m, l, stage = best
        end = start + layers[l].of(stage)
        out.append(Interval(l, m, stage, start, end))
        free[RESOURCE[stage]] = done[m][(l, stage)] = end
        if stage == "combine":
            last[m] = end
        next_task[m] += 1
    return Timeline(tuple(out), len(layers), micro_batches)
