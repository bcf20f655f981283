"""Policies enforced by a running gateway: two tenants whose compliance differs, explain, hot reload."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from gateway.policy.index import key_digest
from tests.e2e.conftest import Ledger
from tests.harness.gateway import gateway_process
from tests.harness.procs import ServerProcess

EU_KEY = "sk-eu-tenant-0001"
US_KEY = "sk-us-tenant-0002"

POLICY = """
version: 1
operators:
  - {{name: BigCloud, headquarters: US}}
  - {{name: us, headquarters: DE}}
backends:
  - name: us-api
    adapter: openai
    base_url: "{fake}/v1"
    tier: provider
    hosting: {{operator: BigCloud, jurisdiction: US, retention_days: 30}}
  - name: eu-gpu
    adapter: openai
    base_url: "{fake}/v1"
    tier: self-hosted
    hosting: {{operator: us, jurisdiction: DE, retention_days: 0}}
models:
  - name: frontier
    origin: {{developer: BigLab, country: US}}
    deployments: [{{backend: us-api, upstream_model: us-model}}]
  - name: open-eu
    origin: {{developer: Mistral AI, country: FR}}
    deployments: [{{backend: eu-gpu, upstream_model: eu-model}}]
routes:
  - {{name: chat, models: [frontier, open-eu], objective: ordered}}
tenants:
  - name: eu
    keys: [{{id: eu-1, digest: "{eu}"}}]
    explain: true
    compliance: {{allowed_jurisdictions: [EU], max_retention_days: 0}}
  - name: us
    keys: [{{id: us-1, digest: "{us}"}}]
"""


def _write_policy(path: Path, fake: str, extra_route: str = "") -> None:
    text = POLICY.format(fake=fake, eu=key_digest(EU_KEY), us=key_digest(US_KEY))
    path.write_text(text.replace("routes:\n", "routes:\n" + extra_route))


@pytest.fixture(scope="module")
def policy_gateway(fake_upstream: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("policy-gw")
    policy = folder / "policy.yaml"
    _write_policy(policy, fake_upstream.base_url)
    with gateway_process(policy, log_path=folder / "gateway.log") as gw:
        gw.policy_file = policy  # type: ignore[attr-defined]
        yield gw


def _client(gw: ServerProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url + "/v1", api_key=key, max_retries=0)


def test_a_request_is_never_sent_to_an_excluded_backend(policy_gateway: ServerProcess, ledger: Ledger) -> None:
    eu, us = _client(policy_gateway, EU_KEY), _client(policy_gateway, US_KEY)
    start = ledger.records()[-1]["n"] if ledger.records() else 0
    for i in range(6):
        got = eu.chat.completions.with_raw_response.create(
            model="chat", messages=[{"role": "user", "content": f"eu-{i}"}], max_tokens=2
        )
        assert got.headers["x-strait-deployment"] == "open-eu@eu-gpu"
        us_got = us.chat.completions.with_raw_response.create(
            model="chat", messages=[{"role": "user", "content": f"us-{i}"}], max_tokens=2
        )
        assert us_got.headers["x-strait-deployment"] == "frontier@us-api"
    # The EU backend failing must not send the EU tenant to the US: the error comes back instead.
    with pytest.raises(openai.InternalServerError):
        eu.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "eu-fail"}], extra_body={"fake": {"status": 503}}
        )
    records = [r for r in ledger.records() if r["n"] > start]
    eu_bodies = [r["body"] for r in records if r["body"]["messages"][0]["content"].startswith("eu-")]
    assert len(eu_bodies) == 7
    assert {b["model"] for b in eu_bodies} == {"eu-model"}
    assert {r["body"]["model"] for r in records if r["body"]["messages"][0]["content"].startswith("us-")} == {
        "us-model"
    }


def test_widening_preferences_are_refused(policy_gateway: ServerProcess, ledger: Ledger) -> None:
    eu = _client(policy_gateway, EU_KEY)
    before = ledger.count()
    with pytest.raises(openai.PermissionDeniedError) as info:
        eu.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "x"}], extra_body={"strait": {"jurisdictions": ["US"]}}
        )
    assert "outside what your tenant allows" in info.value.message
    r = httpx.post(
        policy_gateway.base_url + "/v1/chat/completions",
        json={"model": "chat", "messages": [{"role": "user", "content": "x"}]},
        headers={"authorization": f"Bearer {EU_KEY}", "x-strait-policy": json.dumps({"jurisdictions": ["DE"]})},
    )
    assert r.status_code == 200 and r.headers["x-strait-deployment"] == "open-eu@eu-gpu"
    assert ledger.count() == before + 1


def test_explain_keeps_the_table_for_its_own_tenant_only(policy_gateway: ServerProcess) -> None:
    url = policy_gateway.base_url
    r = httpx.post(
        url + "/v1/chat/completions",
        json={"model": "chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2},
        headers={"authorization": f"Bearer {EU_KEY}", "x-strait-explain": "1"},
    )
    decision_id = r.headers["x-strait-decision"]
    summary = json.loads(r.headers["x-strait-explain"])
    assert summary["plan"] == ["open-eu@eu-gpu"] and summary["table"] == f"/admin/decisions/{decision_id}"
    assert summary["excluded"]["frontier@us-api"].startswith("hosting jurisdiction US")
    table = httpx.get(url + f"/admin/decisions/{decision_id}", headers={"authorization": f"Bearer {EU_KEY}"}).json()
    rows = {row["deployment"]: row for row in table["rows"]}
    assert rows["frontier@us-api"]["excluded"].startswith("hosting jurisdiction US is not in the allowed")
    assert rows["open-eu@eu-gpu"]["rank"] == 1 and table["plan"] == ["open-eu@eu-gpu"]
    other = httpx.get(url + f"/admin/decisions/{decision_id}", headers={"authorization": f"Bearer {US_KEY}"})
    assert other.status_code == 404


def _poll(predicate: object, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.1)  # polling an observable condition, with a deadline
    return False


def test_hot_reload_on_change_and_refusal_on_sighup(
    policy_gateway: ServerProcess, fake_upstream: ServerProcess
) -> None:
    us = _client(policy_gateway, US_KEY)
    policy: Path = policy_gateway.policy_file  # type: ignore[attr-defined]
    original = policy.read_text()
    try:
        _write_policy(policy, fake_upstream.base_url, "  - {name: chat-eu, models: [open-eu]}\n")
        assert _poll(lambda: "chat-eu" in {m.id for m in us.models.list()}), "the changed file was not picked up"
        policy.write_text(original.replace("routes:", "routes:\n  - {name: broken, models: [ghost]}"))
        policy_gateway.signal(signal.SIGHUP)
        rejected = 'strait_policy_reloads_total{result="rejected"}'
        assert _poll(lambda: rejected in httpx.get(policy_gateway.base_url + "/metrics").text)
        # The policy in force is the last valid one.
        assert "chat-eu" in {m.id for m in us.models.list()}
        assert us.chat.completions.create(model="chat-eu", messages=[{"role": "user", "content": "x"}], max_tokens=2)
        log = policy_gateway.read_log()
        assert "policy reload refused" in log and "unknown model 'ghost'" in log
        # What the PolicyReloadFailing alert reads: 0 while the files hold a refused policy.
        assert _reload_ok(policy_gateway) == 0
    finally:
        policy.write_text(original)
        assert _poll(lambda: "chat-eu" not in {m.id for m in us.models.list()})
    assert _reload_ok(policy_gateway) == 1


def _reload_ok(gw: ServerProcess) -> float:
    for line in httpx.get(gw.base_url + "/metrics", timeout=5).text.splitlines():
        if line.startswith("strait_policy_last_reload_successful "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("strait_policy_last_reload_successful not in /metrics")
