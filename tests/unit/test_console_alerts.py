"""Live alerts with a rate window (gateway.api.console.alerting): the table of parameters matches
docker/prometheus/alerts.yaml, and each rule fires on counters over its windows (fake clock, no sleeps)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from gateway.api.console import alerting
from gateway.api.console.history import MetricHistory
from gateway.telemetry import Metrics

RULES = Path(__file__).resolve().parents[2] / "docker" / "prometheus" / "alerts.yaml"


def _exprs() -> dict[str, str]:
    doc = yaml.safe_load(RULES.read_text())
    out = {}
    for group in doc["groups"]:
        for rule in group["rules"]:
            out[rule.get("alert") or rule["record"]] = " ".join(str(rule["expr"]).split())
    return out


def _seconds(text: str) -> float:
    n, unit = int(text[:-1]), text[-1]
    return float(n * {"m": 60, "h": 3600}[unit])


def test_the_parameter_table_is_the_rule_files() -> None:
    exprs = _exprs()
    fast = re.fullmatch(
        r"route:strait_request_errors:ratio_rate(\w+) > \(([\d.]+) \* ([\d.]+)\) and "
        r"route:strait_request_errors:ratio_rate(\w+) > \(([\d.]+) \* ([\d.]+)\)",
        exprs["StraitRouteErrorBudgetFastBurn"],
    )
    assert fast is not None
    assert (_seconds(fast[1]), _seconds(fast[4])) == alerting.FAST_WINDOWS_S
    assert float(fast[2]) == float(fast[5]) == alerting.FAST_BURN
    assert float(fast[3]) == float(fast[6]) == alerting.ERROR_BUDGET
    slow = re.fullmatch(
        r"route:strait_request_errors:ratio_rate(\w+) > \(([\d.]+) \* ([\d.]+)\) and .*ratio_rate(\w+) > .*",
        exprs["StraitRouteErrorBudgetSlowBurn"],
    )
    assert slow is not None
    assert (_seconds(slow[1]), _seconds(slow[4])) == alerting.SLOW_WINDOWS_S and float(slow[2]) == alerting.SLOW_BURN
    ttft = re.fullmatch(
        r"route:strait_ttft_slow:ratio_rate(\w+) > \(([\d.]+) \* ([\d.]+)\) and .*",
        exprs["StraitRouteTTFTFastBurn"],
    )
    assert ttft is not None and float(ttft[2]) == alerting.FAST_BURN and float(ttft[3]) == alerting.TTFT_BUDGET
    le = re.search(r'le="([\d.]+)"', exprs["route:strait_ttft_slow:ratio_rate1h"])
    assert le is not None and float(le[1]) == alerting.TTFT_SLO_S
    spill = re.fullmatch(
        r'sum\(rate\(strait_served_cost_usd_total\{spilled="true"\}\[(\w+)\]\)\) \* 3600 > ([\d.]+)',
        exprs["StraitSpilloverSpendHigh"],
    )
    assert spill is not None and _seconds(spill[1]) == 3600 and float(spill[2]) == alerting.SPILLOVER_USD_PER_HOUR
    burn = re.search(
        r"rate\(strait_usage_cost_usd_total\[(\w+)\]\)\) \* 86400 > ([\d.]+) \*", exprs["StraitTenantBudgetBurn"]
    )
    assert burn is not None
    assert _seconds(burn[1]) == alerting.BUDGET_BURN_WINDOW_S and float(burn[2]) == alerting.BUDGET_BURN_FACTOR
    for name, metric, span in (
        ("StraitLimitsFailingOpen", "strait_limits_degraded_total", alerting.LIMITS_DEGRADED_WINDOW_S),
        ("StraitGatewayShedding", "strait_shed_total", alerting.SHED_WINDOW_S),
        ("StraitStateStoreReset", "strait_state_resets_total", alerting.STATE_RESET_WINDOW_S),
    ):
        found = re.search(
            re.escape(metric) + r"\[(\w+)\]\)\) > 0|" + re.escape(metric) + r"\[(\w+)\]\) > 0", exprs[name]
        )
        assert found is not None, name
        assert _seconds(found[1] or found[2]) == span


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _history(metrics: Metrics, clock: Clock, minutes: int) -> MetricHistory:
    history = MetricHistory(metrics, clock=clock)
    for minute in range(minutes + 1):
        clock.now = 60.0 * minute
        history.sample()
    return history


def _names(judged: alerting.Judged) -> list[str]:
    return [a.name for a in judged.alerts]


def test_error_burn_needs_both_the_hour_and_the_last_five_minutes() -> None:
    metrics = Metrics()
    clock = Clock(0.0)
    ok = metrics.child(metrics.requests, "chat", "200")
    bad = metrics.child(metrics.requests, "chat", "502")
    history = _history(metrics, clock, 0)
    # 50 minutes of 10 % errors (over 14.4 x 0.5 % = 7.2 %), then 10 clean minutes.
    for minute in range(1, 61):
        ok.inc(9 if minute <= 50 else 10)
        bad.inc(1 if minute <= 50 else 0)
        clock.now = 60.0 * minute
        history.sample()
    clock.now += 5
    judged = alerting.judge(history.read, {})
    assert "StraitRouteErrorBudgetFastBurn" not in _names(judged)  # the last 5 minutes are clean
    bad.inc(5)  # the last five minutes now burn too
    ok.inc(5)
    judged = alerting.judge(history.read, {})
    assert _names(judged).count("StraitRouteErrorBudgetFastBurn") == 1
    assert "route chat" in judged.alerts[0].detail
    assert any(n.startswith("StraitRouteErrorBudgetSlowBurn") for n in judged.not_judged)


def test_ttft_burn_counts_streams_slower_than_the_slo_bucket() -> None:
    metrics = Metrics()
    clock = Clock(0.0)
    history = _history(metrics, clock, 61)
    ttft = metrics.ttft.labels("chat")
    for _ in range(80):
        ttft.observe(0.2)
    for _ in range(20):
        ttft.observe(alerting.TTFT_SLO_S)  # on the bound: within the SLO (le="2.5")
    assert "StraitRouteTTFTFastBurn" not in _names(alerting.judge(history.read, {}))
    ttft.observe(2.6)  # 1 of 101 streams late: under 14.4 %
    assert "StraitRouteTTFTFastBurn" not in _names(alerting.judge(history.read, {}))
    for _ in range(20):
        ttft.observe(3.0)  # 21 of 121: 17 %
    assert _names(alerting.judge(history.read, {})) == ["StraitRouteTTFTFastBurn"]


def test_spillover_spend_and_budget_burn_are_rates_over_the_hour() -> None:
    metrics = Metrics()
    clock = Clock(0.0)
    history = _history(metrics, clock, 61)
    clock.now += 60  # 60 + 59 minutes since the oldest sample inside the hour: read() says exactly how long
    window, _ = history.read(3600)
    assert window.seconds == 3600
    metrics.child(metrics.served_cost, "chat", "provider", "true").inc(1.9)
    metrics.child(metrics.usage_cost, "acme", "chat", "m@sim").inc(1.0)  # 24 USD/day pace
    assert _names(alerting.judge(history.read, {"acme": 12.5})) == []  # 24 is not over 2 x 12.5
    metrics.child(metrics.served_cost, "chat", "provider", "true").inc(0.2)
    metrics.child(metrics.usage_cost, "acme", "chat", "m@sim").inc(0.05)  # 25.2 USD/day
    assert _names(alerting.judge(history.read, {"acme": 12.5, "other": None})) == [
        "StraitSpilloverSpendHigh",
        "StraitTenantBudgetBurn",
    ]


def test_rates_are_not_judged_in_the_first_minute_and_counters_fire_on_any_increase() -> None:
    metrics = Metrics()
    clock = Clock(0.0)
    history = _history(metrics, clock, 0)
    clock.now = 30.0
    metrics.child(metrics.served_cost, "chat", "provider", "true").inc(100)
    judged = alerting.judge(history.read, {})
    assert _names(judged) == [] and any("StraitSpilloverSpendHigh" in n for n in judged.not_judged)
    metrics.shed.labels("batch").inc()
    metrics.limits_degraded.inc(3)
    assert _names(alerting.judge(history.read, {})) == ["StraitLimitsFailingOpen", "StraitGatewayShedding"]
    # Ten minutes later both have left the five-minute window.
    for minute in range(1, 12):
        clock.now = 60.0 * minute
        history.sample()
    assert "StraitGatewayShedding" not in _names(alerting.judge(history.read, {}))
