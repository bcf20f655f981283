"""Metrics.child: a labelled counter's increments are summed locally and reach prometheus_client when
the metrics are read, exactly once; histograms are observed at once."""

from __future__ import annotations

import pytest

from gateway.telemetry import Metrics, Tally


def _sample(m: Metrics, name: str, labels: dict[str, str]) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_counter_increments_are_read_once_each_across_scrapes() -> None:
    m = Metrics()
    requests = m.child(m.requests, "chat", "200")
    assert isinstance(requests, Tally) and m.child(m.requests, "chat", "200") is requests
    requests.inc()
    m.child(m.tokens, "chat", "prompt").inc(7)
    m.child(m.usage_cost, "acme", "chat", "m@sim").inc(0.25)
    assert b'strait_requests_total{route="chat",status="200"} 1.0' in m.render()
    assert _sample(m, "strait_tokens_total", {"route": "chat", "kind": "prompt"}) == 7
    assert _sample(m, "strait_usage_cost_usd_total", {"tenant": "acme", "route": "chat", "deployment": "m@sim"}) == 0.25
    m.render()  # nothing new: nothing added twice
    assert _sample(m, "strait_requests_total", {"route": "chat", "status": "200"}) == 1
    requests.inc(2)
    m.render()
    assert _sample(m, "strait_requests_total", {"route": "chat", "status": "200"}) == 3


def test_a_negative_increment_is_refused_like_prometheus_client_does() -> None:
    m = Metrics()
    with pytest.raises(ValueError):
        m.child(m.tokens, "chat", "prompt").inc(-1)
    m.render()
    assert _sample(m, "strait_tokens_total", {"route": "chat", "kind": "prompt"}) == 0


def test_histogram_children_observe_at_once() -> None:
    m = Metrics()
    m.child(m.latency, "chat").observe(0.003)
    assert _sample(m, "strait_request_duration_seconds_count", {"route": "chat"}) == 1
