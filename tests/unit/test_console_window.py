"""The console's "last hour": the snapshot ring under a fake clock (no sleeps), the window it reports, and
percentiles from bucket differences against a reference histogram_quantile over the window's own observations."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.api.console.history import KEEP, MetricHistory, Window
from gateway.api.console.metrics_view import Samples, quantile, route_figures
from gateway.api.console.pages import window_label
from gateway.telemetry import Metrics

TTFT_BOUNDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, math.inf)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _requests(samples: Samples, route: str) -> float:
    return sum(v for labels, v in samples.rows("strait_requests_total") if labels["route"] == route)


def test_before_an_hour_the_window_is_since_start_then_the_last_hour() -> None:
    metrics = Metrics()
    clock = Clock(10_000.0)
    history = MetricHistory(metrics, clock=clock)
    history.sample()  # at start-up
    ok = metrics.child(metrics.requests, "chat", "200")
    # One request in each minute, 100 minutes long; a sample at the end of every minute.
    per_minute = []
    for minute in range(1, 101):
        ok.inc(minute)  # a different count each minute: a wrong baseline cannot give the right sum by chance
        per_minute.append(minute)
        clock.now = 10_000.0 + 60 * minute
        history.sample()
        clock.now += 30  # half a minute into the next one
        window, samples = history.read()
        if minute < 60:
            assert window.kind == "since_start" and window.since == 10_000.0
            assert window.seconds == 60 * minute + 30
            assert _requests(samples, "chat") == sum(per_minute)
        else:
            # The oldest sample inside the hour is 59 minutes (and 30 s) back: its minute and those before are out.
            assert window.kind == "window" and window.seconds == 59 * 60 + 30
            assert _requests(samples, "chat") == sum(per_minute[-59:])
    assert len(history._samples) == KEEP


def test_a_shorter_span_and_a_series_born_inside_the_window() -> None:
    metrics = Metrics()
    clock = Clock(0.0)
    history = MetricHistory(metrics, clock=clock)
    for minute in range(0, 70):
        clock.now = 60.0 * minute
        history.sample()
        if minute == 65:
            metrics.child(metrics.requests, "new", "503").inc(4)
    clock.now = 60.0 * 69 + 10
    window, samples = history.read(300)
    assert window.kind == "window" and window.seconds == 250
    assert _requests(samples, "new") == 4  # absent from the baseline: counted from 0
    figures = {f.route: f for f in route_figures(samples, ["chat"])}
    assert figures["chat"].requests == 0 and figures["new"].errors == 4


def test_a_held_up_sampler_still_gives_a_window_that_says_how_long_it_is() -> None:
    metrics = Metrics()
    clock = Clock(0.0)
    history = MetricHistory(metrics, clock=clock)
    history.sample()
    clock.now = 100.0
    history.sample()
    metrics.child(metrics.requests, "chat", "200").inc(2)
    clock.now = 100.0 + 7200  # two hours with no sample
    window, samples = history.read()
    assert window.kind == "window" and window.seconds == 7200
    assert _requests(samples, "chat") == 2


def _reference_quantile(q: float, observations: list[float]) -> float | None:
    """histogram_quantile written from Prometheus's description, on per-bucket (not cumulative) counts of the
    window's own observations: the rank's bucket, linear inside it, the open bucket's lower edge."""
    if not observations:
        return None
    counts = [
        sum(1 for v in observations if (lo < v <= hi))
        for lo, hi in zip((0.0, *TTFT_BOUNDS[:-1]), TTFT_BOUNDS, strict=True)
    ]
    rank = q * len(observations)
    seen = 0
    for i, n in enumerate(counts):
        lo = 0.0 if i == 0 else TTFT_BOUNDS[i - 1]
        hi = TTFT_BOUNDS[i]
        if seen + n >= rank:
            if math.isinf(hi):
                return lo
            if n == 0:
                return hi
            return lo + (hi - lo) * (rank - seen) / n
        seen += n
    return TTFT_BOUNDS[-2]


observation = st.floats(min_value=0.001, max_value=60, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(st.lists(observation, max_size=60), st.lists(observation, max_size=60), st.sampled_from([0.5, 0.95, 0.99]))
def test_percentiles_of_the_window_are_those_of_its_observations_alone(
    before: list[float], during: list[float], q: float
) -> None:
    metrics = Metrics()
    clock = Clock(0.0)
    history = MetricHistory(metrics, clock=clock)
    history.sample()
    ttft = metrics.ttft.labels("chat")
    for v in before:
        ttft.observe(v)
    for minute in range(1, 62):
        clock.now = 60.0 * minute
        history.sample()
    for v in during:  # after every sample older than the hour has left the ring
        ttft.observe(v)
    clock.now += 30
    window, samples = history.read()
    assert window.kind == "window"
    figures = route_figures(samples, ["chat"])[0]
    assert figures.ttft.count == len(during)
    want = _reference_quantile(q, during)
    got = quantile(
        q,
        [
            (float(labels["le"]), value)
            for labels, value in samples.rows("strait_time_to_first_token_seconds_bucket")
            if labels["route"] == "chat"
        ],
    )
    if want is None:
        assert got is None
    else:
        assert got is not None and math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12)


def test_the_page_says_which_window_it_shows() -> None:
    assert window_label(Window(kind="window", since=0.0, seconds=3570.0, asked_s=3600.0)) == "over the last hour"
    assert window_label(Window(kind="window", since=0.0, seconds=7200.0, asked_s=3600.0)) == "over the last 120 min"
    assert window_label(Window(kind="since_start", since=0.0, seconds=750.0, asked_s=3600.0)) == (
        "since this replica started (12 min ago)"
    )
    assert window_label(Window(kind="since_start", since=None, seconds=None, asked_s=3600.0)) == (
        "since this replica started"
    )
