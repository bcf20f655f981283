"""The console's "over the last hour": once a minute this replica's counters and histogram buckets that the
overview and the live alerts read (the same numbers /metrics shows) are copied into a ring of 61 snapshots.
A figure over a window is a difference: the counters now minus the oldest snapshot inside the window, as
Prometheus's increase() over the window would give (without its extrapolation); before the replica has run
that long, the counters as they are (since it started), and the window says which one it is. Percentiles
come from the bucket differences (metrics_view.quantile, as histogram_quantile over rate()).

The tier chart's points are the same snapshots two by two: a point is the difference between two samples,
and the minute under way the difference between the last sample and now."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Literal

import msgspec

from gateway.api.console.metrics_view import Samples
from gateway.telemetry import Metrics

INTERVAL_S = 60.0
# Samples kept: an hour of minutes, and the one before the first point.
KEEP = 61
HOUR_S = 3600.0
# What a snapshot keeps: the cumulative series the overview, the alerts and the learning loop read.
WATCHED = (
    "strait_requests_total",
    "strait_served_requests_total",
    "strait_served_cost_usd_total",
    "strait_usage_cost_usd_total",
    "strait_cache_lookups_total",
    "strait_refusals_total",
    "strait_request_duration_seconds_bucket",
    "strait_request_duration_seconds_count",
    "strait_time_to_first_token_seconds_bucket",
    "strait_time_to_first_token_seconds_count",
    "strait_limits_degraded_total",
    "strait_state_resets_total",
    "strait_shed_total",
    "strait_capture_records_total",
    "strait_shadow_requests_total",
)


class SpillPoint(msgspec.Struct, kw_only=True):
    # The end of the interval (Unix seconds) and its answers by tier; `spilled`: those spillover sent past a full backend.
    ts: float
    by_tier: dict[str, int]
    spilled: int


class Window(msgspec.Struct, kw_only=True):
    """Which stretch of time a windowed figure covers. `kind`: "window" (the asked span, measured from the oldest
    snapshot inside it) or "since_start" (the replica has not run that long: everything it counted)."""

    kind: Literal["window", "since_start"]
    # Unix seconds at the window's start (None: not known, no sample was ever taken) and its length.
    since: float | None
    seconds: float | None
    asked_s: float


def _totals(samples: Samples) -> tuple[dict[str, int], int]:
    by_tier: dict[str, int] = defaultdict(int)
    spilled = 0
    for labels, value in samples.rows("strait_served_requests_total"):
        by_tier[labels["tier"]] += int(value)
        if labels.get("spilled") == "true":
            spilled += int(value)
    return dict(by_tier), spilled


class MetricHistory:
    def __init__(
        self, metrics: Metrics, *, interval_s: float = INTERVAL_S, clock: Callable[[], float] = time.time
    ) -> None:
        self.metrics = metrics
        self.interval_s = interval_s
        self.clock = clock
        self._samples: deque[tuple[float, Samples]] = deque(maxlen=KEEP)
        # When the first sample was taken (at start-up: the counters were then about zero).
        self.started: float | None = None
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        ts = self.clock()
        if self.started is None:
            self.started = ts
        self._samples.append((ts, Samples(self.metrics).only(WATCHED)))

    def read(self, span_s: float = HOUR_S, current: Samples | None = None) -> tuple[Window, Samples]:
        """The counters' increase over the last `span_s` (at most the ring's hour), and which window that is.
        `current`: a read of the registry to use for "now" (one read serves every window of a page)."""
        now = self.clock()
        current = Samples(self.metrics) if current is None else current
        if self.started is None or now - self.started < span_s:
            started = self.started
            return Window(
                kind="since_start",
                since=started,
                seconds=None if started is None else now - started,
                asked_s=span_s,
            ), current
        inside = [(ts, s) for ts, s in self._samples if ts >= now - span_s]
        # None inside (the sampler was held up past the span): the newest there is, and the window says how long.
        ts, earlier = inside[0] if inside else self._samples[-1]
        return Window(kind="window", since=ts, seconds=now - ts, asked_s=span_s), current.minus(earlier)

    def points(self) -> list[SpillPoint]:
        """Oldest first; the last point is the interval under way (up to now)."""
        if not self._samples:
            return []
        samples = [*self._samples, (self.clock(), Samples(self.metrics).only(WATCHED))]
        out = []
        for (_, before_s), (ts, after_s) in itertools.pairwise(samples):
            before, spilled_before = _totals(before_s)
            after, spilled_after = _totals(after_s)
            by_tier = {tier: n - before.get(tier, 0) for tier, n in sorted(after.items())}
            out.append(
                SpillPoint(
                    ts=ts, by_tier={t: n for t, n in by_tier.items() if n > 0}, spilled=spilled_after - spilled_before
                )
            )
        return out

    async def start(self) -> None:
        self.sample()
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.sample()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
