"""Table-driven tests of the compliance v2 attributes through the engine, on policies given as the YAML a
platform team writes (as dicts): operators as entities, fine-tunes' origin, user blocs, hardware rules and
preferences, the ingress region, and the refusal codes that say which stage left nothing."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from gateway.errors import GatewayError, InvalidRequest, PermissionDenied
from gateway.policy.engine import Preferences, RequestFeatures, RoutePlan, decide
from gateway.policy.index import PolicyIndex, Principal
from gateway.policy.model import PolicySet

OPERATORS = [
    {"name": "ours", "headquarters": "DE"},
    {"name": "Alibaba", "headquarters": "CN"},
    {"name": "Alibaba Cloud", "headquarters": "SG", "parent": "Alibaba"},
    {"name": "Together", "headquarters": "US"},
    {"name": "Mystery", "parent": "Together"},  # headquarters not declared
    {"name": "Five-eyes GPU", "headquarters": "NZ"},
]
BACKENDS = [
    {"name": "gpu-eu", "adapter": "simulated", "tier": "self-hosted",
     "hosting": {"operator": "ours", "jurisdiction": "DE", "region": "eu-central", "trains_on_data": False},
     "hardware": {"chip": "H100", "count": 8, "memory_gb": 80}},
    {"name": "aliyun-fra", "adapter": "simulated", "tier": "provider",
     "hosting": {"operator": "Alibaba Cloud", "jurisdiction": "DE", "region": "eu-central", "trains_on_data": False}},
    {"name": "together", "adapter": "simulated", "tier": "provider",
     "hosting": {"operator": "Together", "jurisdiction": "US", "region": "us-east"},
     "hardware": {"chip": "L4", "count": 1, "memory_gb": 24}},
    {"name": "mystery", "adapter": "simulated", "tier": "provider",
     "hosting": {"operator": "Mystery", "jurisdiction": "EU", "region": "eu-west", "trains_on_data": False},
     "hardware": {"chip": "MI300X", "count": 8, "memory_gb": 192}},
    {"name": "nz", "adapter": "simulated", "tier": "provider",
     "hosting": {"operator": "Five-eyes GPU", "jurisdiction": "NZ", "region": "ap-south"}},
]  # fmt: skip
DEP = {"upstream_model": "x", "price": {"input_per_mtok": 1.0, "output_per_mtok": 1.0}}


def _policy(
    tenant: dict[str, Any], *, route: dict[str, Any] | None = None, rules: list[Any] | None = None
) -> PolicySet:
    everywhere = [{"backend": b["name"], **DEP} for b in BACKENDS]
    return msgspec.convert(
        {
            "operators": OPERATORS,
            "blocs": [
                {"name": "FIVE_EYES", "members": ["US", "GB", "CA", "AU", "NZ"]},
                {"name": "ANGLO_PACIFIC", "members": ["AU", "NZ"]},
            ],
            "backends": BACKENDS,
            "models": [
                {"name": "qwen", "origin": {"developer": "Alibaba", "country": "CN"}, "deployments": everywhere},
                {"name": "qwen-ft", "base_model": "qwen", "deployments": [{"backend": "gpu-eu", **DEP}]},
                {"name": "qwen-ft-ft", "base_model": "qwen-ft", "deployments": [{"backend": "together", **DEP}]},
                {
                    "name": "own-ft",
                    "base_model": "qwen",
                    "origin": {"developer": "Acme", "country": "FR"},
                    "deployments": [{"backend": "gpu-eu", **DEP}],
                },
                {"name": "llama", "origin": {"developer": "Meta", "country": "US"}, "deployments": everywhere},
            ],
            "routes": [route or {"name": "r", "models": ["qwen"], "max_attempts": 10}],
            "tenants": [{"name": "t", **tenant}],
            "rules": rules or [],
        },
        PolicySet,
    )


def _decide(policy: PolicySet, route: str = "r", **features: Any) -> RoutePlan:
    return decide(
        PolicyIndex(policy),
        Principal(tenant="t", key_id="k", allowed_routes=None),
        RequestFeatures(route=route, **features),
        decision_id="d",
    )


def _backends(plan: RoutePlan) -> list[str]:
    return [t.backend.name for t in plan.targets]


def _excluded(plan: RoutePlan) -> dict[str, str | None]:
    return {r.backend: r.excluded for r in plan.decision.rows}


ENTITY_CASES: list[tuple[str, dict[str, Any], list[str], dict[str, str]]] = [
    # id, compliance, expected plan (backends), expected exclusion reasons (substring) by backend
    (
        "developer-operated-by-parent-entity",
        {"origin_rules": [{"origin_countries": ["CN"], "deny_developer_operated": True}]},
        ["gpu-eu", "together", "mystery", "nz"],
        {"aliyun-fra": "may not run on their developer's own service (Alibaba Cloud belongs to Alibaba)"},
    ),
    (
        "deny-operator-hq-CN-through-parent",
        {"denied_operator_countries": ["CN"]},
        ["gpu-eu", "together", "nz"],
        {
            "aliyun-fra": "operator Alibaba Cloud is headquartered in denied CN (through its parent)",
            "mystery": "operator Mystery has no declared headquarters",
        },
    ),
    (
        "allow-operator-hq-EEA",
        {"allowed_operator_countries": ["EEA"]},
        ["gpu-eu"],
        {
            "aliyun-fra": "operator Alibaba Cloud is headquartered in SG, not in the allowed ['EEA']",
            "together": "operator Together is headquartered in US",
            "mystery": "has no declared headquarters",
        },
    ),
    (
        "allow-operator-hq-user-bloc",
        {"allowed_operator_countries": ["FIVE_EYES"]},
        ["together", "nz"],
        {"gpu-eu": "headquartered in DE", "aliyun-fra": "headquartered in SG", "mystery": "no declared headquarters"},
    ),
    (
        "deny-operator-by-parent-name",
        {"denied_operators": ["alibaba"]},
        ["gpu-eu", "together", "mystery", "nz"],
        {"aliyun-fra": "operator Alibaba Cloud belongs to denied alibaba"},
    ),
    (
        "user-bloc-allow-list-admits-member-and-contained-bloc",
        {"allowed_jurisdictions": ["FIVE_EYES"]},
        ["together", "nz"],
        {"gpu-eu": "hosting jurisdiction DE is not in the allowed ['FIVE_EYES']"},
    ),
    (
        "EEA-allow-list-admits-EU-declared-backend",
        {"allowed_jurisdictions": ["EEA"]},
        ["gpu-eu", "aliyun-fra", "mystery"],
        {"together": "not in the allowed ['EEA']"},
    ),
    (
        "no-training-refuses-undeclared",
        {"no_training": True},
        ["gpu-eu", "aliyun-fra", "mystery"],
        {"together": "does not declare trains_on_data", "nz": "does not declare trains_on_data"},
    ),
]


@pytest.mark.parametrize(
    ("compliance", "plan", "excluded"), [c[1:] for c in ENTITY_CASES], ids=[c[0] for c in ENTITY_CASES]
)
def test_operator_entities_and_blocs(compliance: dict[str, Any], plan: list[str], excluded: dict[str, str]) -> None:
    result = _decide(_policy({"compliance": compliance}))
    assert [t.backend.name for t in result.targets] == plan
    rows = _excluded(result)
    for backend, reason in excluded.items():
        assert rows[backend] is not None and reason in rows[backend], (backend, rows[backend])


ORIGIN_CASES: list[tuple[str, str, dict[str, Any], str | None]] = [
    # id, model, compliance, expected exclusion (substring) or None
    ("fine-tune-inherits-CN", "qwen-ft", {"denied_origin_countries": ["CN"]}, "model origin CN is denied"),
    ("fine-tune-inherits-developer", "qwen-ft", {"allowed_developers": ["Alibaba"]}, None),
    ("fine-tune-of-fine-tune-inherits", "qwen-ft-ft", {"denied_developers": ["alibaba"]}, "Alibaba is denied"),
    ("own-origin-replaces-base", "own-ft", {"denied_origin_countries": ["CN"]}, None),
    ("own-origin-replaces-base-developer", "own-ft", {"allowed_developers": ["Alibaba"]}, "Acme is not allowed"),
]


@pytest.mark.parametrize(
    ("model", "compliance", "reason"), [c[1:] for c in ORIGIN_CASES], ids=[c[0] for c in ORIGIN_CASES]
)
def test_fine_tunes_inherit_their_base_models_origin(
    model: str, compliance: dict[str, Any], reason: str | None
) -> None:
    policy = _policy({"compliance": compliance}, route={"name": "r", "models": [model]})
    if reason is None:
        assert _decide(policy).targets
        return
    with pytest.raises(PermissionDenied) as info:
        _decide(policy)
    assert info.value.code == "no_compliant_candidate" and reason in info.value.message


def test_ingress_region_required() -> None:
    policy = _policy({"compliance": {"required_ingress_regions": ["eu-central", "EU-West"]}})
    assert _decide(policy, ingress_region="eu-west").targets  # names ignore case
    for region in ("us-east", None):
        with pytest.raises(PermissionDenied) as info:
            _decide(policy, ingress_region=region)
        err = info.value
        assert (err.status, err.code) == (403, "ingress_region_not_allowed")
        assert "['eu-central', 'EU-West']" in err.message


def test_a_route_prefers_deployments_in_the_ingress_region() -> None:
    route = {
        "name": "r",
        "models": ["llama"],
        "objective": "ordered",
        "max_attempts": 10,
        "prefer": {"ingress_region": True},
    }
    policy = _policy({}, route=route)
    plan = _decide(policy, ingress_region="eu-west")
    assert _backends(plan)[0] == "mystery"
    plan = _decide(policy, ingress_region="us-east")
    assert _backends(plan)[0] == "together"
    assert plan.decision.ingress_region == "us-east"
    # Without a region the declared order stands.
    assert _backends(_decide(policy))[0] == "gpu-eu"


def test_rules_prefer_high_memory_chips_for_long_prompts_and_the_cheapest_chip_for_batch() -> None:
    route = {"name": "r", "models": ["llama"], "objective": "ordered", "max_attempts": 10}
    rules = [
        {"name": "long prompts on big memory", "when": {"min_prompt_tokens": 32000}, "then": {"prefer": {"min_memory_gb": 141}}},
        {
            "name": "batch on the cheapest chip",
            "when": {"header": {"name": "x-strait-priority", "equals": "batch"}},
            "then": {"prefer": {"chips": ["L4", "H100"]}},
        },
    ]  # fmt: skip
    policy = _policy({}, route=route, rules=rules)
    assert _backends(_decide(policy))[0] == "gpu-eu"
    long = _decide(policy, prompt_tokens=40000)
    assert _backends(long)[0] == "mystery"  # 192 GB per chip
    batch = _decide(policy, headers={"x-strait-priority": "batch"})
    assert [t.backend.name for t in batch.targets][:2] == ["together", "gpu-eu"]  # L4 then H100, then the rest
    rows = {r.backend: r for r in batch.decision.rows}
    assert rows["gpu-eu"].hardware == "8x H100 80GB"
    assert rows["aliyun-fra"].hardware is None
    assert rows["mystery"].region == "eu-west"


def test_rule_hardware_constraints_exclude_unknown_hardware() -> None:
    route = {"name": "r", "models": ["llama"], "max_attempts": 10}
    rules = [{"name": "big chips only", "then": {"constraints": {"chips": ["H100", "mi300x"], "min_memory_gb": 80}}}]
    plan = _decide(_policy({}, route=route, rules=rules))
    assert [t.backend.name for t in plan.targets] == ["gpu-eu", "mystery"]
    rows = _excluded(plan)
    assert rows["aliyun-fra"] == "a rule allows only chips ['H100', 'mi300x'] (this backend: unknown)"
    assert rows["together"] == "a rule allows only chips ['H100', 'mi300x'] (this backend: L4)"


# ---- refusal codes: which stage left nothing ----


def _refusal(policy: PolicySet, **features: Any) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        _decide(policy, **features)
    return info.value


def test_no_compliant_candidate_lists_the_routes_exclusions() -> None:
    err = _refusal(_policy({"compliance": {"allowed_jurisdictions": ["JP"]}}))
    assert isinstance(err, PermissionDenied)
    assert (err.status, err.code, err.param) == (403, "no_compliant_candidate", "model")
    for backend in ("gpu-eu", "aliyun-fra", "together", "mystery", "nz"):
        assert f"qwen@{backend}: hosting jurisdiction" in err.message


def test_policy_widening_refused() -> None:
    policy = _policy({"compliance": {"allowed_jurisdictions": ["EEA"]}})
    err = _refusal(policy, preferences=Preferences(jurisdictions=("EU", "US")))
    assert (err.status, err.code, err.param) == (403, "policy_widening_refused", "strait.jurisdictions")
    assert "['US']" in err.message
    # Narrowing to a contained bloc is not widening.
    plan = _decide(policy, preferences=Preferences(jurisdictions=("EU",)))
    assert [t.backend.name for t in plan.targets] == ["gpu-eu", "aliyun-fra", "mystery"]


def test_capability_missing_is_judged_over_compliant_candidates_only() -> None:
    err = _refusal(_policy({}), needs=frozenset({"vision"}))
    assert isinstance(err, InvalidRequest)
    assert (err.status, err.code, err.param) == (400, "capability_missing", "model")
    assert "vision" in err.message


def test_context_length_names_the_largest_window_the_tenant_may_use() -> None:
    policy = msgspec.convert(
        {
            "operators": [{"name": "o", "headquarters": "US"}],
            "backends": [
                {"name": "us", "adapter": "simulated", "hosting": {"operator": "o", "jurisdiction": "US"}},
                {"name": "de", "adapter": "simulated", "hosting": {"operator": "o", "jurisdiction": "DE"}},
            ],
            "models": [
                {
                    "name": "huge-us",
                    "context_window": 100000,
                    "deployments": [{"backend": "us", "upstream_model": "a"}],
                },
                {"name": "small-de", "context_window": 4000, "deployments": [{"backend": "de", "upstream_model": "b"}]},
                {
                    "name": "mid-de-no-tools",
                    "context_window": 8000,
                    "deployments": [{"backend": "de", "upstream_model": "c"}],
                },
            ],
            "routes": [{"name": "r", "models": ["huge-us", "small-de", "mid-de-no-tools"]}],
            "tenants": [{"name": "t", "compliance": {"allowed_jurisdictions": ["EU"]}}],
        },
        PolicySet,
    )
    err = _refusal(policy, prompt_tokens=9000)
    assert (err.status, err.code) == (400, "context_length_exceeded")
    # The US model's window is not one the tenant may use; the largest usable is 8000.
    assert "maximum context length is 8000 tokens" in err.message


# An origin rule's reason names how the rule matched the model: a developer rule by the developer, a
# country rule by the country (a policy bloc included), and what the model does not declare as unknown.
RULE_WORDING_CASES: list[tuple[str, dict[str, Any], dict[str, Any] | None, str]] = [
    # id, origin rule, the model's origin, the exclusion of qwen@aliyun-fra
    (
        "developer-rule-named-by-developer",
        {"developers": ["alibaba"], "deny_developer_operated": True},
        {"developer": "Alibaba", "country": "CN"},
        "models developed by Alibaba may not run on their developer's own service (Alibaba Cloud belongs to Alibaba)",
    ),
    (
        "country-rule-named-by-country",
        {"origin_countries": ["CN"], "allowed_tiers": ["self-hosted"]},
        {"developer": "Alibaba", "country": "CN"},
        "CN-origin models may run only on tiers ['self-hosted']",
    ),
    (
        "user-bloc-rule-named-by-country",
        {"origin_countries": ["FIVE_EYES"], "allowed_jurisdictions": ["US"]},
        {"developer": "Alibaba", "country": "NZ"},
        "NZ-origin models may run only in ['US']",
    ),
    (
        "unknown-origin-meets-every-rule",
        {"developers": ["Meta"], "allowed_tiers": ["self-hosted"]},
        None,
        "models of unknown origin may run only on tiers ['self-hosted']",
    ),
    (
        "unknown-country-meets-a-country-rule",
        {"origin_countries": ["CN"], "allowed_tiers": ["self-hosted"]},
        {"developer": "Alibaba"},
        "models of unknown origin country (developed by Alibaba) may run only on tiers ['self-hosted']",
    ),
    (
        "unknown-developer-meets-a-developer-rule",
        {"developers": ["Alibaba"], "allowed_tiers": ["self-hosted"]},
        {"country": "CN"},
        "CN-origin models of unknown developer may run only on tiers ['self-hosted']",
    ),
]


@pytest.mark.parametrize(
    ("rule", "origin", "reason"), [c[1:] for c in RULE_WORDING_CASES], ids=[c[0] for c in RULE_WORDING_CASES]
)
def test_an_origin_rules_refusal_names_how_it_matched(
    rule: dict[str, Any], origin: dict[str, Any] | None, reason: str
) -> None:
    policy = _policy({"compliance": {"origin_rules": [rule]}})
    qwen = next(m for m in policy.models if m.name == "qwen")
    models = tuple(
        msgspec.structs.replace(m, origin=None if origin is None else msgspec.convert(origin, type(qwen.origin)))
        if m is qwen
        else m
        for m in policy.models
    )
    plan = _decide(msgspec.structs.replace(policy, models=models))
    assert _excluded(plan)["aliyun-fra"] == reason


def test_an_origin_rule_does_not_reach_a_model_outside_it() -> None:
    # Known developer and country, neither listed: the rule does not apply (nothing unknown to fail on).
    plan = _decide(_policy({"compliance": {"origin_rules": [{"origin_countries": ["US"], "developers": ["Meta"],
                                                              "allowed_tiers": ["edge"]}]}}))  # fmt: skip
    assert _backends(plan) == ["gpu-eu", "aliyun-fra", "together", "mystery", "nz"]
