"""The coordinator's Prometheus metrics, read at scrape time from `CoordinatorState`.

The state runs on one event loop without locks; a scrape (on the metrics server's thread) reads
only its integer counters and the sizes of tuples it replaces whole, never a container the loop
mutates in place.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from coordinator.state import CoordinatorState
from moemesh.metrics import MODEL_LABEL, PREFIX


class CoordinatorMetrics(Collector):
    """`moemesh:*` series of one coordinator."""

    def __init__(self, state: CoordinatorState, model: str):
        self.state, self.model = state, model

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self.state
        world = s.world
        yield self._metric(GaugeMetricFamily, "world_generation", "Newest world generation formed (0 = none yet).",
                           world.generation if world is not None else 0)
        yield self._metric(GaugeMetricFamily, "placement_epoch", "Newest placement epoch published.",
                           s.newest_epoch)
        yield self._metric(GaugeMetricFamily, "world_members", "Members of the newest world.",
                           world.size if world is not None else 0)
        yield self._metric(GaugeMetricFamily, "world_servable", "1 when the newest world can serve, else 0.",
                           int(world is not None and not world.unservable_reason))
        yield self._metric(CounterMetricFamily, "world_generations", "World generations formed.",
                           s.generations_formed)
        yield self._metric(CounterMetricFamily, "recoveries", "World generations formed because a member was lost "
                           "or the data plane broke.", s.recoveries)
        yield self._metric(CounterMetricFamily, "evictions", "Workers evicted (dead or silent).", s.evictions)
        yield self._metric(CounterMetricFamily, "rebalances", "Placement epochs published by the balancing policy.",
                           s.rebalances)
        yield self._metric(CounterMetricFamily, "expert_bytes_moved", "Expert weight bytes workers loaded for "
                           "placement epochs published within a world (rebalances, operator placements, levelling "
                           "after a recovery).", s.bytes_moved)

    def _metric(self, kind, name: str, doc: str, value: float):
        family = kind(f"{PREFIX}{name}", doc, labels=[MODEL_LABEL])
        family.add_metric([self.model], value)
        return family
