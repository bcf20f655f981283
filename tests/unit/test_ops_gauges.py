"""The gauges alerts compare against, in-process (create_app, the simulated adapter, memory state): each
route's deployments left after ejections, the shedding cap, tenants' budgets, and which tier served a request."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from litestar.testing import TestClient

from gateway.app import create_app
from gateway.policy.index import key_digest
from gateway.settings import Settings

KEY = "sk-ops-gauges-tenant-01"
POLICY = f"""
version: 1
server:
  shedding: {{max_in_flight: 40}}
backends:
  - {{name: sim, adapter: simulated, tier: edge, simulated: {{ttft_ms: 0, tokens_per_second: 1000000, output_tokens: 5}}}}
  - name: broken
    adapter: simulated
    simulated: {{ttft_ms: 0, failure_rate: 1.0, failure_status: 503}}
    outlier: {{consecutive_failures: 2}}
models:
  - name: m
    deployments: [{{backend: sim, upstream_model: sim-1, price: {{input_per_mtok: 1000, output_per_mtok: 2000}}}}]
  - {{name: m-broken, deployments: [{{backend: broken, upstream_model: b}}]}}
routes:
  - {{name: chat, models: [m]}}
  - {{name: dead, models: [m-broken]}}
tenants:
  - name: acme
    keys: [{{id: k1, digest: "{key_digest(KEY)}"}}]
    budgets: {{tenant: {{usd_per_day: 5.0, usd_per_month: 90.0}}}}
  - name: free
"""


@pytest.fixture()
def client(tmp_path: Path) -> Iterator[TestClient[object]]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    app = create_app(Settings(policy_path=str(policy), spool_dir=str(tmp_path / "spool")))
    with TestClient(app) as c:
        c.headers["authorization"] = f"Bearer {KEY}"
        yield c


def _series(text: str) -> dict[str, float]:
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_route_deployments_count_ejections_per_route(client: TestClient[object]) -> None:
    body = {"model": "dead", "messages": [{"role": "user", "content": "hello"}]}
    before = _series(client.get("/metrics").text)
    assert before['strait_route_deployments{route="dead",state="available"}'] == 1
    assert before['strait_route_deployments{route="dead",state="ejected"}'] == 0
    for _ in range(2):  # consecutive_failures: 2
        assert client.post("/v1/chat/completions", json=body).status_code >= 500
    after = _series(client.get("/metrics").text)
    assert after['strait_route_deployments{route="dead",state="available"}'] == 0
    assert after['strait_route_deployments{route="dead",state="ejected"}'] == 1
    # Another route's deployment is untouched.
    assert after['strait_route_deployments{route="chat",state="available"}'] == 1
    assert after['strait_route_deployments{route="chat",state="ejected"}'] == 0


def test_shedding_cap_and_budgets_come_from_the_policy(client: TestClient[object]) -> None:
    series = _series(client.get("/metrics").text)
    assert series["strait_shedding_max_in_flight"] == 40
    assert series['strait_tenant_budget_usd{period="day",tenant="acme"}'] == 5.0
    assert series['strait_tenant_budget_usd{period="month",tenant="acme"}'] == 90.0
    # A tenant without a budget has no series (nothing to compare with).
    assert not any('tenant="free"' in name for name in series if name.startswith("strait_tenant_budget_usd"))
    assert series["strait_policy_last_reload_successful"] == 1


def test_served_requests_and_cost_by_tier(client: TestClient[object]) -> None:
    body = {"model": "chat", "messages": [{"role": "user", "content": "hello"}]}
    for _ in range(3):
        assert client.post("/v1/chat/completions", json=body).status_code == 200
    series = _series(client.get("/metrics").text)
    assert series['strait_served_requests_total{route="chat",spilled="false",tier="edge"}'] == 3
    cost = series['strait_usage_cost_usd_total{deployment="m@sim",route="chat",tenant="acme"}']
    assert cost > 0
    assert series['strait_served_cost_usd_total{route="chat",spilled="false",tier="edge"}'] == pytest.approx(cost)


def test_latency_and_ttft_by_deployment(client: TestClient[object]) -> None:
    body = {"model": "chat", "messages": [{"role": "user", "content": "hello"}]}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    r = client.post("/v1/chat/completions", json={**body, "stream": True})
    assert r.status_code == 200 and "[DONE]" in r.text
    series = _series(client.get("/metrics").text)
    assert series['strait_deployment_request_duration_seconds_count{deployment="m@sim",route="chat"}'] == 2
    assert series['strait_deployment_time_to_first_token_seconds_count{deployment="m@sim",route="chat"}'] == 1


def test_a_cache_hit_is_not_counted_as_served_by_a_tier(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        POLICY.replace("budgets: {tenant: {usd_per_day: 5.0, usd_per_month: 90.0}}", "cache: {exact: true}")
    )
    app = create_app(Settings(policy_path=str(policy), spool_dir=str(tmp_path / "spool")))
    with TestClient(app) as c:
        c.headers["authorization"] = f"Bearer {KEY}"
        body = {"model": "chat", "messages": [{"role": "user", "content": "same question"}], "temperature": 0}
        first = c.post("/v1/chat/completions", json=body)
        second = c.post("/v1/chat/completions", json=body)
        assert first.status_code == second.status_code == 200
        assert second.headers["x-strait-cache"] == "hit"
        series = _series(c.get("/metrics").text)
    assert series['strait_served_requests_total{route="chat",spilled="false",tier="edge"}'] == 1
