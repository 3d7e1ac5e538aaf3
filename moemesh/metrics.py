"""Prometheus metrics: what every service shares (a registry, the model label, serving, scraping).

Each service defines its own metrics in its folder (gateway/metrics.py, expert_worker/metrics.py,
coordinator/metrics.py) on a registry of its own (`new_registry`), never prometheus_client's
global default one: tests run several services in one process. Names follow vLLM's
(vllm/v1/metrics/loggers.py) where one exists, with the prefix `moemesh:` instead of `vllm:`, and
every series carries the `model_name` label (the checkpoint folder's name, `model_name`).

`serve_metrics` serves a registry with prometheus_client's own HTTP server on a thread, bound to
the service's --host (port 0 = any free port; `MetricsServer.port` is the one bound);
`MetricsServer.stop` shuts it down and joins its thread. `scrape` is the reading side (tests and
`moemesh top`): one HTTP GET with a timeout, parsed with prometheus_client's text parser.
"""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from moemesh.errors import ConfigError

PREFIX = "moemesh:"
MODEL_LABEL = "model_name"
METRICS_OFF = -1  # --metrics-port value that turns the endpoint off
METRICS_PORT_HELP = ("port of the Prometheus metrics endpoint (GET /metrics), bound to --host; 0 = any free port, "
                     "-1 = off")
STOP_TIMEOUT_S = 5.0  # hang bound on joining the server thread

# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)


def new_registry() -> CollectorRegistry:
    """A registry of one service (never the process-global default one)."""
    return CollectorRegistry()


def model_name(model_dir: str | Path) -> str:
    """The `model_name` label: the checkpoint folder's name (what ModelSpec.name says)."""
    return Path(model_dir).resolve().name


def buckets_1_2_5(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `max_value` (vLLM's token-count buckets)."""
    out: list[int] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


@dataclass
class MetricsServer:
    """A registry served over HTTP on a thread; `address` is HOST:PORT as bound."""

    host: str
    port: int
    _httpd: WSGIServer
    _thread: threading.Thread

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        """Stop serving, close the socket, join the thread (blocks up to the server's 0.5 s poll)."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(STOP_TIMEOUT_S)


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> MetricsServer | None:
    """Serve `registry` at http://host:port/metrics (port 0 = any free port); None when `port` is
    METRICS_OFF. OSError when the port is taken: a metrics port that was asked for must not
    silently go missing."""
    if port == METRICS_OFF:
        return None
    httpd, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(host, int(httpd.server_port), httpd, thread)


def check_metrics_port(port: int) -> None:
    """ConfigError unless `port` is METRICS_OFF or a TCP port (settings call it in __post_init__)."""
    if port != METRICS_OFF and not 0 <= port < 65536:
        raise ConfigError(f"--metrics-port must be in 0..65535 or {METRICS_OFF} (off), got {port}")


# ---- the reading side ------------------------------------------------------------------------------


def scrape(address: str, timeout_s: float = 5.0) -> list[Sample]:
    """Every sample served at http://address/metrics (one GET, `timeout_s`); OSError when unreachable."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout_s) as reply:
        text = reply.read().decode("utf-8")
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(samples: Iterable[Sample], name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels` (0 when none)."""
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def by_label(samples: Iterable[Sample], name: str, *keys: str) -> dict[tuple[str, ...], float]:
    """Samples named `name`, summed per the values of the labels `keys`."""
    out: dict[tuple[str, ...], float] = {}
    for s in samples:
        if s.name == name:
            key = tuple(s.labels.get(k, "") for k in keys)
            out[key] = out.get(key, 0.0) + s.value
    return out
