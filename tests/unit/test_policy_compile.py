"""What depends only on the policy is compiled once (gateway.policy.compile, the limits stage's
LimitTable), and the budget downgrade runs from the plan: in-process, through the real runtime."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar.testing import TestClient

from gateway.app import create_app
from gateway.policy.index import PolicyIndex, key_digest
from gateway.policy.load import PolicyError, load_policy
from gateway.policy.model import PER_DAY_MAX, PER_MINUTE_MAX, USD_MAX, Budget, PolicySet, RateLimits, Tenant
from gateway.settings import Settings
from gateway.stages.limits import NO_LIMITS, LimitTable, store_limits
from gateway.stages.route import RouteStage
from gateway.state import BudgetLimit, ConcurrencyLimit, RateLimit

# ---------------------------------------------------------------------------------------------------------------
# The policy's limit bounds and the store's: every limit the loader accepts converts, one more does not load.


def _one_tenant(limits: dict[str, Any] | None = None, budgets: dict[str, Any] | None = None) -> PolicySet:
    tenant = {"name": "t", "limits": limits or {}, "budgets": budgets or {}}
    return msgspec.convert({"tenants": [tenant]}, PolicySet)


def test_the_largest_limits_the_policy_accepts_convert_to_store_limits() -> None:
    biggest = {
        "requests_per_minute": PER_MINUTE_MAX,
        "tokens_per_minute": PER_MINUTE_MAX,
        "requests_per_day": PER_DAY_MAX,
        "tokens_per_day": PER_DAY_MAX,
        "max_concurrency": 10**9,
    }
    budget = {"usd_per_day": USD_MAX, "usd_per_month": USD_MAX, "tokens_per_month": 2**50 - 1}
    policy = _one_tenant({"tenant": biggest, "per_key": biggest}, {"tenant": budget, "per_key": budget})
    limits = LimitTable(PolicyIndex(policy)).get("t", "any-route")
    assert limits is not None
    assert len(limits.rates) == 8 and len(limits.concurrency) == 2 and len(limits.budgets) == 6
    assert {r.limit for r in limits.rates} == {PER_MINUTE_MAX, PER_DAY_MAX}


@pytest.mark.parametrize(
    ("section", "field", "value", "where"),
    [
        ("limits", "requests_per_minute", PER_MINUTE_MAX + 1, "limits.tenant.requests_per_minute"),
        ("limits", "tokens_per_day", PER_DAY_MAX + 1, "limits.tenant.tokens_per_day"),
        ("limits", "requests_per_minute", -1, "limits.tenant.requests_per_minute"),
        ("limits", "max_concurrency", -1, "limits.tenant.max_concurrency"),
        ("budgets", "usd_per_day", USD_MAX * 2, "budgets.tenant.usd_per_day"),
        ("budgets", "usd_per_month", -0.5, "budgets.tenant.usd_per_month"),
        ("budgets", "tokens_per_month", 2**50, "budgets.tenant.tokens_per_month"),
    ],
)
def test_a_limit_out_of_the_stores_range_is_refused_at_its_line(
    tmp_path: Path, section: str, field: str, value: float, where: str
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(f"version: 1\ntenants:\n  - name: t\n    {section}:\n      tenant:\n        {field}: {value}\n")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    (problem,) = info.value.problems
    assert problem.line == 6 and problem.reason.startswith(f"tenants[0].{where}: Expected "), problem
    # The same value past the policy's bound is one the store itself refuses (or a negative limit).
    if section == "limits" and value > 0:
        with pytest.raises(ValueError, match="too large"):
            RateLimit(scope="tenant", unit="requests", limit=int(value), period_s=60 if "minute" in field else 86_400)
    elif section == "budgets" and value > 0:
        micro = round(value * 1e6) if field.startswith("usd") else int(value)
        with pytest.raises(ValueError, match="out of range"):
            BudgetLimit(scope="tenant", metric="usd", window="day", limit=micro)


# ---------------------------------------------------------------------------------------------------------------
# The limit table: built once per policy, one lookup per request.


def test_limit_table_by_tenant_and_route() -> None:
    policy = _one_tenant(
        {"tenant": {"requests_per_minute": 60, "max_concurrency": 2}, "routes": {"big": {"tokens_per_day": 1000}}},
        {"per_key": {"usd_per_month": 1.5}},
    )
    table = LimitTable(PolicyIndex(policy))
    plain = table.get("t", "small")
    assert plain is not None and plain is table.get("t", "other"), "built once, shared by every route without limits"
    assert plain.rates == (RateLimit(scope="tenant", unit="requests", limit=60),)
    assert plain.concurrency == (ConcurrencyLimit(scope="tenant", limit=2),)
    assert plain.budgets == (BudgetLimit(scope="key", metric="usd", window="month", limit=1_500_000),)
    big = table.get("t", "big")
    assert big is not None and big is table.get("t", "big")
    assert RateLimit(scope="route", unit="tokens", limit=1000, period_s=86_400) in big.rates
    unbudgeted = table.get("t", "big", with_budgets=False)
    assert unbudgeted is not None and unbudgeted.budgets == () and unbudgeted.rates == big.rates
    assert table.get("anonymous", "small") is None, "a tenant the policy does not name has no limits"
    assert store_limits(PolicyIndex(_one_tenant()).tenant_tables["t"].limits) is NO_LIMITS


def test_zero_rates_are_no_limit_and_zero_concurrency_admits_nothing() -> None:
    t = Tenant(name="t")
    sections = PolicyIndex(PolicySet(tenants=(t,))).tenant_tables["t"].limits
    assert store_limits(sections) is NO_LIMITS
    zeroed = msgspec.structs.replace(
        t,
        limits=msgspec.structs.replace(t.limits, tenant=RateLimits(requests_per_minute=0, max_concurrency=0)),
        budgets=msgspec.structs.replace(t.budgets, tenant=Budget(tokens_per_month=0)),
    )
    limits = store_limits(PolicyIndex(PolicySet(tenants=(zeroed,))).tenant_tables["t"].limits)
    assert limits.rates == () and limits.concurrency == (ConcurrencyLimit(scope="tenant", limit=0),)
    assert limits.budgets == (BudgetLimit(scope="tenant", metric="tokens", window="month", limit=0),)


# ---------------------------------------------------------------------------------------------------------------
# The compiled tables.


def test_tenants_with_equal_compliance_share_one_verdict_table_and_rules_are_indexed_per_tenant() -> None:
    doc = {
        "backends": [{"name": "us", "adapter": "simulated", "hosting": {"jurisdiction": "US"}}],
        "models": [{"name": "m", "deployments": [{"backend": "us", "upstream_model": "m"}]}],
        "routes": [{"name": "r", "models": ["m"], "fallback": ["f"]}, {"name": "f", "models": ["m"]}],
        "tenants": [
            {"name": "a", "compliance": {"allowed_jurisdictions": ["EU"]}},
            {"name": "b", "compliance": {"allowed_jurisdictions": ["EU"]}},
            {"name": "c"},
        ],
        "rules": [
            {"name": "for-a", "when": {"tenants": ["a"]}, "then": {"objective": "cost"}},
            {"name": "for-all", "then": {"objective": "latency"}},
        ],
    }
    index = PolicyIndex(msgspec.convert(doc, PolicySet))
    a, b, c = (index.tenant_tables[n] for n in "abc")
    assert a.rows is b.rows and a.rows is not c.rows
    assert a.rows[("r", "chat")][0][1] == "hosting jurisdiction US is not in the allowed ['EU']"
    assert c.rows[("r", "chat")][0][1] is None
    assert [r.rule.name for r in a.rules] == ["for-a", "for-all"] and [r.rule.name for r in c.rules] == ["for-all"]
    # The fallback's copy of the same deployment is not a second candidate; the route owns one.
    cands = index.candidates[("r", "chat")]
    assert [t.label for t in cands.targets] == ["m@us"] and cands.own == 1
    assert index.candidates[("r", "embeddings")].targets == ()
    assert cands.targets[0].header == (b"x-strait-deployment", b"m@us")


# ---------------------------------------------------------------------------------------------------------------
# The budget downgrade through the real runtime: limits switches to the plan's downgrade, route runs once,
# explain describes the route that answers.

KEYS = {"thrifty": "sk-thrifty-key-0001", "broke": "sk-broke-key-0002"}
POLICY = """
version: 1
backends:
  - {{name: us, adapter: simulated, tier: edge, hosting: {{jurisdiction: US}},
      simulated: {{ttft_ms: 0, tokens_per_second: 1000000, output_tokens: 3}}}}
  - {{name: cn, adapter: simulated, tier: edge, hosting: {{jurisdiction: CN}},
      simulated: {{ttft_ms: 0, tokens_per_second: 1000000, output_tokens: 3}}}}
models:
  - {{name: big, deployments: [{{backend: us, upstream_model: big-1, price: {{input_per_mtok: 100, output_per_mtok: 1000}}}}]}}
  - {{name: small, deployments: [{{backend: us, upstream_model: small-1}}, {{backend: cn, upstream_model: small-2}}]}}
routes:
  - {{name: pricey, models: [big]}}
  - {{name: cheap, models: [small]}}
tenants:
  - name: thrifty
    explain: true
    keys: [{{id: t1, digest: "{thrifty}"}}]
    compliance: {{allowed_jurisdictions: [US]}}
    limits: {{tenant: {{requests_per_minute: 1000}}}}
    budgets: {{tenant: {{usd_per_day: 0.000001}}, on_exhausted: downgrade, downgrade_route: cheap}}
  - name: broke
    keys: [{{id: b1, digest: "{broke}"}}]
    compliance: {{allowed_jurisdictions: [US]}}
    budgets: {{tenant: {{usd_per_day: 0.000001}}}}
"""


def test_a_spent_budget_switches_to_the_plans_downgrade_without_running_route_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(**{name: key_digest(key) for name, key in KEYS.items()}))
    routed: list[str] = []
    original = RouteStage.on_request

    async def counting(self: RouteStage, ctx: Any) -> None:
        routed.append(ctx.request_id)
        await original(self, ctx)

    monkeypatch.setattr(RouteStage, "on_request", counting)
    app = create_app(Settings(policy_path=str(policy), spool_dir=str(tmp_path / "spool")))
    body = {"model": "pricey", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5}
    with TestClient(app) as client:
        r = client.post(
            "/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {KEYS['thrifty']}", "x-strait-explain": "1"},
        )
        assert r.status_code == 200, r.text
        assert r.headers["x-strait-budget"] == "downgraded" and r.headers["x-strait-route"] == "cheap"
        assert r.headers["x-strait-deployment"] == "small@us"
        assert "x-ratelimit-limit-requests" in r.headers, "the downgrade is still rate limited"
        assert r.json()["model"] == "small-1"
        assert len(routed) == 1, "the route stage ran once: the downgrade came with the plan"
        explained = json.loads(r.headers["x-strait-explain"])
        assert explained["route"] == "cheap" and explained["plan"] == ["small@us"]
        assert explained["excluded"] == {"small@cn": "hosting jurisdiction CN is not in the allowed ['US']"}
        decision = r.headers["x-strait-decision"]
        table = client.get(f"/admin/decisions/{decision}", headers={"authorization": f"Bearer {KEYS['thrifty']}"})
        assert table.status_code == 200
        kept = table.json()
        assert (kept["route"], kept["requested_route"], kept["plan"]) == ("cheap", "cheap", ["small@us"])
        assert {row["deployment"] for row in kept["rows"]} == {"small@us", "small@cn"}
        # A tenant that blocks is refused, and the route stage ran once for it too.
        refused = client.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {KEYS['broke']}"})
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "insufficient_quota"
        assert len(routed) == 2
