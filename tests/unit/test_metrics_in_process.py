"""/metrics as an operator reads it, in-process (create_app, the simulated adapter, memory state):
time to first token, tokens and cost by tenant/route/deployment, fallbacks, and the gauges read at
scrape time (upstream in flight and ejected, usage queue and spool, the state breaker)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from litestar.testing import TestClient

from gateway.app import create_app
from gateway.policy.index import key_digest
from gateway.settings import Settings

KEY = "sk-metrics-tenant-0001"
POLICY = f"""
version: 1
backends:
  - {{name: sim, adapter: simulated, simulated: {{ttft_ms: 0, tokens_per_second: 1000000, output_tokens: 7}}}}
  - name: broken
    adapter: simulated
    simulated: {{ttft_ms: 0, failure_rate: 1.0, failure_status: 503}}
models:
  - name: m
    deployments: [{{backend: sim, upstream_model: sim-1, price: {{input_per_mtok: 1000, output_per_mtok: 2000}}}}]
  - {{name: m-broken, deployments: [{{backend: broken, upstream_model: b}}]}}
routes:
  - {{name: chat, models: [m]}}
  - {{name: spill, objective: ordered, models: [m-broken, m]}}
tenants:
  - name: acme
    keys: [{{id: k1, digest: "{key_digest(KEY)}"}}]
"""


@contextlib.contextmanager
def _client(tmp_path: Path, policy_text: str) -> Iterator[TestClient[object]]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text)
    app = create_app(Settings(policy_path=str(policy), spool_dir=str(tmp_path / "spool")))
    with TestClient(app) as c:
        c.headers["authorization"] = f"Bearer {KEY}"
        yield c


@pytest.fixture()
def client(tmp_path: Path) -> Iterator[TestClient[object]]:
    with _client(tmp_path, POLICY) as c:
        yield c


def _value(text: str, prefix: str) -> float:
    for line in text.splitlines():
        if line.rsplit(" ", 1)[0] == prefix:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{prefix} not in /metrics")


def test_usage_ttft_fallbacks_and_gauges_are_exported(client: TestClient[object]) -> None:
    body = {"model": "chat", "messages": [{"role": "user", "content": "hello"}]}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    r = client.post("/v1/chat/completions", json={**body, "stream": True})
    assert r.status_code == 200 and "[DONE]" in r.text
    assert client.post("/v1/chat/completions", json={**body, "model": "spill"}).status_code == 200
    text = client.get("/metrics").text
    # prometheus_client prints labels sorted by name.
    completion = _value(
        text, 'strait_usage_tokens_total{deployment="m@sim",kind="completion",route="chat",tenant="acme"}'
    )
    assert completion == 14  # two answers of 7 tokens on route chat
    prompt = _value(text, 'strait_usage_tokens_total{deployment="m@sim",kind="prompt",route="chat",tenant="acme"}')
    assert prompt > 0
    cost = _value(text, 'strait_usage_cost_usd_total{deployment="m@sim",route="chat",tenant="acme"}')
    assert cost == pytest.approx((prompt * 1000 + completion * 2000) / 1e6)
    assert _value(text, 'strait_time_to_first_token_seconds_count{route="chat"}') == 1
    assert _value(text, 'strait_fallbacks_total{route="spill"}') == 1
    assert _value(text, 'strait_upstream_in_flight{backend="sim"}') == 0
    assert _value(text, 'strait_upstream_ejected{backend="broken"}') == 0
    assert _value(text, "strait_state_breaker") == 0
    assert _value(text, "strait_usage_spool_bytes") == 0
    assert "strait_usage_queue_records" in text and 'strait_state_calls_unanswered_total{reason="failed"}' in text


LIMITED = (
    POLICY
    + """    limits:
      tenant: {requests_per_minute: 2}
"""
)


def test_limiter_decisions_and_state_latency_are_exported(tmp_path: Path) -> None:
    body = {"model": "chat", "messages": [{"role": "user", "content": "hello"}]}
    with _client(tmp_path, LIMITED) as c:
        statuses = [c.post("/v1/chat/completions", json=body).status_code for _ in range(5)]
        text = c.get("/metrics").text
    assert statuses == [200, 200, 429, 429, 429]
    assert _value(text, 'strait_limit_decisions_total{result="allowed",route="chat"}') == 2
    assert _value(text, 'strait_limit_decisions_total{result="rate_limited",route="chat"}') == 3
    # Every admission went to the store once (in-process here; a Redis round trip in production).
    assert _value(text, 'strait_state_call_seconds_count{call="admit"}') == 5
