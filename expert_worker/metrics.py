"""The worker's Prometheus metrics, read at scrape time from what the worker already keeps.

Nothing here runs on the engine thread: a scrape reads the engine's queues (running, waiting, KV
slots), the engine thread's own counters (steps, tokens, seconds in steps / collectives /
exchanges, hidden exchange seconds), and the load recorder's totals that the engine thread
publishes once per step (`MeshRunner.load_totals`: one small read-back, no per-token work).

Token copies per (layer, expert) count every copy this rank's router sent to an expert (the
tokens of this rank's requests, K copies each per MoE layer; so summed over experts a layer's
counter is K x `moemesh:step_tokens_total`). Link bytes are the token-copy payload this rank sent
in dispatch (src = this rank, one row of hidden state plus the expert id per copy) and got back
in combine (dst = this rank, one row of hidden state per copy), labelled by world ranks; the
fixed-capacity all-to-all buffers also carry padding rows, not counted here, and a copy to this
rank's own replica (src == dst) never leaves the process. Link totals of earlier world
generations are kept under the ranks they were counted with.

Collective bytes are what this rank's collectives actually sent to each peer (src = this rank):
every block of the fixed-capacity dispatch and combine buffers, padding rows included, and the
step header's share; this is what crosses the network (moemesh.launch.netns compares it with the
kernel's interface counters), where link bytes are the payload the planner's cost model prices.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from expert_worker.servicer import MeshMember
from moemesh.mesh.routing_counts import LoadTotals
from moemesh.metrics import MODEL_LABEL, PREFIX
from moemesh.model.checkpoint import CheckpointReader

Link = tuple[int, int]  # (source rank, destination rank)


class LinkBytes:
    """Bytes per link over every world generation: earlier worlds' final totals plus the current one's."""

    def __init__(self) -> None:
        self._closed: dict[Link, int] = {}
        self._current: LoadTotals | None = None
        self._lock = threading.Lock()

    def update(self, totals: LoadTotals | None, dispatch_row: int, combine_row: int) -> dict[Link, int]:
        """Bytes per (src, dst) with `totals` the newest; `*_row` are the bytes of one token copy each way."""
        with self._lock:
            current = self._current
            if totals is not None and current is not None and totals.generation != current.generation:
                _add(self._closed, _links(current, dispatch_row, combine_row))
            if totals is not None:
                self._current = current = totals
            out = dict(self._closed)
            if current is not None:
                _add(out, _links(current, dispatch_row, combine_row))
            return out


def _links(t: LoadTotals, dispatch_row: int, combine_row: int) -> dict[Link, int]:
    copies = t.link_counts.sum(dim=0).tolist()  # (R,) copies sent to each rank, all layers
    out: dict[Link, int] = {}
    for dst, n in enumerate(copies):
        _add(out, {(t.rank, dst): n * dispatch_row})
        _add(out, {(dst, t.rank): n * combine_row})
    return out


def _add(into: dict[Link, int], more: dict[Link, int]) -> None:
    for key, n in more.items():
        into[key] = into.get(key, 0) + n


# A worker's start-up, in order: registering with the coordinator, waiting for a world that lists it,
# loading its weights and joining the world's communicator, serving.
STAGES = ("starting", "registering", "waiting", "loading", "serving")


class WorkerMetrics(Collector):
    """`moemesh:*` series of one worker; nothing but the world generation until it joined a world."""

    def __init__(self, model_name: str):
        self.model = model_name
        self.node: MeshMember | None = None
        self.stage = "starting"  # one of STAGES: where start-up is (`moemesh up` shows it)
        self.reader: CheckpointReader | None = None  # its bytes_read while the weights load
        self._links = LinkBytes()

    def at(self, stage: str) -> None:
        assert stage in STAGES, stage
        self.stage = stage

    def loading(self, reader: CheckpointReader) -> None:
        self.reader, self.stage = reader, "loading"

    def attach(self, node: MeshMember) -> None:
        self.node, self.stage = node, "serving"

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stage = GaugeMetricFamily(f"{PREFIX}worker_stage", "1 for the start-up stage this worker is in: "
                                  + ", ".join(STAGES) + ".", labels=[MODEL_LABEL, "stage"])
        stage.add_metric([self.model, self.stage], 1)
        yield stage
        yield self._gauge("weights_loaded_bytes", "Checkpoint bytes this worker has read (dense part, its experts).",
                          self.reader.bytes_read if self.reader is not None else 0)
        node = self.node
        if node is None:
            yield self._gauge("world_generation", "World generation this worker serves (0 = none yet).", 0)
            return
        runner, engine = node.runner, node.engine
        slots = engine.model.runtime.max_seqs
        yield self._gauge("num_requests_running", "Number of requests in model execution batches.",
                          engine.num_running)
        yield self._gauge("num_requests_waiting", "Number of requests waiting to be processed.", engine.num_waiting)
        yield self._gauge("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                          (slots - engine.free_slots) / slots)
        yield self._gauge("kv_slots_used", "KV-cache slots (one per running sequence) in use.",
                          slots - engine.free_slots)
        yield self._gauge("kv_slots_total", "KV-cache slots of this worker (--max-seqs).", slots)
        yield self._gauge("world_generation", "World generation this worker serves (or last served).",
                          runner.generation)
        yield self._gauge("placement_epoch", "Placement epoch the engine runs.", runner.epoch)
        yield self._gauge("loaded_epoch", "Newest placement epoch loaded on this worker.", runner.loaded_epoch)
        yield self._counter("steps", "Engine steps executed (every rank steps in lockstep).", runner.steps)
        yield self._counter("step_tokens", "Tokens through this rank's forward pass (prompt and decode).",
                            runner.tokens)
        yield self._counter("step_seconds", "Wall time of executed steps, step header included.", runner.step_seconds)
        yield self._counter("collective_seconds", "Part of step_seconds blocked on collectives (header and "
                            "exchanges).", runner.collective_seconds)
        yield self._counter("exchange_seconds", "Dispatch/combine exchanges in flight, summed over exchanges.",
                            runner.exchange_seconds)
        yield self._counter("exchange_hidden_seconds", "Part of exchange_seconds overlapped with compute.",
                            runner.hidden_seconds)
        yield self._counter("worlds_lost", "World generations this worker left because a collective broke.",
                            runner.worlds_lost)
        yield from self._load(node)

    def _load(self, node: MeshMember) -> Iterator[CounterMetricFamily]:
        totals = node.runner.load_totals
        recorder = node.runner.recorder
        routed = CounterMetricFamily(f"{PREFIX}expert_tokens_routed", "Token copies this rank routed to each "
                                     "(MoE layer, expert).", labels=[MODEL_LABEL, "layer", "expert"])
        if totals is not None and recorder is not None:
            for row, layer in enumerate(recorder.layer_order):
                for expert, n in enumerate(totals.expert_counts[row].tolist()):
                    routed.add_metric([self.model, str(layer), str(expert)], n)
        yield routed
        cfg, runtime = node.engine.model.cfg, node.engine.model.runtime
        element = runtime.dtype.itemsize
        links = self._links.update(totals, (cfg.hidden_size + 1) * element, cfg.hidden_size * element)
        sent = CounterMetricFamily(f"{PREFIX}link_bytes", "Token-copy payload bytes this rank's dispatches and "
                                   "combines moved over each (source rank, destination rank) link.",
                                   labels=[MODEL_LABEL, "src_rank", "dst_rank"])
        for (src, dst), n in sorted(links.items()):
            sent.add_metric([self.model, str(src), str(dst)], n)
        yield sent
        wire = CounterMetricFamily(f"{PREFIX}collective_bytes", "Bytes this rank's collectives sent to each peer "
                                   "rank: dispatch/combine blocks with their padding rows, and step headers.",
                                   labels=[MODEL_LABEL, "src_rank", "dst_rank"])
        for (src, dst), n in sorted(dict(node.runner.bytes_sent).items()):
            wire.add_metric([self.model, str(src), str(dst)], n)
        yield wire

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(f"{PREFIX}{name}", doc, labels=[MODEL_LABEL])
        family.add_metric([self.model], value)
        return family

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(f"{PREFIX}{name}", doc, labels=[MODEL_LABEL])
        family.add_metric([self.model], value)
        return family
