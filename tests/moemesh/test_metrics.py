"""moemesh.metrics: a registry per service served over real HTTP, scraped and parsed back."""

from __future__ import annotations

import socket
import urllib.error

import pytest
from prometheus_client import Counter, Gauge

from moemesh.errors import ConfigError
from moemesh.metrics import (
    METRICS_OFF,
    MODEL_LABEL,
    buckets_1_2_5,
    by_label,
    check_metrics_port,
    model_name,
    new_registry,
    scrape,
    serve_metrics,
    value,
)


def test_two_registries_in_one_process_are_served_apart():
    first, second = new_registry(), new_registry()
    Counter("moemesh:things", "things", [MODEL_LABEL], registry=first).labels("m1").inc(3)
    Counter("moemesh:things", "things", [MODEL_LABEL], registry=second).labels("m2").inc(5)  # same name, no clash
    servers = [serve_metrics(r, "127.0.0.1", 0) for r in (first, second)]
    try:
        assert all(s is not None and s.port > 0 for s in servers)
        a, b = (scrape(s.address) for s in servers if s is not None)
        assert value(a, "moemesh:things_total") == 3 and value(a, "moemesh:things_total", model_name="m1") == 3
        assert value(b, "moemesh:things_total") == 5 and value(b, "moemesh:things_total", model_name="m1") == 0
    finally:
        for s in servers:
            if s is not None:
                s.stop()


def test_stop_frees_the_port_and_a_scrape_then_fails_cleanly():
    registry = new_registry()
    Gauge("moemesh:level", "level", [MODEL_LABEL, "rank"], registry=registry).labels("m", "1").set(7)
    server = serve_metrics(registry, "127.0.0.1", 0)
    assert server is not None
    samples = scrape(server.address)
    assert by_label(samples, "moemesh:level", "rank") == {("1",): 7.0}
    server.stop()
    with pytest.raises(urllib.error.URLError):
        scrape(server.address, timeout_s=2.0)
    with socket.socket() as probe:  # nobody listens on the port any more (TIME_WAIT of the scrape aside)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", server.port))


def test_off_serves_nothing_and_a_taken_port_is_an_error():
    assert serve_metrics(new_registry(), "127.0.0.1", METRICS_OFF) is None
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError):
            serve_metrics(new_registry(), "127.0.0.1", taken.getsockname()[1])


def test_port_checks():
    for ok in (METRICS_OFF, 0, 9400, 65535):
        check_metrics_port(ok)
    for bad in (-2, 65536):
        with pytest.raises(ConfigError, match="--metrics-port"):
            check_metrics_port(bad)


def test_vllm_token_buckets_and_model_name(tmp_path):
    assert buckets_1_2_5(100) == (1, 2, 5, 10, 20, 50, 100)
    assert buckets_1_2_5(2048)[-1] == 2000
    assert model_name(tmp_path / "tiny-moe") == "tiny-moe"
