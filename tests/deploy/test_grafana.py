"""The provisioned Grafana dashboard: valid JSON, every panel on the provisioned datasource, the topics an
operator needs covered, and every panel query naming only series a running gateway exports."""

from __future__ import annotations

import json

from tests.deploy.stack import DASHBOARD, promql_metric_names


def _panels() -> list[dict[str, object]]:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] == "Strait"
    return [p for p in dash["panels"] if p["type"] != "row"]


def test_every_panel_queries_the_provisioned_datasource() -> None:
    panels = _panels()
    assert len(panels) >= 15
    ids = [p["id"] for p in json.loads(DASHBOARD.read_text())["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        targets = panel["targets"]
        assert isinstance(targets, list) and targets, panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "prometheus"}
        for t in targets:
            assert t["expr"] and t["refId"]


def test_the_dashboard_covers_what_operators_watch() -> None:
    used = set()
    for panel in _panels():
        for t in panel["targets"]:  # type: ignore[attr-defined]
            used |= promql_metric_names(t["expr"])
    wanted = {
        "traffic and errors": "strait_requests_total",
        "latency by route": "strait_request_duration_seconds_bucket",
        "TTFT by route": "strait_time_to_first_token_seconds_bucket",
        "latency by deployment": "strait_deployment_request_duration_seconds_bucket",
        "TTFT by deployment": "strait_deployment_time_to_first_token_seconds_bucket",
        "tokens per tenant": "strait_usage_tokens_total",
        "cost per tenant": "strait_usage_cost_usd_total",
        "cache hit rate": "strait_cache_lookups_total",
        "spillover share by tier": "strait_served_requests_total",
        "ejections": "strait_upstream_ejected",
        "limiter refusals": "strait_limit_decisions_total",
        "Redis health": "strait_state_breaker",
    }
    missing = {topic for topic, metric in wanted.items() if metric not in used}
    assert not missing


def test_panel_queries_name_only_series_the_gateway_exports(exported_metrics: set[str]) -> None:
    for panel in _panels():
        for t in panel["targets"]:  # type: ignore[attr-defined]
            names = promql_metric_names(t["expr"])
            assert names, t["expr"]
            assert names <= exported_metrics, f"{panel['title']}: {sorted(names - exported_metrics)}"
