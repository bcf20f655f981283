"""The overview's "over time": this replica's answers by serving tier (and how many spilled), per minute over
the last hour. A sample of the counters (strait_served_requests_total, the same numbers /metrics shows) is taken
once a minute; a point is the difference between two samples, and the minute under way is the difference
between the last sample and now."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import defaultdict, deque
from collections.abc import Callable

import msgspec

from gateway.api.console.metrics_view import Samples
from gateway.telemetry import Metrics

INTERVAL_S = 60.0
# Samples kept: an hour of minutes, and the one before the first point.
KEEP = 61


class SpillPoint(msgspec.Struct, kw_only=True):
    # The end of the interval (Unix seconds) and its answers by tier; `spilled`: those spillover sent past a full backend.
    ts: float
    by_tier: dict[str, int]
    spilled: int


def _totals(metrics: Metrics) -> tuple[dict[str, int], int]:
    by_tier: dict[str, int] = defaultdict(int)
    spilled = 0
    for labels, value in Samples(metrics).rows("strait_served_requests_total"):
        by_tier[labels["tier"]] += int(value)
        if labels.get("spilled") == "true":
            spilled += int(value)
    return dict(by_tier), spilled


class SpillHistory:
    def __init__(
        self, metrics: Metrics, *, interval_s: float = INTERVAL_S, clock: Callable[[], float] = time.time
    ) -> None:
        self.metrics = metrics
        self.interval_s = interval_s
        self.clock = clock
        self._samples: deque[tuple[float, dict[str, int], int]] = deque(maxlen=KEEP)
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        by_tier, spilled = _totals(self.metrics)
        self._samples.append((self.clock(), by_tier, spilled))

    def points(self) -> list[SpillPoint]:
        """Oldest first; the last point is the interval under way (up to now)."""
        if not self._samples:
            return []
        now_tier, now_spilled = _totals(self.metrics)
        samples = [*self._samples, (self.clock(), now_tier, now_spilled)]
        out = []
        for (_, before, spilled_before), (ts, after, spilled_after) in itertools.pairwise(samples):
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
