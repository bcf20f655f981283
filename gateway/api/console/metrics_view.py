"""The console's figures from the gateway's own Prometheus registry (the numbers GET /metrics shows), since
this replica started: requests and errors, latency and time-to-first-token percentiles per route (estimated
from the histogram buckets as PromQL's histogram_quantile does), spillover by tier, cache hit rate."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping

import msgspec

from gateway.telemetry import Metrics

QUANTILES = (0.5, 0.95, 0.99)


class Percentiles(msgspec.Struct, kw_only=True):
    count: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None


class RouteFigures(msgspec.Struct, kw_only=True):
    route: str
    requests: int
    errors: int
    by_status: dict[str, int]
    latency: Percentiles
    ttft: Percentiles
    # Answers by the serving deployment's tier, and how many spillover sent past a full backend.
    served_by_tier: dict[str, int]
    spilled: int
    cache_hits: int
    cache_lookups: int


class Samples:
    """One read of the registry: (metric sample name, labels) -> value."""

    def __init__(self, metrics: Metrics) -> None:
        metrics.fold()
        self.values: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
        for family in metrics.registry.collect():
            for sample in family.samples:
                self.values[sample.name].append((sample.labels, sample.value))

    def by(self, name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for labels, value in self.values.get(name, ()):
            out[labels.get(label, "")] += value
        return out

    def rows(self, name: str) -> list[tuple[dict[str, str], float]]:
        return self.values.get(name, [])


def quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """histogram_quantile over cumulative (upper bound, count) buckets, +Inf last; None when empty."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    total = ordered[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # in the open bucket: its lower edge, as Prometheus answers
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def _percentiles(samples: Samples, name: str, route: str) -> Percentiles:
    buckets: dict[float, float] = defaultdict(float)
    for labels, value in samples.rows(f"{name}_bucket"):
        if labels.get("route") == route:
            buckets[float(labels["le"])] += value
    count = int(sum(v for labels, v in samples.rows(f"{name}_count") if labels.get("route") == route))
    p = [quantile(q, buckets.items()) for q in QUANTILES]
    ms = [None if v is None else round(v * 1000, 1) for v in p]
    return Percentiles(count=count, p50_ms=ms[0], p95_ms=ms[1], p99_ms=ms[2])


def route_figures(metrics: Metrics, routes: Iterable[str]) -> list[RouteFigures]:
    """Every route of the policy, and any other route label the registry holds (an older policy's)."""
    samples = Samples(metrics)
    status: dict[str, dict[str, int]] = defaultdict(dict)
    for labels, value in samples.rows("strait_requests_total"):
        status[labels["route"]][labels["status"]] = int(value)
    tiers: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    spilled: dict[str, int] = defaultdict(int)
    for labels, value in samples.rows("strait_served_requests_total"):
        tiers[labels["route"]][labels["tier"]] += int(value)
        if labels["spilled"] == "true":
            spilled[labels["route"]] += int(value)
    hits: dict[str, int] = defaultdict(int)
    lookups: dict[str, int] = defaultdict(int)
    for labels, value in samples.rows("strait_cache_lookups_total"):
        result = labels["result"]
        if result in ("hit", "semantic_hit"):
            hits[labels["route"]] += int(value)
        if result in ("hit", "semantic_hit", "miss"):  # every other result is also counted as a miss
            lookups[labels["route"]] += int(value)
    names = list(dict.fromkeys([*routes, *sorted(status)]))
    out = []
    for route in names:
        by_status = dict(sorted(status.get(route, {}).items()))
        out.append(
            RouteFigures(
                route=route,
                requests=sum(by_status.values()),
                errors=sum(n for s, n in by_status.items() if not s.startswith("2")),
                by_status=by_status,
                latency=_percentiles(samples, "strait_request_duration_seconds", route),
                ttft=_percentiles(samples, "strait_time_to_first_token_seconds", route),
                served_by_tier=dict(sorted(tiers.get(route, {}).items())),
                spilled=spilled.get(route, 0),
                cache_hits=hits.get(route, 0),
                cache_lookups=lookups.get(route, 0),
            )
        )
    return out


def refusals_by_tenant(metrics: Metrics) -> Mapping[str, dict[str, int]]:
    """tenant -> error code -> requests answered with it (strait_refusals_total)."""
    out: dict[str, dict[str, int]] = defaultdict(dict)
    for labels, value in Samples(metrics).rows("strait_refusals_total"):
        if value:
            out[labels["tenant"]][labels["code"]] = int(value)
    return out
