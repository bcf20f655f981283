"""Live alerts with a rate window: the conditions of docker/prometheus/alerts.yaml that Prometheus judges on
rate() or increase() over a window, judged here on this replica's counters over the same windows (read from
the snapshot ring, gateway.api.console.history). What differs from Prometheus, on purpose:
- one replica's counters, not the sum over replicas;
- the condition as it holds now: a rule's `for:` is not waited out;
- the slow burns need six hours of history and the ring keeps one: they are listed as not judged.

The rule file's parameters are the table below; tests/unit/test_console_alerts.py reads alerts.yaml and
fails when the two disagree (edit both)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping

import msgspec

from gateway.api.console.history import Window
from gateway.api.console.metrics_view import Samples

# SLOs: availability 99.5 % (error budget 0.005); 99 % of streams' first event within 2.5 s (budget 0.01).
ERROR_BUDGET = 0.005
TTFT_SLO_S = 2.5
TTFT_BUDGET = 0.01
# Fast burn: the budget spent 14.4x as fast as allowed over the last hour and the last five minutes.
FAST_BURN = 14.4
FAST_WINDOWS_S = (3600.0, 300.0)
# Slow burn: 6x over six hours and thirty minutes (not judged here: the ring holds an hour).
SLOW_BURN = 6.0
SLOW_WINDOWS_S = (21600.0, 1800.0)
# Spillover may cost this much per hour (summed over routes).
SPILLOVER_USD_PER_HOUR = 2.0
# A tenant spending at a pace (over the last hour) that would use `factor` x its daily budget in a day.
BUDGET_BURN_FACTOR = 2.0
BUDGET_BURN_WINDOW_S = 3600.0
LIMITS_DEGRADED_WINDOW_S = 300.0
SHED_WINDOW_S = 300.0
STATE_RESET_WINDOW_S = 600.0
# A rate needs at least this much time behind it (one sampling interval), or it is not judged yet.
MIN_RATE_S = 60.0

Reader = Callable[[float], tuple[Window, Samples]]


class Alert(msgspec.Struct, kw_only=True):
    name: str
    detail: str


class Judged(msgspec.Struct, kw_only=True):
    alerts: list[Alert]
    # Rules of alerts.yaml this replica cannot judge now, and why.
    not_judged: list[str]


def _by_route(samples: Samples, name: str, keep: Callable[[dict[str, str]], bool]) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for labels, value in samples.rows(name):
        if keep(labels):
            out[labels.get("route", "")] += value
    return out


def error_ratios(samples: Samples) -> dict[str, float]:
    """route -> share of its answered requests that were 5xx (routes with no request are absent: NaN in PromQL)."""
    total = _by_route(samples, "strait_requests_total", lambda labels: True)
    errors = _by_route(samples, "strait_requests_total", lambda labels: labels.get("status", "").startswith("5"))
    return {route: errors.get(route, 0.0) / n for route, n in total.items() if n > 0}


def ttft_slow_ratios(samples: Samples) -> dict[str, float]:
    """route -> share of streams whose first event came later than TTFT_SLO_S (1 - bucket{le} / count)."""
    count = _by_route(samples, "strait_time_to_first_token_seconds_count", lambda labels: True)
    fast = _by_route(
        samples, "strait_time_to_first_token_seconds_bucket", lambda labels: float(labels["le"]) == TTFT_SLO_S
    )
    return {route: 1 - fast.get(route, 0.0) / n for route, n in count.items() if n > 0}


def _increase(samples: Samples, name: str, keep: Callable[[dict[str, str]], bool] = lambda labels: True) -> float:
    return sum(value for labels, value in samples.rows(name) if keep(labels))


def _burns(
    read: Reader,
    ratios: Callable[[Samples], dict[str, float]],
    budget: float,
    factor: float,
    windows: tuple[float, ...],
) -> dict[str, list[float]]:
    """route -> its ratio over each window, for the routes above factor x budget over every window."""
    per_window = [ratios(read(w)[1]) for w in windows]
    limit = factor * budget
    return {
        route: [r[route] for r in per_window]
        for route in sorted(per_window[0])
        if all(route in r and r[route] > limit for r in per_window)
    }


def judge(read: Reader, day_budgets: Mapping[str, float | None]) -> Judged:
    """The rate-window rules of alerts.yaml on the counters `read` gives over each rule's window."""
    alerts: list[Alert] = []
    not_judged = [
        f"{name}: needs {SLOW_WINDOWS_S[0] / 3600:g} hours of samples; the console keeps one"
        for name in ("StraitRouteErrorBudgetSlowBurn", "StraitRouteTTFTSlowBurn")
    ]
    for route, ratios in _burns(read, error_ratios, ERROR_BUDGET, FAST_BURN, FAST_WINDOWS_S).items():
        alerts.append(
            Alert(
                name="StraitRouteErrorBudgetFastBurn",
                detail=f"route {route}: {ratios[0] * 100:.1f} % 5xx over the last hour, {ratios[1] * 100:.1f} % over "
                f"5 minutes (SLO budget {ERROR_BUDGET * 100:g} %, burning over {FAST_BURN:g}x)",
            )
        )
    for route, ratios in _burns(read, ttft_slow_ratios, TTFT_BUDGET, FAST_BURN, FAST_WINDOWS_S).items():
        alerts.append(
            Alert(
                name="StraitRouteTTFTFastBurn",
                detail=f"route {route}: {ratios[0] * 100:.1f} % of streams started later than {TTFT_SLO_S:g} s over the "
                f"last hour, {ratios[1] * 100:.1f} % over 5 minutes (budget {TTFT_BUDGET * 100:g} %)",
            )
        )
    window, hour = read(BUDGET_BURN_WINDOW_S)
    if window.seconds is None or window.seconds < MIN_RATE_S:
        not_judged.append("StraitSpilloverSpendHigh, StraitTenantBudgetBurn: less than a minute of counters so far")
    else:
        spill_per_h = (
            _increase(hour, "strait_served_cost_usd_total", lambda labels: labels.get("spilled") == "true")
            / window.seconds
            * 3600
        )
        if spill_per_h > SPILLOVER_USD_PER_HOUR:
            alerts.append(
                Alert(
                    name="StraitSpilloverSpendHigh",
                    detail=f"spillover costs {spill_per_h:.2f} USD/h (limit {SPILLOVER_USD_PER_HOUR:g})",
                )
            )
        spent: dict[str, float] = defaultdict(float)
        for labels, value in hour.rows("strait_usage_cost_usd_total"):
            spent[labels.get("tenant", "")] += value
        for tenant, usd in sorted(spent.items()):
            budget = day_budgets.get(tenant)
            per_day = usd / window.seconds * 86400
            if budget and per_day > BUDGET_BURN_FACTOR * budget:
                alerts.append(
                    Alert(
                        name="StraitTenantBudgetBurn",
                        detail=f"tenant {tenant} spends at {per_day:.2f} USD/day (daily budget {budget:g} USD): "
                        "it would be empty in under 12 hours",
                    )
                )
    for name, metric, span, what in (
        (
            "StraitLimitsFailingOpen",
            "strait_limits_degraded_total",
            LIMITS_DEGRADED_WINDOW_S,
            "admissions without Redis",
        ),
        ("StraitGatewayShedding", "strait_shed_total", SHED_WINDOW_S, "requests shed with 503"),
        ("StraitStateStoreReset", "strait_state_resets_total", STATE_RESET_WINDOW_S, "times Redis came back empty"),
    ):
        n = _increase(read(span)[1], metric)
        if n > 0:
            alerts.append(Alert(name=name, detail=f"{n:g} {what} in the last {span / 60:g} minutes"))
    return Judged(alerts=alerts, not_judged=not_judged)
