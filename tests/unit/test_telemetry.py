"""Metrics.child: a labelled counter's increments are summed locally and reach prometheus_client when
the metrics are read, exactly once; a histogram's observations likewise, per bucket."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.telemetry import Metrics, Spread, Tally


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


def test_histogram_children_count_per_bucket_and_reach_prometheus_when_read() -> None:
    m = Metrics()
    latency = m.child(m.latency, "chat")
    assert isinstance(latency, Spread) and m.child(m.latency, "chat") is latency
    latency.observe(0.003)
    m.render()
    assert _sample(m, "strait_request_duration_seconds_count", {"route": "chat"}) == 1
    m.render()  # nothing new: nothing added twice
    assert _sample(m, "strait_request_duration_seconds_count", {"route": "chat"}) == 1
    assert _sample(m, "strait_request_duration_seconds_sum", {"route": "chat"}) == pytest.approx(0.003)


# Bucket bounds, values just around them, zero, negatives and values past the last finite bound.
_AMOUNTS = st.one_of(
    st.floats(min_value=-1.0, max_value=1e6, allow_nan=False),
    st.sampled_from([0.0, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]),
)


@given(st.lists(st.lists(_AMOUNTS, max_size=30), min_size=1, max_size=4))
def test_a_spread_reads_as_prometheus_client_observing_each_value(batches: list[list[float]]) -> None:
    """Observed through `Spread` and folded between batches (scrapes), every bucket, the count and the sum
    read exactly as prometheus_client's own `observe` of each value would make them."""
    ours, theirs = Metrics(), Metrics()
    for batch in batches:
        for amount in batch:
            ours.child(ours.latency, "chat").observe(amount)
            theirs.latency.labels("chat").observe(amount)
        ours.render()
    mine = {(s.name, s.labels.get("le")): s.value for f in ours.latency.collect() for s in f.samples}
    real = {(s.name, s.labels.get("le")): s.value for f in theirs.latency.collect() for s in f.samples}
    assert mine.keys() == real.keys()
    for key, value in real.items():
        if key[0].endswith("_created"):
            continue
        assert mine[key] == pytest.approx(value), key
