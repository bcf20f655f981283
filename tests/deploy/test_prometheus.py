"""Prometheus config and Strait's alert rules with promtool (Debian's `prometheus` package): the config and
rules check, every alert fires (and stays quiet) as its unit test on synthetic series says, each alert has a
runbook, and every series a rule reads is one a running gateway exports."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from tests.deploy.stack import ALERT_TESTS, ALERTS, PROMETHEUS_CONF, alert_rules, promql_metric_names, tool
from tests.harness.procs import REPO_ROOT


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *args], capture_output=True, text=True, timeout=120)


def test_promtool_checks_the_config_and_the_rules(tmp_path: Path) -> None:
    # The config names the rules where compose mounts them (/etc/prometheus); checked here with that one path
    # pointed at the repository's file.
    config = yaml.safe_load(PROMETHEUS_CONF.read_text())
    assert config["rule_files"] == ["/etc/prometheus/alerts.yaml"]
    config["rule_files"] = [str(ALERTS)]
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump(config))
    checked = _promtool("check", "config", str(local))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout
    rules = _promtool("check", "rules", str(ALERTS))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in rules.stdout


def test_promtool_unit_tests_every_alert() -> None:
    run = subprocess.run(
        [tool("promtool"), "test", "rules", ALERT_TESTS.name],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ALERTS.parent,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    alerts = {r["alert"] for r in alert_rules() if "alert" in r}
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    firing = {case["alertname"] for t in tests for case in t.get("alert_rule_test", []) if case.get("exp_alerts")}
    assert alerts == firing, f"alerts without a unit test that makes them fire: {alerts - firing}"


def test_a_broken_threshold_fails_the_unit_tests(tmp_path: Path) -> None:
    """The unit tests can fail: the same tests against rules whose fast-burn factor is 30 instead of 14.4."""
    (tmp_path / "alerts.yaml").write_text(ALERTS.read_text().replace("(14.4 * 0.005)", "(30 * 0.005)"))
    (tmp_path / ALERT_TESTS.name).write_text(ALERT_TESTS.read_text())
    run = subprocess.run(
        [tool("promtool"), "test", "rules", ALERT_TESTS.name], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert run.returncode != 0 and "StraitRouteErrorBudgetFastBurn" in run.stdout + run.stderr


def test_every_alert_has_a_severity_and_a_runbook_section() -> None:
    runbooks = (REPO_ROOT / "docs" / "runbooks.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^## (.+)$", runbooks, re.M)
    }
    alerts = [r for r in alert_rules() if "alert" in r]
    assert len(alerts) >= 10
    for rule in alerts:
        assert rule["labels"]["severity"] in {"page", "ticket"}, rule["alert"]
        doc, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert doc == "docs/runbooks.md" and anchor in anchors, rule["alert"]
        assert rule["alert"] in runbooks, f"{rule['alert']} is not named in its runbook"


def test_rules_read_only_series_the_gateway_exports(exported_metrics: set[str]) -> None:
    recorded = {r["record"] for r in alert_rules() if "record" in r}
    used: set[str] = set()
    for rule in alert_rules():
        used |= promql_metric_names(rule["expr"])
    assert used, "no metric names found in the rules"
    assert used - recorded <= exported_metrics, (
        f"not exported by the gateway: {sorted(used - recorded - exported_metrics)}"
    )
    # The tokenizer does find names (a guard against a check that passes on nothing).
    assert promql_metric_names('sum by (route) (rate(x_total{a="b"}[5m])) / on (i) y > 2') == {"x_total", "y"}


def test_histogram_bounds_the_rules_name_are_buckets_the_gateway_has(metrics_page: str) -> None:
    """A `le` the rules compare with must be a bucket bound exactly as the gateway writes it ("2.5", "1.0")."""
    used = {
        (name, le)
        for rule in alert_rules()
        for name, le in re.findall(r'(\w+_bucket)\{[^}]*le="([^"]+)"', rule["expr"])
    }
    assert used
    for name, le in used:
        assert re.search(rf'^{name}\{{[^}}]*le="{re.escape(le)}"', metrics_page, re.M), (name, le)
