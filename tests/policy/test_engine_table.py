"""Table-driven tests of the pure routing engine: every constraint, objective, rule and preference.

Each case builds a PolicySet from Structs, runs `decide` and checks the plan, the decision table or the error.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import msgspec
import pytest

from gateway.canonical import Request
from gateway.errors import GatewayError, InvalidRequest, ModelNotFound, PermissionDenied
from gateway.policy.compliance import compliance_reason
from gateway.policy.engine import DEFAULT_OUTPUT_TOKENS, MAX_PREFERENCE_ITEMS, Preferences
from gateway.policy.features import preferences
from gateway.policy.live import LATENCY_PRIOR_MS, LiveState, ScrapeBasis
from gateway.policy.model import Budgets, Compliance
from tests.policy.helpers import (
    ALL_CAPS,
    backend,
    dep,
    index,
    labels,
    model,
    route,
    rows_by_label,
    rule,
    run,
    target,
    tenant,
    who,
)

# ---------------------------------------------------------------------------------------------------------------
# Compliance: one candidate, one tenant envelope, the expected exclusion reason (or None when it is allowed).

CN_RULE = {
    "origin_countries": ["CN"],
    "allowed_tiers": ["self-hosted"],
    "allowed_jurisdictions": ["US", "EU"],
    "deny_developer_operated": True,
}

COMPLIANCE_CASES: list[tuple[str, dict[str, Any], dict[str, Any], dict[str, Any], str | None]] = [
    # id, backend kwargs, model kwargs, compliance, expected reason (substring) or None
    # -- allowed jurisdictions, incl. bloc expansion and fail-closed on unknown
    ("juris-allow-EU-admits-DE", {"juris": "DE"}, {}, {"allowed_jurisdictions": ["EU"]}, None),
    ("juris-allow-EU-admits-EU", {"juris": "EU"}, {}, {"allowed_jurisdictions": ["EU"]}, None),
    ("juris-allow-EU-admits-lowercase-fr", {"juris": "fr"}, {}, {"allowed_jurisdictions": ["EU"]}, None),
    ("juris-allow-lowercase-de-admits-DE", {"juris": "DE"}, {}, {"allowed_jurisdictions": ["de"]}, None),
    ("juris-allow-EEA-admits-NO", {"juris": "NO"}, {}, {"allowed_jurisdictions": ["EEA"]}, None),
    (
        "juris-allow-EU-refuses-NO",
        {"juris": "NO"},
        {},
        {"allowed_jurisdictions": ["EU"]},
        "hosting jurisdiction NO is not in the allowed ['EU']",
    ),
    (
        "juris-allow-DE-refuses-backend-saying-only-EU",
        {"juris": "EU"},
        {},
        {"allowed_jurisdictions": ["DE"]},
        "hosting jurisdiction EU is not in the allowed ['DE']",
    ),
    (
        "juris-allow-DE-refuses-FR",
        {"juris": "FR"},
        {},
        {"allowed_jurisdictions": ["DE"]},
        "hosting jurisdiction FR is not in the allowed ['DE']",
    ),
    (
        "juris-allow-EU-refuses-unknown",
        {"juris": None},
        {},
        {"allowed_jurisdictions": ["EU"]},
        "hosting jurisdiction unknown is not in the allowed ['EU']",
    ),
    (
        "juris-allow-US-refuses-US-backend-claiming-EU",
        {"juris": "EU"},
        {},
        {"allowed_jurisdictions": ["US"]},
        "hosting jurisdiction EU is not in the allowed ['US']",
    ),
    # -- denied jurisdictions
    (
        "juris-deny-US-refuses-US",
        {"juris": "US"},
        {},
        {"denied_jurisdictions": ["US"]},
        "hosting jurisdiction US is denied",
    ),
    (
        "juris-deny-EU-refuses-DE",
        {"juris": "DE"},
        {},
        {"denied_jurisdictions": ["EU"]},
        "hosting jurisdiction DE is denied",
    ),
    (
        "juris-deny-us-lowercase-refuses-US",
        {"juris": "US"},
        {},
        {"denied_jurisdictions": ["us"]},
        "hosting jurisdiction US is denied",
    ),
    ("juris-deny-US-admits-DE", {"juris": "DE"}, {}, {"denied_jurisdictions": ["US"]}, None),
    (
        "juris-deny-list-fails-closed-on-unknown",
        {"juris": None},
        {},
        {"denied_jurisdictions": ["US"]},
        "hosting jurisdiction unknown (it may be a denied one)",
    ),
    (
        "juris-bloc-may-hold-a-denied-member",
        {"juris": "EU"},
        {},
        {"denied_jurisdictions": ["DE"]},
        "hosting jurisdiction EU may be in denied ['DE']",
    ),
    (
        "juris-allow-EU-deny-DE-refuses-DE",
        {"juris": "DE"},
        {},
        {"allowed_jurisdictions": ["EU"], "denied_jurisdictions": ["DE"]},
        "hosting jurisdiction DE is denied",
    ),
    (
        "juris-allow-EU-deny-DE-admits-FR",
        {"juris": "FR"},
        {},
        {"allowed_jurisdictions": ["EU"], "denied_jurisdictions": ["DE"]},
        None,
    ),
    # -- origin countries
    ("origin-allow-US-admits-US", {}, {"country": "US"}, {"allowed_origin_countries": ["US"]}, None),
    ("origin-allow-EU-admits-FR", {}, {"country": "FR"}, {"allowed_origin_countries": ["EU"]}, None),
    (
        "origin-allow-US-refuses-CN",
        {},
        {"country": "CN"},
        {"allowed_origin_countries": ["US"]},
        "model origin CN is not in the allowed ['US']",
    ),
    (
        "origin-allow-US-refuses-unknown-origin",
        {},
        {},
        {"allowed_origin_countries": ["US"]},
        "model origin unknown is not in the allowed ['US']",
    ),
    (
        "origin-allow-US-refuses-developer-without-country",
        {},
        {"developer": "Meta"},
        {"allowed_origin_countries": ["US"]},
        "model origin unknown is not in the allowed ['US']",
    ),
    (
        "origin-deny-CN-refuses-CN",
        {},
        {"country": "CN"},
        {"denied_origin_countries": ["CN"]},
        "model origin CN is denied",
    ),
    (
        "origin-deny-cn-lowercase-refuses-CN",
        {},
        {"country": "CN"},
        {"denied_origin_countries": ["cn"]},
        "model origin CN is denied",
    ),
    (
        "origin-deny-EU-refuses-FR",
        {},
        {"country": "FR"},
        {"denied_origin_countries": ["EU"]},
        "model origin FR is denied",
    ),
    ("origin-deny-CN-admits-US", {}, {"country": "US"}, {"denied_origin_countries": ["CN"]}, None),
    # -- developers
    ("dev-allow-Meta-admits-Meta", {}, {"developer": "Meta"}, {"allowed_developers": ["Meta"]}, None),
    (
        "dev-allow-Meta-refuses-Mistral",
        {},
        {"developer": "Mistral"},
        {"allowed_developers": ["Meta"]},
        "model developer Mistral is not allowed",
    ),
    (
        "dev-allow-Meta-refuses-unknown",
        {},
        {"country": "US"},
        {"allowed_developers": ["Meta"]},
        "model developer unknown is not allowed",
    ),
    (
        "dev-deny-DeepSeek-refuses-DeepSeek",
        {},
        {"developer": "DeepSeek"},
        {"denied_developers": ["DeepSeek"]},
        "model developer DeepSeek is denied",
    ),
    ("dev-deny-DeepSeek-admits-Meta", {}, {"developer": "Meta"}, {"denied_developers": ["DeepSeek"]}, None),
    # -- tiers
    ("tier-allow-edge-admits-edge", {"tier": "edge"}, {}, {"allowed_tiers": ["edge", "self-hosted"]}, None),
    (
        "tier-allow-edge-refuses-provider",
        {"tier": "provider"},
        {},
        {"allowed_tiers": ["edge", "self-hosted"]},
        "tier provider is not allowed",
    ),
    # -- retention, incl. the boundary and fail-closed on unknown
    ("retention-0-admits-0", {"retention": 0}, {}, {"max_retention_days": 0}, None),
    ("retention-30-admits-30", {"retention": 30}, {}, {"max_retention_days": 30}, None),
    (
        "retention-30-refuses-31",
        {"retention": 31},
        {},
        {"max_retention_days": 30},
        "retention 31 days exceeds the allowed 30 days",
    ),
    (
        "retention-0-refuses-unknown",
        {"retention": None},
        {},
        {"max_retention_days": 0},
        "retention unknown exceeds the allowed 0 days",
    ),
    # -- no training
    ("no-training-refuses-trainer", {"trains": True}, {}, {"no_training": True}, "the operator trains on request data"),
    ("no-training-admits-non-trainer", {"trains": False}, {}, {"no_training": True}, None),
    ("training-allowed-admits-trainer", {"trains": True}, {}, {"no_training": False}, None),
    # -- certifications
    ("certs-all-present", {"certs": ("SOC2", "ISO27001")}, {}, {"required_certifications": ["SOC2", "ISO27001"]}, None),
    (
        "certs-one-missing",
        {"certs": ("SOC2",)},
        {},
        {"required_certifications": ["SOC2", "ISO27001"]},
        "missing certifications ['ISO27001']",
    ),
    ("certs-none-present", {}, {}, {"required_certifications": ["HIPAA"]}, "missing certifications ['HIPAA']"),
    ("certs-none-required", {"certs": ("SOC2",)}, {}, {}, None),
    # -- origin rules: CN-origin only on self-hosted US/EU, never the developer's own API; US-origin unaffected
    (
        "origin-rule-CN-on-self-hosted-US",
        {"tier": "self-hosted", "juris": "US", "operator": "us"},
        {"country": "CN", "developer": "DeepSeek"},
        {"origin_rules": [CN_RULE]},
        None,
    ),
    (
        "origin-rule-CN-on-self-hosted-DE-via-EU-bloc",
        {"tier": "self-hosted", "juris": "DE", "operator": "us"},
        {"country": "CN", "developer": "DeepSeek"},
        {"origin_rules": [CN_RULE]},
        None,
    ),
    (
        "origin-rule-CN-on-provider-refused",
        {"tier": "provider", "juris": "US", "operator": "Together"},
        {"country": "CN", "developer": "DeepSeek"},
        {"origin_rules": [CN_RULE]},
        "CN-origin models may run only on tiers ['self-hosted']",
    ),
    (
        "origin-rule-CN-on-developer-API-refused",
        {"tier": "provider", "juris": "CN", "operator": "DeepSeek"},
        {"country": "CN", "developer": "DeepSeek"},
        {"origin_rules": [CN_RULE]},
        "CN-origin models may run only on tiers ['self-hosted']",
    ),
    (
        "origin-rule-CN-self-hosted-SG-refused",
        {"tier": "self-hosted", "juris": "SG"},
        {"country": "CN", "developer": "DeepSeek"},
        {"origin_rules": [CN_RULE]},
        "CN-origin models may run only in ['US', 'EU']",
    ),
    (
        "origin-rule-CN-self-hosted-unknown-juris-refused",
        {"tier": "self-hosted", "juris": None},
        {"country": "CN", "developer": "DeepSeek"},
        {"origin_rules": [CN_RULE]},
        "CN-origin models may run only in ['US', 'EU']",
    ),
    (
        "origin-rule-CN-self-hosted-US-but-developer-operated-refused",
        {"tier": "self-hosted", "juris": "US", "operator": "deepseek"},
        {"country": "CN", "developer": "DeepSeek"},
        {"origin_rules": [CN_RULE]},
        "CN-origin models may not run on their developer's own service",
    ),
    (
        "origin-rule-deny-developer-operated-only",
        {"tier": "provider", "juris": "CN", "operator": "DeepSeek"},
        {"country": "CN", "developer": "DeepSeek"},
        {"origin_rules": [{"origin_countries": ["CN"], "deny_developer_operated": True}]},
        "CN-origin models may not run on their developer's own service",
    ),
    (
        "origin-rule-deny-developer-operated-third-party-ok",
        {"tier": "provider", "juris": "US", "operator": "Together"},
        {"country": "CN", "developer": "DeepSeek"},
        {"origin_rules": [{"origin_countries": ["CN"], "deny_developer_operated": True}]},
        None,
    ),
    (
        "origin-rule-US-origin-unaffected-on-provider",
        {"tier": "provider", "juris": "SG", "operator": "Meta"},
        {"country": "US", "developer": "Meta"},
        {"origin_rules": [CN_RULE]},
        None,
    ),
    (
        "origin-rule-by-developer-applies-without-country",
        {"tier": "provider", "juris": "US"},
        {"developer": "DeepSeek"},
        {"origin_rules": [{"developers": ["DeepSeek"], "allowed_tiers": ["self-hosted"]}]},
        "models developed by DeepSeek may run only on tiers ['self-hosted']",
    ),
    (
        "origin-rule-by-bloc-applies-to-member",
        {"tier": "provider", "juris": "US"},
        {"country": "FR"},
        {"origin_rules": [{"origin_countries": ["EU"], "allowed_jurisdictions": ["EU"]}]},
        "FR-origin models may run only in ['EU']",
    ),
    # -- no compliance at all admits anything, even with every attribute unknown
    ("empty-compliance-admits-unknowns", {}, {}, {}, None),
    # -- training is tri-state: not declared fails a no_training tenant closed
    (
        "no-training-refuses-undeclared",
        {"trains": None},
        {},
        {"no_training": True},
        "the operator does not declare trains_on_data: false",
    ),
    ("training-allowed-admits-undeclared", {"trains": None}, {}, {}, None),
    # -- blocs are sets with containment: EU ⊂ EEA
    ("juris-allow-EEA-admits-EU-declared", {"juris": "EU"}, {}, {"allowed_jurisdictions": ["EEA"]}, None),
    (
        "juris-allow-EU-refuses-EEA-declared",
        {"juris": "EEA"},
        {},
        {"allowed_jurisdictions": ["EU"]},
        "hosting jurisdiction EEA is not in the allowed ['EU']",
    ),
    (
        "juris-deny-EEA-refuses-EU-declared",
        {"juris": "EU"},
        {},
        {"denied_jurisdictions": ["EEA"]},
        "hosting jurisdiction EU is denied",
    ),
    (
        "juris-deny-EU-refuses-EEA-declared-that-may-be-in-it",
        {"juris": "EEA"},
        {},
        {"denied_jurisdictions": ["EU"]},
        "hosting jurisdiction EEA may be in denied",
    ),
    ("juris-deny-EU-admits-NO", {"juris": "NO"}, {}, {"denied_jurisdictions": ["EU"]}, None),
    ("origin-allow-EEA-admits-EU-origin", {}, {"country": "EU"}, {"allowed_origin_countries": ["EEA"]}, None),
    # -- origin rules fail closed on what they cannot tell
    (
        "origin-rule-deny-developer-operated-refuses-unknown-developer",
        {"tier": "provider", "juris": "US", "operator": "Together"},
        {"country": "CN"},
        {"origin_rules": [{"origin_countries": ["CN"], "deny_developer_operated": True}]},
        "CN-origin models may not run on their developer's own service (developer unknown)",
    ),
    (
        "origin-rule-deny-developer-operated-refuses-unknown-operator",
        {"tier": "provider", "juris": "US"},
        {"country": "CN", "developer": "DeepSeek"},
        {"origin_rules": [{"origin_countries": ["CN"], "deny_developer_operated": True}]},
        "CN-origin models may not run on their developer's own service (operator unknown)",
    ),
    (
        "origin-rule-by-bloc-applies-to-bloc-origin",
        {"tier": "provider", "juris": "US"},
        {"country": "EU"},
        {"origin_rules": [{"origin_countries": ["FR"], "allowed_jurisdictions": ["EU"]}]},
        "EU-origin models may run only in ['EU']",
    ),
    # -- operators without declared entities (a Target built alone) fail headquarters rules closed
    (
        "operator-country-deny-refuses-undeclared-operator",
        {"operator": "Together"},
        {},
        {"denied_operator_countries": ["CN"]},
        "operator Together has no declared headquarters",
    ),
    (
        "operator-name-deny-refuses-named",
        {"operator": "Together"},
        {},
        {"denied_operators": ["together"]},
        "operator Together is denied",
    ),
    (
        "operator-name-deny-refuses-unknown",
        {},
        {},
        {"denied_operators": ["Together"]},
        "operator unknown (it may be a denied one)",
    ),
]


@pytest.mark.parametrize(
    ("backend_kw", "model_kw", "compliance", "expected"),
    [c[1:] for c in COMPLIANCE_CASES],
    ids=[c[0] for c in COMPLIANCE_CASES],
)
def test_compliance_reason(
    backend_kw: dict[str, Any], model_kw: dict[str, Any], compliance: dict[str, Any], expected: str | None
) -> None:
    b = backend("b", **backend_kw)
    m = model("m", dep("b"), **model_kw)
    got = compliance_reason(target(b, m), msgspec.convert(compliance, Compliance))
    if expected is None:
        assert got is None
    else:
        assert got is not None
        assert expected in got


@pytest.mark.parametrize(
    ("backend_kw", "model_kw", "compliance", "expected"),
    [c[1:] for c in COMPLIANCE_CASES],
    ids=[c[0] for c in COMPLIANCE_CASES],
)
def test_compliance_through_decide(
    backend_kw: dict[str, Any], model_kw: dict[str, Any], compliance: dict[str, Any], expected: str | None
) -> None:
    idx = index(
        [backend("b", **backend_kw)],
        [model("m", dep("b"), **model_kw)],
        [route("r", "m")],
        [tenant("t", **compliance)],
    )
    if expected is None:
        assert labels(run(idx)) == ["m@b"]
        return
    with pytest.raises(PermissionDenied) as info:
        run(idx)
    err = info.value
    assert (err.status, err.type, err.code, err.param) == (403, "permission_denied", "no_compliant_candidate", "model")
    assert f"m@b: {expected}" in err.message


def test_compliant_candidate_survives_next_to_an_excluded_one() -> None:
    idx = index(
        [backend("us", juris="US"), backend("de", juris="DE")],
        [model("m", dep("us"), dep("de"))],
        [route("r", "m")],
        [tenant("t", allowed_jurisdictions=["EU"])],
    )
    plan = run(idx)
    assert labels(plan) == ["m@de"]
    rows = rows_by_label(plan)
    assert rows["m@us"].excluded == "hosting jurisdiction US is not in the allowed ['EU']"
    assert rows["m@us"].rank is None
    assert rows["m@de"].excluded is None and rows["m@de"].rank == 1


def test_developer_deny_list_is_case_insensitive_like_every_other_name() -> None:
    """Countries and jurisdictions are upper-cased on both sides and the origin rule compares operator and
    developer case-insensitively, so a deny-list entry 'deepseek' must also refuse a model by 'DeepSeek':
    a deny-list that fails open on letter case is a compliance hole."""
    m = model("m", dep("b"), developer="DeepSeek")
    denied = compliance_reason(target(backend("b"), m), Compliance(denied_developers=("deepseek",)))
    assert denied is not None, "denied_developers ['deepseek'] let a 'DeepSeek' model through"
    ruled = compliance_reason(
        target(backend("b", tier="provider"), m),
        msgspec.convert({"origin_rules": [{"developers": ["deepseek"], "allowed_tiers": ["self-hosted"]}]}, Compliance),
    )
    assert ruled is not None, "an origin rule for developer 'deepseek' did not apply to a 'DeepSeek' model"


# ---------------------------------------------------------------------------------------------------------------
# Capabilities, operation, context window, health.

CAPABILITY_CASES = [
    ("tools-needed-plain-model-excluded", {"tools"}, ["m-full"], {"m-plain": "model lacks tools"}),
    ("vision-needed", {"vision"}, ["m-full"], {"m-plain": "model lacks vision"}),
    ("json-needed", {"json"}, ["m-full"], {"m-plain": "model lacks json"}),
    ("two-missing-listed-sorted", {"vision", "tools"}, ["m-full"], {"m-plain": "model lacks tools, vision"}),
    ("nothing-needed-both-used", set(), ["m-plain", "m-full"], {}),
]


@pytest.mark.parametrize(
    ("needs", "plan", "excluded"), [c[1:] for c in CAPABILITY_CASES], ids=[c[0] for c in CAPABILITY_CASES]
)
def test_capabilities_the_request_uses(needs: set[str], plan: list[str], excluded: dict[str, str]) -> None:
    idx = index(
        [backend("b")],
        [model("m-plain", dep("b")), model("m-full", dep("b"), caps=ALL_CAPS)],
        [route("r", "m-plain", "m-full", max_attempts=5)],
    )
    result = run(idx, needs=frozenset(needs))
    assert [t.model.name for t in result.targets] == plan
    got = {r.model: r.excluded for r in result.decision.rows if r.excluded}
    assert got == excluded


def test_request_needing_a_capability_no_candidate_has_is_400_capability_missing() -> None:
    idx = index([backend("b")], [model("m", dep("b"))], [route("r", "m")])
    with pytest.raises(InvalidRequest, match=r"m@b: model lacks vision") as info:
        run(idx, needs=frozenset({"vision"}))
    assert (info.value.status, info.value.code, info.value.param) == (400, "capability_missing", "model")
    assert "supports vision" in info.value.message


def test_operation_no_candidate_supports_is_400_unsupported_operation() -> None:
    idx = index([backend("b")], [model("m", dep("b"))], [route("r", "m")])
    with pytest.raises(InvalidRequest) as info:
        run(idx, operation="embeddings")
    assert (info.value.status, info.value.code) == (400, "unsupported_operation")


CONTEXT_CASES = [
    # id, prompt, max_tokens, expected plan (model names), expected exclusions
    ("fits-all", 100, 100, ["small", "large", "unbounded"], {}),
    ("exactly-the-window-fits", 900, 100, ["small", "large", "unbounded"], {}),
    (
        "one-over-small",
        900,
        101,
        ["large", "unbounded"],
        {"small": "context window is 1000 tokens, the request needs 1001"},
    ),
    (
        "no-max-tokens-counts-prompt-only",
        1500,
        None,
        ["large", "unbounded"],
        {"small": "context window is 1000 tokens, the request needs 1500"},
    ),
    (
        "only-unbounded-left",
        9000,
        1000,
        ["unbounded"],
        {
            "small": "context window is 1000 tokens, the request needs 10000",
            "large": "context window is 8000 tokens, the request needs 10000",
        },
    ),
]


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "plan", "excluded"), [c[1:] for c in CONTEXT_CASES], ids=[c[0] for c in CONTEXT_CASES]
)
def test_context_window(prompt: int, max_tokens: int | None, plan: list[str], excluded: dict[str, str]) -> None:
    idx = index(
        [backend("b")],
        [model("small", dep("b"), ctx=1000), model("large", dep("b"), ctx=8000), model("unbounded", dep("b"))],
        [route("r", "small", "large", "unbounded", max_attempts=5)],
    )
    result = run(idx, prompt_tokens=prompt, max_tokens=max_tokens)
    assert [t.model.name for t in result.targets] == plan
    assert {r.model: r.excluded for r in result.decision.rows if r.excluded} == excluded


def test_too_long_for_every_candidate_is_400_context_length_exceeded() -> None:
    idx = index(
        [backend("b")],
        [model("small", dep("b"), ctx=1000), model("large", dep("b"), ctx=2000)],
        [route("r", "small", "large")],
    )
    with pytest.raises(InvalidRequest) as info:
        run(idx, prompt_tokens=2500, max_tokens=10)
    err = info.value
    assert (err.status, err.code, err.param) == (400, "context_length_exceeded", "messages")
    assert "maximum context length is 2000 tokens" in err.message
    assert "you requested 2510 tokens" in err.message
    assert not isinstance(err, PermissionDenied)


HEALTH_CASES = [
    ("all-healthy", frozenset(), ["m@b1", "m@b2"]),
    ("first-ejected", frozenset({"b1"}), ["m@b2"]),
    ("unknown-name-ignored", frozenset({"nope"}), ["m@b1", "m@b2"]),
]


@pytest.mark.parametrize(("unhealthy", "plan"), [c[1:] for c in HEALTH_CASES], ids=[c[0] for c in HEALTH_CASES])
def test_health(unhealthy: frozenset[str], plan: list[str]) -> None:
    idx = index([backend("b1"), backend("b2")], [model("m", dep("b1"), dep("b2"))], [route("r", "m")])
    result = run(idx, live=LiveState(unhealthy=unhealthy))
    assert labels(result) == plan
    for name in unhealthy & {"b1", "b2"}:
        assert rows_by_label(result)[f"m@{name}"].excluded == "backend is ejected (unhealthy)"


def test_every_backend_ejected_is_panic_mode_not_a_refusal() -> None:
    """Envoy's panic mode: when every candidate is ejected, refusing everyone helps no one; they are ranked
    as if healthy, flagged in the table."""
    idx = index([backend("b1"), backend("b2")], [model("m", dep("b1"), dep("b2"))], [route("r", "m")])
    result = run(idx, live=LiveState(unhealthy=frozenset({"b1", "b2"})))
    assert labels(result) == ["m@b1", "m@b2"]
    assert result.decision.panic and result.panic
    assert all(r.ejected and r.excluded is None for r in result.decision.rows)
    # One healthy candidate left: no panic, the ejected one is excluded.
    one = run(idx, live=LiveState(unhealthy=frozenset({"b1"})))
    assert labels(one) == ["m@b2"] and not one.decision.panic
    assert not any(r.ejected for r in one.decision.rows)


def test_a_deployment_label_can_be_ejected_alone() -> None:
    idx = index([backend("b1")], [model("m", dep("b1")), model("n", dep("b1"))], [route("r", "m", "n")])
    result = run(idx, live=LiveState(unhealthy=frozenset({"m@b1"})))
    assert labels(result) == ["n@b1"]
    assert rows_by_label(result)["m@b1"].excluded == "backend is ejected (unhealthy)"


# ---------------------------------------------------------------------------------------------------------------
# Objectives.

# A: cheap input, dear output. B: dear input, cheap output. C: dear both.
PRICED = [("a", 1.0, 10.0), ("b", 5.0, 1.0), ("c", 20.0, 20.0)]

COST_CASES = [
    # id, prompt, max_tokens, expected order
    ("long-prompt-short-answer-favours-cheap-input", 1000, 10, ["a", "b", "c"]),
    ("short-prompt-long-answer-favours-cheap-output", 10, 1000, ["b", "a", "c"]),
    ("no-max-tokens-assumes-default-output", 100, None, ["b", "a", "c"]),
]


@pytest.mark.parametrize(("prompt", "max_tokens", "order"), [c[1:] for c in COST_CASES], ids=[c[0] for c in COST_CASES])
def test_objective_cost(prompt: int, max_tokens: int | None, order: list[str]) -> None:
    backends = [backend(name) for name, _, _ in PRICED]
    models = [model(f"m-{name}", dep(name, i, o)) for name, i, o in PRICED]
    # Declared in reverse so that the order can only come from the objective.
    idx = index(backends, models, [route("r", "m-c", "m-b", "m-a", objective="cost", max_attempts=5)])
    result = run(idx, prompt_tokens=prompt, max_tokens=max_tokens)
    assert [t.backend.name for t in result.targets] == order
    out = max_tokens or DEFAULT_OUTPUT_TOKENS
    for name, i, o in PRICED:
        assert rows_by_label(result)[f"m-{name}@{name}"].est_cost_usd == pytest.approx((prompt * i + out * o) / 1e6)
    assert [r.rank for r in sorted(result.decision.rows, key=lambda r: r.rank or 0)] == [1, 2, 3]


LATENCY_CASES = [
    # id, latency_ms map, expected order of backends edge/self/prov (declared provider, self-hosted, edge)
    ("no-measurements-tier-priors", {}, ["edge", "self", "prov"]),
    ("measured-provider-beats-edge-prior", {"prov": 100.0}, ["prov", "edge", "self"]),
    ("measured-slow-edge-falls-behind-priors", {"edge": 1000.0}, ["self", "prov", "edge"]),
    ("label-beats-backend-measurement", {"self": 900.0, "m@self": 10.0}, ["self", "edge", "prov"]),
    ("all-measured", {"edge": 50.0, "self": 40.0, "prov": 30.0}, ["prov", "self", "edge"]),
]


@pytest.mark.parametrize(("latency", "order"), [c[1:] for c in LATENCY_CASES], ids=[c[0] for c in LATENCY_CASES])
def test_objective_latency(latency: dict[str, float], order: list[str]) -> None:
    idx = index(
        [backend("prov", tier="provider"), backend("self", tier="self-hosted"), backend("edge", tier="edge")],
        [model("m", dep("prov"), dep("self"), dep("edge"))],
        [route("r", "m", objective="latency", max_attempts=5)],
    )
    result = run(idx, live=LiveState(latency_ms=latency))
    assert [t.backend.name for t in result.targets] == order
    rows = rows_by_label(result)
    if not latency:
        assert rows["m@edge"].latency_ms == LATENCY_PRIOR_MS["edge"]
        assert rows["m@self"].latency_ms == LATENCY_PRIOR_MS["self-hosted"]
        assert rows["m@prov"].latency_ms == LATENCY_PRIOR_MS["provider"]


def test_latency_by_label_distinguishes_models_on_one_backend() -> None:
    idx = index(
        [backend("b")],
        [model("slow", dep("b")), model("fast", dep("b"))],
        [route("r", "slow", "fast", objective="latency")],
    )
    result = run(idx, live=LiveState(latency_ms={"b": 500.0, "fast@b": 20.0}))
    assert labels(result) == ["fast@b", "slow@b"]
    assert rows_by_label(result)["slow@b"].latency_ms == 500.0


# cheap+slow vs dear+fast. Prompt 1_000_000, max_tokens 1 → cost ≈ input price in USD.
BALANCED_CASES = [
    ("all-cost", {"cost": 1.0, "latency": 0.0}, ["cheap", "fast"]),
    ("all-latency", {"cost": 0.0, "latency": 1.0}, ["fast", "cheap"]),
    ("mostly-cost", {"cost": 0.8, "latency": 0.2}, ["cheap", "fast"]),
    ("mostly-latency", {"cost": 0.2, "latency": 0.8}, ["fast", "cheap"]),
]


@pytest.mark.parametrize(("weights", "order"), [c[1:] for c in BALANCED_CASES], ids=[c[0] for c in BALANCED_CASES])
def test_objective_balanced(weights: dict[str, float], order: list[str]) -> None:
    idx = index(
        [backend("cheap"), backend("fast")],
        [model("m", dep("fast", 10.0, 0.0), dep("cheap", 1.0, 0.0))],
        [route("r", "m", objective="balanced", weights=weights)],
    )
    result = run(
        idx, prompt_tokens=1_000_000, max_tokens=1, live=LiveState(latency_ms={"cheap": 1000.0, "fast": 100.0})
    )
    assert [t.backend.name for t in result.targets] == order
    # The score is the weighted, max-normalised sum of cost and latency.
    total = weights["cost"] + weights["latency"]
    rows = rows_by_label(result)
    assert rows["m@cheap"].score == pytest.approx((weights["cost"] * 0.1 + weights["latency"] * 1.0) / total, abs=1e-6)
    assert rows["m@fast"].score == pytest.approx((weights["cost"] * 1.0 + weights["latency"] * 0.1) / total, abs=1e-6)


def test_objective_ordered_keeps_declared_order_whatever_price_and_latency() -> None:
    idx = index(
        [backend("b1", tier="provider"), backend("b2", tier="edge"), backend("b3", tier="self-hosted")],
        [model("first", dep("b1", 99.0, 99.0)), model("second", dep("b2", 0.0, 0.0)), model("third", dep("b3"))],
        [route("r", "first", "second", "third", objective="ordered")],
    )
    result = run(idx, prompt_tokens=1000, live=LiveState(latency_ms={"b1": 9999.0, "b2": 1.0}))
    assert labels(result) == ["first@b1", "second@b2", "third@b3"]
    assert result.decision.objective == "ordered"


def test_ordered_keeps_deployment_order_within_a_model() -> None:
    idx = index(
        [backend("z"), backend("a"), backend("m")],
        [model("x", dep("z"), dep("a"), dep("m"))],
        [route("r", "x")],
    )
    assert labels(run(idx)) == ["x@z", "x@a", "x@m"]


# ---------------------------------------------------------------------------------------------------------------
# Spillover: edge preferred until its utilisation reaches the threshold, then behind the provider.

SPILL_CASES: list[tuple[str, dict[str, Any], list[str]]] = [
    ("idle-edge-first", {}, ["edge", "prov"]),
    ("edge-below-threshold", {"utilisation": {"edge": 0.79}}, ["edge", "prov"]),
    ("edge-at-threshold-spills", {"utilisation": {"edge": 0.8}}, ["prov", "edge"]),
    ("edge-full-spills", {"utilisation": {"edge": 1.0}}, ["prov", "edge"]),
    ("in-flight-below", {"in_flight": {"edge": 7}}, ["edge", "prov"]),
    ("in-flight-at-threshold-spills", {"in_flight": {"edge": 8}}, ["prov", "edge"]),
    (
        "utilisation-gauge-wins-over-fewer-in-flight",
        {"utilisation": {"edge": 0.9}, "in_flight": {"edge": 1}},
        ["prov", "edge"],
    ),
    (
        # The gauge lags a scrape behind: this gateway's own in-flight requests are a floor known now.
        "in-flight-floor-over-a-lagging-gauge",
        {"utilisation": {"edge": 0.1}, "in_flight": {"edge": 10}},
        ["prov", "edge"],
    ),
    ("both-full-keep-tier-order", {"utilisation": {"edge": 0.9, "prov": 0.95}}, ["edge", "prov"]),
    (
        # Scraped at the threshold with 8 of this gateway's requests in it; one finished since: its slot is free.
        "a-request-finished-since-the-scrape-frees-its-slot",
        {"utilisation": {"edge": 0.8}, "in_flight": {"edge": 7}, "scrape_basis": {"edge": ScrapeBasis(8, 8.0, None)}},
        ["edge", "prov"],
    ),
    (
        # Scraped at 0.7 (another client's load with 1 of ours); one more sent since: 0.8, though 2 are ours.
        "a-request-started-since-the-scrape-counts",
        {"utilisation": {"edge": 0.7}, "in_flight": {"edge": 2}, "scrape_basis": {"edge": ScrapeBasis(1, 7.0, None)}},
        ["prov", "edge"],
    ),
]


@pytest.mark.parametrize(("live", "order"), [c[1:] for c in SPILL_CASES], ids=[c[0] for c in SPILL_CASES])
def test_spillover(live: dict[str, Any], order: list[str]) -> None:
    idx = index(
        # The edge is dearer and declared last: only spillover can put it first.
        [backend("prov", tier="provider"), backend("edge", tier="edge", max_concurrency=10)],
        [model("m", dep("prov", 0.1, 0.1), dep("edge", 1.0, 1.0))],
        [route("r", "m", objective="cost", spillover={"threshold": 0.8})],
    )
    result = run(idx, prompt_tokens=100, live=LiveState(**live))
    assert [t.backend.name for t in result.targets] == order


def test_without_spillover_a_full_edge_stays_where_the_objective_puts_it() -> None:
    idx = index(
        [backend("prov", tier="provider"), backend("edge", tier="edge")],
        [model("m", dep("prov", 1.0, 1.0), dep("edge", 0.1, 0.1))],
        [route("r", "m", objective="cost")],
    )
    result = run(idx, prompt_tokens=100, live=LiveState(utilisation={"edge": 1.0}))
    assert [t.backend.name for t in result.targets] == ["edge", "prov"]
    assert rows_by_label(result)["m@edge"].utilisation == 1.0


def test_spillover_custom_tier_order_and_unlisted_tier_last() -> None:
    idx = index(
        [backend("edge", tier="edge"), backend("self", tier="self-hosted"), backend("prov", tier="provider")],
        [model("m", dep("edge"), dep("self"), dep("prov"))],
        [route("r", "m", spillover={"tiers": ["provider", "edge"]}, max_attempts=5)],
    )
    assert [t.backend.name for t in run(idx).targets] == ["prov", "edge", "self"]
    # A spilled provider goes behind even the unlisted tier.
    spilled = run(idx, live=LiveState(utilisation={"prov": 0.99}))
    assert [t.backend.name for t in spilled.targets] == ["edge", "self", "prov"]


# ---------------------------------------------------------------------------------------------------------------
# Fallback routes: appended last, filtered by the same compliance.


def _fallback_index(**tenant_compliance: Any) -> Any:
    return index(
        [backend("eu-1", juris="DE"), backend("eu-2", juris="FR"), backend("us", juris="US")],
        [
            model("own", dep("eu-1", 9.0, 9.0)),
            model("fb-eu", dep("eu-2", 0.1, 0.1)),
            model("fb-us", dep("us", 0.0, 0.0)),
        ],
        [
            route("r", "own", fallback=["f"], objective="cost", max_attempts=5),
            route("f", "fb-us", "fb-eu"),
        ],
        [tenant("t", **tenant_compliance)],
    )


def test_fallback_candidates_come_after_own_even_when_cheaper() -> None:
    result = run(_fallback_index(), prompt_tokens=100)
    assert labels(result) == ["own@eu-1", "fb-us@us", "fb-eu@eu-2"]


def test_fallback_is_filtered_by_compliance() -> None:
    result = run(_fallback_index(allowed_jurisdictions=["EU"]), prompt_tokens=100)
    assert labels(result) == ["own@eu-1", "fb-eu@eu-2"]
    assert "is not in the allowed ['EU']" in (rows_by_label(result)["fb-us@us"].excluded or "")


def test_eu_tenant_never_gets_a_us_fallback_even_when_everything_eu_is_down() -> None:
    """Panic mode re-admits ejected candidates only: never one outside the compliance envelope."""
    idx = _fallback_index(allowed_jurisdictions=["EU"])
    result = run(idx, live=LiveState(unhealthy=frozenset({"eu-1", "eu-2"})))
    assert result.panic
    assert labels(result) == ["own@eu-1", "fb-eu@eu-2"]
    assert "is not in the allowed ['EU']" in (rows_by_label(result)["fb-us@us"].excluded or "")


def test_fallback_used_when_own_candidates_all_excluded() -> None:
    result = run(_fallback_index(allowed_jurisdictions=["EU"]), live=LiveState(unhealthy=frozenset({"eu-1"})))
    assert labels(result) == ["fb-eu@eu-2"]


def test_overlapping_fallback_routes_do_not_repeat_a_deployment() -> None:
    """Two fallback routes sharing a model must not put the same deployment twice in the plan (a retry of the
    same upstream) nor twice in the decision table."""
    idx = index(
        [backend("own"), backend("shared")],
        [model("a", dep("own")), model("x", dep("shared"))],
        [route("r", "a", fallback=["f1", "f2"], max_attempts=5), route("f1", "x"), route("f2", "x")],
    )
    result = run(idx)
    assert labels(result) == ["a@own", "x@shared"]
    assert [r.deployment for r in result.decision.rows] == ["a@own", "x@shared"]


def test_fallback_sharing_the_routes_own_model_is_not_repeated() -> None:
    idx = index(
        [backend("b"), backend("c")],
        [model("a", dep("b")), model("x", dep("c"))],
        [route("r", "a", fallback=["f"], max_attempts=5), route("f", "a", "x")],
    )
    assert labels(run(idx)) == ["a@b", "x@c"]


# ---------------------------------------------------------------------------------------------------------------
# max_attempts.

ATTEMPT_CASES = [("one", 1, 1), ("three-of-five", 3, 3), ("five-of-five", 5, 5), ("more-than-candidates", 9, 5)]


@pytest.mark.parametrize(("attempts", "length"), [c[1:] for c in ATTEMPT_CASES], ids=[c[0] for c in ATTEMPT_CASES])
def test_max_attempts_truncates_the_plan(attempts: int, length: int) -> None:
    names = [f"b{i}" for i in range(5)]
    idx = index(
        [backend(n) for n in names],
        [model("m", *(dep(n, float(5 - i), 0.0) for i, n in enumerate(names)))],
        [route("r", "m", objective="cost", max_attempts=attempts)],
    )
    result = run(idx, prompt_tokens=1000)
    assert len(result.targets) == length
    assert list(result.decision.plan) == labels(result)
    # The cheapest come first: b4 (price 1) ... b0 (price 5).
    assert labels(result) == [f"m@b{i}" for i in range(4, 4 - length, -1)]


# ---------------------------------------------------------------------------------------------------------------
# Rules.


def _rules_index(*rules: Any, extra_routes: tuple[Any, ...] = ()) -> Any:
    return index(
        [backend("edge", tier="edge", juris="DE"), backend("prov", tier="provider", juris="US")],
        [
            model("m", dep("prov", 0.1, 0.1), dep("edge", 5.0, 5.0), country="US"),
            model("cn", dep("prov", 0.0, 0.0), country="CN"),
        ],
        [route("r", "m", objective="ordered", max_attempts=5), route("cheap", "cn"), *extra_routes],
        [tenant("t"), tenant("other")],
        list(rules),
    )


NOON = dt.datetime(2025, 1, 15, 12, 0, tzinfo=dt.UTC)

RULE_MATCH_CASES: list[tuple[str, dict[str, Any], dict[str, Any], bool]] = [
    # id, when, request (tenant_name / features), matches
    ("empty-when-matches", {}, {}, True),
    ("tenant-match", {"tenants": ["t"]}, {}, True),
    ("tenant-miss", {"tenants": ["other"]}, {}, False),
    ("tenant-other-matches-other", {"tenants": ["other"]}, {"tenant_name": "other"}, True),
    ("route-match", {"routes": ["r"]}, {}, True),
    ("route-miss", {"routes": ["cheap"]}, {}, False),
    ("header-equals", {"header": {"name": "X-Tier", "equals": "gold"}}, {"headers": {"x-tier": "gold"}}, True),
    (
        "header-equals-other-value",
        {"header": {"name": "X-Tier", "equals": "gold"}},
        {"headers": {"x-tier": "tin"}},
        False,
    ),
    ("header-absent", {"header": {"name": "x-tier", "equals": "gold"}}, {}, False),
    ("header-present-any-value", {"header": {"name": "x-tier"}}, {"headers": {"x-tier": "x"}}, True),
    (
        "header-one-of",
        {"header": {"name": "x-tier", "one_of": ["gold", "silver"]}},
        {"headers": {"x-tier": "silver"}},
        True,
    ),
    ("header-not-one-of", {"header": {"name": "x-tier", "one_of": ["gold"]}}, {"headers": {"x-tier": "tin"}}, False),
    ("min-prompt-below", {"min_prompt_tokens": 100}, {"prompt_tokens": 99}, False),
    ("min-prompt-inclusive", {"min_prompt_tokens": 100}, {"prompt_tokens": 100}, True),
    ("max-prompt-inclusive", {"max_prompt_tokens": 100}, {"prompt_tokens": 100}, True),
    ("max-prompt-above", {"max_prompt_tokens": 100}, {"prompt_tokens": 101}, False),
    ("all-conditions-must-hold", {"tenants": ["t"], "min_prompt_tokens": 10}, {"prompt_tokens": 5}, False),
]


def _at(hh: int, mm: int) -> dt.datetime:
    return dt.datetime(2025, 1, 15, hh, mm, tzinfo=dt.UTC)


TIME_CASES: list[tuple[str, dict[str, Any], dt.datetime, bool]] = [
    ("day-before-start", {"start": "09:00", "end": "17:00"}, _at(8, 59), False),
    ("day-start-inclusive", {"start": "09:00", "end": "17:00"}, _at(9, 0), True),
    ("day-inside", {"start": "09:00", "end": "17:00"}, _at(16, 59), True),
    ("day-end-exclusive", {"start": "09:00", "end": "17:00"}, _at(17, 0), False),
    ("night-wraps-late-evening", {"start": "22:00", "end": "06:00"}, _at(23, 30), True),
    ("night-wraps-start-inclusive", {"start": "22:00", "end": "06:00"}, _at(22, 0), True),
    ("night-wraps-early-morning", {"start": "22:00", "end": "06:00"}, _at(5, 59), True),
    ("night-wraps-end-exclusive", {"start": "22:00", "end": "06:00"}, _at(6, 0), False),
    ("night-wraps-noon-outside", {"start": "22:00", "end": "06:00"}, _at(12, 0), False),
    ("night-wraps-just-before", {"start": "22:00", "end": "06:00"}, _at(21, 59), False),
    # 08:30 UTC in January is 09:30 in Berlin.
    ("tz-berlin-inside", {"start": "09:00", "end": "10:00", "tz": "Europe/Berlin"}, _at(8, 30), True),
    ("tz-berlin-outside", {"start": "09:00", "end": "10:00", "tz": "Europe/Berlin"}, _at(9, 30), False),
    (
        "now-in-other-offset",
        {"start": "09:00", "end": "10:00"},
        dt.datetime(2025, 1, 15, 11, 30, tzinfo=dt.timezone(dt.timedelta(hours=2))),
        True,
    ),
]


def _rule_applied(when: dict[str, Any], tenant_name: str = "t", **features: Any) -> bool:
    idx = _rules_index(rule("make-it-cost", when, objective="cost"))
    features.setdefault("now", NOON)
    result = run(idx, tenant_name=tenant_name, **features)
    applied = result.decision.rules == ("make-it-cost",)
    # The decision table records the rule exactly when its effect took place.
    assert applied == (result.decision.objective == "cost")
    return applied


@pytest.mark.parametrize(
    ("when", "request_kw", "matches"), [c[1:] for c in RULE_MATCH_CASES], ids=[c[0] for c in RULE_MATCH_CASES]
)
def test_rule_when(when: dict[str, Any], request_kw: dict[str, Any], matches: bool) -> None:
    assert _rule_applied(when, **request_kw) is matches


@pytest.mark.parametrize(("window", "now", "matches"), [c[1:] for c in TIME_CASES], ids=[c[0] for c in TIME_CASES])
def test_rule_time_of_day(window: dict[str, str], now: dt.datetime, matches: bool) -> None:
    assert _rule_applied({"time_of_day": window}, now=now) is matches


def test_rule_objective_changes_the_ranking() -> None:
    base = _rules_index()
    assert labels(run(base, prompt_tokens=100)) == ["m@prov", "m@edge"]  # declared order
    idx = _rules_index(rule("edge-first", {}, objective="latency"))
    result = run(idx, prompt_tokens=100)
    assert labels(result) == ["m@edge", "m@prov"]  # tier priors: edge 150 < provider 600
    assert result.decision.objective == "latency"


def test_later_rule_overrides_earlier_objective() -> None:
    idx = _rules_index(rule("one", {}, objective="latency"), rule("two", {}, objective="cost"))
    result = run(idx, prompt_tokens=100)
    assert result.decision.rules == ("one", "two")
    assert result.decision.objective == "cost"
    assert labels(result) == ["m@prov", "m@edge"]


def test_rule_weights_apply_to_balanced() -> None:
    idx = _rules_index(rule("bal", {}, objective="balanced", weights={"cost": 0.0, "latency": 1.0}))
    assert labels(run(idx, prompt_tokens=100)) == ["m@edge", "m@prov"]
    idx = _rules_index(rule("bal", {}, objective="balanced", weights={"cost": 1.0, "latency": 0.0}))
    assert labels(run(idx, prompt_tokens=100)) == ["m@prov", "m@edge"]


RULE_CONSTRAINT_CASES = [
    ("jurisdictions", {"allowed_jurisdictions": ["EU"]}, ["m@edge"], "a rule allows only jurisdictions ['EU']"),
    ("tiers", {"allowed_tiers": ["edge"]}, ["m@edge"], "a rule allows only tiers ['edge']"),
    (
        "price-ceiling",
        {"max_price_per_mtok": 1.0},
        ["m@prov"],
        "price above the rule's ceiling of 1.0 USD per million tokens",
    ),
    ("origins-outside", {"allowed_origin_countries": ["FR"]}, None, "a rule allows only model origins ['FR']"),
    ("origins-inside", {"allowed_origin_countries": ["US"]}, ["m@prov", "m@edge"], None),
]


@pytest.mark.parametrize(
    ("constraints", "plan", "reason"),
    [c[1:] for c in RULE_CONSTRAINT_CASES],
    ids=[c[0] for c in RULE_CONSTRAINT_CASES],
)
def test_rule_constraints_narrow(constraints: dict[str, Any], plan: list[str] | None, reason: str | None) -> None:
    idx = _rules_index(rule("narrow", {"tenants": ["t"]}, constraints=constraints))
    if plan is None:
        with pytest.raises(PermissionDenied) as info:
            run(idx)
        assert reason is not None and reason in info.value.message
        # The same rule does not touch the other tenant.
        assert labels(run(idx, tenant_name="other")) == ["m@prov", "m@edge"]
        return
    result = run(idx)
    assert labels(result) == plan
    excluded = [r.excluded for r in result.decision.rows if r.excluded]
    assert excluded == ([reason] if reason else [])


def test_rule_constraint_fails_closed_on_unknown_jurisdiction() -> None:
    idx = index(
        [backend("b", juris=None), backend("c", juris="US")],
        [model("m", dep("b"), dep("c"))],
        [route("r", "m")],
        rules=[rule("us-only", {}, constraints={"allowed_jurisdictions": ["US"]})],
    )
    result = run(idx)
    assert labels(result) == ["m@c"]
    assert rows_by_label(result)["m@b"].excluded == "a rule allows only jurisdictions ['US']"


def test_rule_route_rewrite() -> None:
    idx = _rules_index(rule("to-cheap", {"min_prompt_tokens": 1000}, route="cheap"))
    short = run(idx, prompt_tokens=10)
    assert (short.decision.requested_route, short.decision.route, labels(short)) == ("r", "r", ["m@prov", "m@edge"])
    long = run(idx, prompt_tokens=5000)
    assert (long.decision.requested_route, long.decision.route) == ("r", "cheap")
    assert long.route.name == "cheap"
    assert labels(long) == ["cn@prov"]
    assert long.decision.rules == ("to-cheap",)


def test_rule_rewrite_takes_the_new_routes_objective_and_later_rules_see_it() -> None:
    idx = _rules_index(
        rule("to-cheap", {}, route="cheap"),
        rule("only-on-cheap", {"routes": ["cheap"]}, objective="latency"),
    )
    result = run(idx)
    assert result.decision.route == "cheap"
    assert result.decision.rules == ("to-cheap", "only-on-cheap")
    assert result.decision.objective == "latency"


def test_rule_rewrite_never_escapes_the_keys_allowed_routes() -> None:
    idx = _rules_index(rule("to-cheap", {}, route="cheap"))
    result = run(idx, principal=who("t", frozenset({"r"})))
    assert result.decision.route == "r"
    assert labels(result) == ["m@prov", "m@edge"]


# ---------------------------------------------------------------------------------------------------------------
# Per-request preferences: they only narrow.


def _prefs_index(**compliance: Any) -> Any:
    return index(
        [
            backend("de", juris="DE", tier="edge"),
            backend("fr", juris="FR", tier="self-hosted"),
            backend("us", juris="US"),
            backend("nowhere", juris=None),
        ],
        [
            model("llama", dep("de", 1.0, 1.0), dep("fr", 2.0, 2.0), dep("us", 0.5, 0.5), country="US"),
            model("mistral", dep("fr", 0.2, 3.0), country="FR"),
            model("qwen", dep("nowhere", 0.1, 0.1), country="CN"),
            model("fb", dep("us", 0.0, 0.0), country="US"),
        ],
        [route("r", "llama", "mistral", "qwen", fallback=["f"], max_attempts=10), route("f", "fb")],
        [tenant("t", **compliance)],
    )


ALL_PREF_LABELS = ["llama@de", "llama@fr", "llama@us", "mistral@fr", "qwen@nowhere", "fb@us"]

PREF_OK_CASES: list[tuple[str, dict[str, Any], dict[str, Any], list[str]]] = [
    # id, tenant compliance, preferences, expected plan
    ("no-preferences", {}, {}, ALL_PREF_LABELS),
    ("juris-subset-of-allowed", {"allowed_jurisdictions": ["EU"]}, {"jurisdictions": ["DE"]}, ["llama@de"]),
    (
        "juris-same-bloc",
        {"allowed_jurisdictions": ["EU"]},
        {"jurisdictions": ["EU"]},
        ["llama@de", "llama@fr", "mistral@fr"],
    ),
    ("juris-narrow-unconstrained-tenant", {}, {"jurisdictions": ["US"]}, ["llama@us", "fb@us"]),
    ("juris-pref-fails-closed-on-unknown", {}, {"jurisdictions": ["FR", "CN"]}, ["llama@fr", "mistral@fr"]),
    ("origins-subset", {"allowed_origin_countries": ["US", "FR"]}, {"origins": ["FR"]}, ["mistral@fr"]),
    ("origins-bloc", {}, {"origins": ["EU"]}, ["mistral@fr"]),
    ("max-price", {}, {"max_price_per_mtok": 1.0}, ["llama@de", "llama@us", "qwen@nowhere", "fb@us"]),
    ("max-price-zero", {}, {"max_price_per_mtok": 0.0}, ["fb@us"]),
    (
        "order",
        {},
        {"order": ["qwen", "mistral"]},
        ["qwen@nowhere", "mistral@fr", "llama@de", "llama@fr", "llama@us", "fb@us"],
    ),
    # A fallback model may be named, but fallbacks stay behind the route's own candidates.
    ("order-naming-a-fallback-model-keeps-it-last", {}, {"order": ["fb"]}, ALL_PREF_LABELS),
    # Costs (1000 in, 100 out): qwen 110, mistral 500, llama@us 550, llama@de 1100, llama@fr 2200; fb (0) is a fallback.
    (
        "objective",
        {},
        {"objective": "cost"},
        ["qwen@nowhere", "mistral@fr", "llama@us", "llama@de", "llama@fr", "fb@us"],
    ),
    (
        "combined",
        {"allowed_jurisdictions": ["EU", "US"]},
        {"jurisdictions": ["EU"], "max_price_per_mtok": 2.0},
        ["llama@de", "llama@fr"],
    ),
]


@pytest.mark.parametrize(
    ("compliance", "prefs", "plan"), [c[1:] for c in PREF_OK_CASES], ids=[c[0] for c in PREF_OK_CASES]
)
def test_preferences_narrow(compliance: dict[str, Any], prefs: dict[str, Any], plan: list[str]) -> None:
    idx = _prefs_index(**compliance)
    result = run(idx, prompt_tokens=1000, max_tokens=100, preferences=msgspec.convert(prefs, Preferences))
    assert labels(result) == plan
    without = {r.deployment for r in run(idx, prompt_tokens=1000, max_tokens=100).decision.rows if r.excluded is None}
    assert set(plan) <= without


def test_preference_exclusions_carry_the_reason() -> None:
    result = run(_prefs_index(), preferences=Preferences(jurisdictions=("DE",), max_price_per_mtok=5.0))
    rows = rows_by_label(result)
    assert rows["llama@us"].excluded == "you asked for jurisdictions ['DE']"
    prices = run(_prefs_index(), preferences=Preferences(max_price_per_mtok=1.0))
    assert rows_by_label(prices)["mistral@fr"].excluded == "price above your ceiling of 1.0 USD per million tokens"
    origins = run(_prefs_index(), preferences=Preferences(origins=("US",)))
    assert rows_by_label(origins)["qwen@nowhere"].excluded == "you asked for model origins ['US']"


PREF_ERROR_CASES: list[tuple[str, dict[str, Any], dict[str, Any], type[GatewayError], int, str, str]] = [
    # id, compliance, preferences, error, status, param, message fragment
    (
        "juris-widening-country-to-bloc",
        {"allowed_jurisdictions": ["DE"]},
        {"jurisdictions": ["EU"]},
        PermissionDenied,
        403,
        "strait.jurisdictions",
        "outside what your tenant allows",
    ),
    (
        "juris-widening-other-country",
        {"allowed_jurisdictions": ["EU"]},
        {"jurisdictions": ["US"]},
        PermissionDenied,
        403,
        "strait.jurisdictions",
        "['US']",
    ),
    (
        "juris-widening-eea-beyond-eu",
        {"allowed_jurisdictions": ["EU"]},
        {"jurisdictions": ["NO"]},
        PermissionDenied,
        403,
        "strait.jurisdictions",
        "['NO']",
    ),
    (
        # Asking only for a denied place narrows to nothing: the filter refuses it, naming the reason.
        "juris-denied",
        {"denied_jurisdictions": ["US"]},
        {"jurisdictions": ["US"]},
        PermissionDenied,
        403,
        "model",
        "hosting jurisdiction US is denied",
    ),
    (
        "origins-widening",
        {"allowed_origin_countries": ["US"]},
        {"origins": ["US", "CN"]},
        PermissionDenied,
        403,
        "strait.origins",
        "model origins ['CN'], outside what your tenant allows",
    ),
    (
        "origins-denied",
        {"denied_origin_countries": ["CN"]},
        {"origins": ["CN"]},
        PermissionDenied,
        403,
        "model",
        "denied",
    ),
    (
        "order-unknown-model",
        {},
        {"order": ["llama", "gpt-17"]},
        InvalidRequest,
        400,
        "strait.order",
        "['gpt-17']",
    ),
    (
        "negative-price",
        {},
        {"max_price_per_mtok": -1.0},
        InvalidRequest,
        400,
        "strait.max_price_per_mtok",
        "must not be negative",
    ),
]


@pytest.mark.parametrize(
    ("compliance", "prefs", "error", "status", "param", "fragment"),
    [c[1:] for c in PREF_ERROR_CASES],
    ids=[c[0] for c in PREF_ERROR_CASES],
)
def test_preferences_refused(
    compliance: dict[str, Any],
    prefs: dict[str, Any],
    error: type[GatewayError],
    status: int,
    param: str,
    fragment: str,
) -> None:
    with pytest.raises(error) as info:
        run(_prefs_index(**compliance), preferences=msgspec.convert(prefs, Preferences))
    assert type(info.value) is error
    assert (info.value.status, info.value.param) == (status, param)
    assert fragment in info.value.message


def test_preferences_narrowing_to_nothing_is_403_not_a_wider_plan() -> None:
    with pytest.raises(PermissionDenied) as info:
        run(_prefs_index(), preferences=Preferences(jurisdictions=("SE",)))
    assert info.value.param == "model"
    assert "llama@de: you asked for jurisdictions ['SE']" in info.value.message


@pytest.mark.parametrize("field", ["jurisdictions", "origins", "order"])
@pytest.mark.parametrize("where", ["body", "header"])
def test_preference_lists_are_bounded(field: str, where: str) -> None:
    """Places are expanded through a cache keyed by the client's list: a list of 400,000 names held
    ~60 MB per request in it. Longer lists, or longer names, than any real one are a 400."""
    ok = {field: ["DE"] * MAX_PREFERENCE_ITEMS}
    for prefs in ({field: ["DE"] * (MAX_PREFERENCE_ITEMS + 1)}, {field: ["D" * 129]}):
        raw = msgspec.json.encode(prefs)
        request = Request(operation="chat", model="m", preferences=msgspec.Raw(raw) if where == "body" else None)
        headers = {"x-strait-policy": raw.decode()} if where == "header" else {}
        with pytest.raises(InvalidRequest) as info:
            preferences(request, headers)
        assert (info.value.status, info.value.param) == (400, "strait")
        assert "length" in info.value.message
    assert preferences(Request(operation="chat", model="m", preferences=msgspec.Raw(msgspec.json.encode(ok))), {})


# ---------------------------------------------------------------------------------------------------------------
# Routes: unknown and outside the key's allowed routes look the same (404).


def _two_route_index() -> Any:
    return index([backend("b")], [model("m", dep("b"))], [route("r", "m"), route("secret", "m")])


NOT_FOUND_CASES = [
    ("unknown-route", "nope", None),
    ("route-outside-allowed", "secret", frozenset({"r"})),
    ("unknown-route-with-allowed-list", "nope", frozenset({"r"})),
]


@pytest.mark.parametrize(
    ("route_name", "allowed"), [c[1:] for c in NOT_FOUND_CASES], ids=[c[0] for c in NOT_FOUND_CASES]
)
def test_route_not_found(route_name: str, allowed: frozenset[str] | None) -> None:
    with pytest.raises(ModelNotFound) as info:
        run(_two_route_index(), route_name, principal=who("t", allowed))
    err = info.value
    assert (err.status, err.code, err.param) == (404, "model_not_found", "model")
    assert err.message == f"The model '{route_name}' does not exist or you do not have access to it."


def test_allowed_route_is_served() -> None:
    assert labels(run(_two_route_index(), "r", principal=who("t", frozenset({"r"})))) == ["m@b"]


# ---------------------------------------------------------------------------------------------------------------
# The 403 message and the decision table.


def test_403_lists_every_exclusion_and_nothing_about_other_tenants() -> None:
    idx = index(
        [backend("us-prov", juris="US", retention=30), backend("sg-self", tier="self-hosted", juris="SG")],
        [model("m", dep("us-prov"), dep("sg-self")), model("vis", dep("us-prov"), caps=ALL_CAPS)],
        [route("r", "m", "vis", max_attempts=5)],
        [
            tenant("acme", allowed_jurisdictions=["EU"]),
            tenant("globex-secretive", allowed_jurisdictions=["US"], required_certifications=["GLOBEX-CERT-7"]),
        ],
    )
    with pytest.raises(PermissionDenied) as info:
        run(idx, tenant_name="acme", needs=frozenset({"tools"}))
    msg = info.value.message
    assert "No deployment of 'r' satisfies the policy for your key." in msg
    for expected in (
        "m@us-prov: hosting jurisdiction US is not in the allowed ['EU']",
        "m@sg-self: hosting jurisdiction SG is not in the allowed ['EU']",
        "vis@us-prov: hosting jurisdiction US is not in the allowed ['EU']",
    ):
        assert expected in msg
    assert msg.count("@") == 3, "exactly the three candidates, each once"
    for secret in ("globex", "GLOBEX-CERT-7", "['US']"):
        assert secret.lower() not in msg.lower()
    # The other tenant's refusal speaks of its own envelope only.
    with pytest.raises(PermissionDenied) as other:
        run(idx, tenant_name="globex-secretive")
    assert "missing certifications ['GLOBEX-CERT-7']" in other.value.message
    assert "['EU']" not in other.value.message


def test_decision_table() -> None:
    idx = index(
        [
            backend("edge", tier="edge", juris="DE"),
            backend("prov", tier="provider", juris="US"),
            backend("self", tier="self-hosted", juris="FR"),
        ],
        [
            model("m", dep("edge", 2.0, 2.0), dep("prov", 0.5, 0.5), dep("self", 1.0, 1.0), ctx=100_000),
            model("tiny", dep("edge"), ctx=10),
        ],
        [route("r", "m", "tiny", objective="cost", max_attempts=2)],
        [tenant("t", denied_jurisdictions=["US"])],
        [
            rule("cost-for-t", {"tenants": ["t"]}, objective="cost"),
            rule("not-me", {"tenants": ["zz"]}, objective="latency"),
        ],
    )
    result = run(idx, prompt_tokens=1000, max_tokens=100, live=LiveState(latency_ms={"edge": 10.0}))
    d = result.decision
    assert d.id == "d-1"
    assert d.policy_version == idx.version and len(d.policy_version) == 12
    assert (d.tenant, d.requested_route, d.route, d.objective) == ("t", "r", "r", "cost")
    assert d.rules == ("cost-for-t",)
    assert d.plan == ("m@self", "m@edge")
    rows = rows_by_label(result)
    assert [r.deployment for r in d.rows] == ["m@edge", "m@prov", "m@self", "tiny@edge"]
    assert rows["m@prov"].excluded == "hosting jurisdiction US is denied"
    assert rows["tiny@edge"].excluded == "context window is 10 tokens, the request needs 1100"
    assert (rows["m@self"].rank, rows["m@edge"].rank) == (1, 2)
    assert rows["m@prov"].rank is None and rows["m@prov"].score is None
    assert rows["m@edge"].latency_ms == 10.0
    assert rows["m@self"].latency_ms == LATENCY_PRIOR_MS["self-hosted"]
    assert rows["m@self"].est_cost_usd == pytest.approx((1000 * 1.0 + 100 * 1.0) / 1e6)
    assert rows["m@self"].score == pytest.approx(rows["m@self"].est_cost_usd)
    assert (rows["m@edge"].tier, rows["m@edge"].backend, rows["m@edge"].model) == ("edge", "edge", "m")


def test_decision_table_ranks_survivors_beyond_max_attempts() -> None:
    idx = index(
        [backend(f"b{i}") for i in range(4)],
        [model("m", *(dep(f"b{i}") for i in range(4)))],
        [route("r", "m", max_attempts=2)],
    )
    result = run(idx)
    assert result.decision.plan == ("m@b0", "m@b1")
    assert [r.rank for r in result.decision.rows] == [1, 2, 3, 4]


def test_policy_version_changes_with_the_policy() -> None:
    a = _two_route_index()
    b = index([backend("b", juris="DE")], [model("m", dep("b"))], [route("r", "m"), route("secret", "m")])
    assert run(a).decision.policy_version != run(b).decision.policy_version
    assert run(a).decision.policy_version == _two_route_index().version


def test_compliance_memo_is_per_tenant() -> None:
    idx = index(
        [backend("us", juris="US"), backend("de", juris="DE")],
        [model("m", dep("us"), dep("de"))],
        [route("r", "m")],
        [tenant("eu", allowed_jurisdictions=["EU"]), tenant("any")],
    )
    assert labels(run(idx, tenant_name="eu")) == ["m@de"]
    assert labels(run(idx, tenant_name="any")) == ["m@us", "m@de"]
    assert labels(run(idx, tenant_name="eu")) == ["m@de"]


# ---------------------------------------------------------------------------------------------------------------
# The budget downgrade: part of the plan, decided as for a request naming the downgrade route.


def _downgrade_index(on_exhausted: str = "downgrade", **compliance: Any) -> Any:
    t = msgspec.structs.replace(
        tenant("t", **compliance),
        budgets=msgspec.convert({"on_exhausted": on_exhausted, "downgrade_route": "cheap"}, Budgets),
    )
    return index(
        [backend("us", juris="US"), backend("cn", juris="CN")],
        [
            model("big", dep("us", 10, 30), developer="Meta"),
            model("small", dep("us", 0.1, 0.2), dep("cn", 0.05, 0.1), developer="DeepSeek"),
        ],
        [route("r", "big"), route("cheap", "small", objective="cost")],
        [t],
        [rule("tiny-prompts-cheaper", {"routes": ["cheap"], "max_prompt_tokens": 5}, objective="ordered")],
    )


def test_a_blocking_tenant_has_no_downgrade_plan() -> None:
    assert run(_downgrade_index("block")).downgrade is None


def test_the_downgrade_plan_is_the_downgrade_routes_decision_inside_the_same_compliance() -> None:
    plan = run(_downgrade_index(allowed_jurisdictions=["US"]), prompt_tokens=100)
    assert labels(plan) == ["big@us"] and plan.requested == "r"
    down = plan.downgrade
    assert down is not None and down is plan.downgrade, "decided once, then kept"
    assert down.route.name == "cheap" and down.requested == "cheap" and labels(down) == ["small@us"]
    rows = rows_by_label(down)
    assert rows["small@cn"].excluded == "hosting jurisdiction CN is not in the allowed ['US']"
    d = down.decision
    assert (d.id, d.requested_route, d.route, d.plan) == ("d-1", "cheap", "cheap", ("small@us",))
    assert down.decision.rules == () and plan.decision.rules == ()
    # Rules apply as to a request naming the downgrade route (this one matches only there, small prompts).
    small = run(_downgrade_index(), prompt_tokens=3)
    assert small.decision.rules == ()
    assert small.downgrade is not None and small.downgrade.decision.rules == ("tiny-prompts-cheaper",)
    assert small.downgrade.decision.objective == "ordered" and labels(small.downgrade) == ["small@us", "small@cn"]


def test_a_downgrade_route_the_compliance_empties_is_refused_with_every_reason() -> None:
    plan = run(_downgrade_index(denied_developers=["DeepSeek"]))
    assert labels(plan) == ["big@us"]
    with pytest.raises(PermissionDenied) as info:
        _ = plan.downgrade
    msg = info.value.message
    assert "No deployment of 'cheap' satisfies the policy for your key." in msg
    assert "small@us: model developer DeepSeek is denied" in msg and "small@cn: model developer DeepSeek" in msg
