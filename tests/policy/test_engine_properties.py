"""Properties of the routing engine on generated policies, live states and requests.

The oracles here are written independently of the engine's private helpers: they restate the contract
(compliance via the public `compliance_reason`, the rest from the policy model's documented meaning).
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Any
from unittest import mock

import msgspec
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gateway.errors import InvalidRequest, PermissionDenied
from gateway.policy import engine
from gateway.policy.compliance import compliance_reason
from gateway.policy.engine import EJECTED, Preferences, RequestFeatures, RoutePlan, decide
from gateway.policy.index import PolicyIndex, Principal, Target
from gateway.policy.live import LiveState
from gateway.policy.model import (
    Backend,
    Budgets,
    Capacity,
    Compliance,
    Constraints,
    Deployment,
    Hardware,
    Hosting,
    Model,
    Operator,
    Origin,
    OriginRule,
    PolicySet,
    Prefer,
    Price,
    Route,
    Rule,
    Spillover,
    Tenant,
    Then,
    Weights,
    When,
)
from gateway.policy.places import BUILTIN

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TIERS = ("edge", "self-hosted", "provider")
JURISDICTIONS = (None, "US", "DE", "FR", "CN", "SG", "EU", "NO", "de")
PLACES = ("US", "DE", "FR", "CN", "SG", "EU", "EEA", "NO")
COUNTRIES = (None, "US", "CN", "FR", "DE")
DEVELOPERS = ("Meta", "DeepSeek", "Mistral")
OPERATORS = (None, "DeepSeek", "Meta", "Acme")
CERTS = ("SOC2", "ISO27001", "HIPAA")
PRICES = (0.0, 0.1, 0.5, 1.0, 2.5, 10.0)
OBJECTIVES = ("cost", "latency", "balanced", "ordered")
PRINCIPAL = Principal(tenant="t", key_id="k", allowed_routes=None)


def subset(values: tuple[Any, ...], lo: int = 1, hi: int = 3) -> st.SearchStrategy[tuple[Any, ...]]:
    return st.lists(st.sampled_from(values), min_size=lo, max_size=hi, unique=True).map(tuple)


# Strategies are built once: constructing them per draw dominated the runtime.
QUARTER = st.integers(0, 3)
COIN = st.booleans()
S_TIER = st.sampled_from(TIERS)
S_TIERS = subset(TIERS)
S_TIER_ORDER = st.permutations(TIERS)
S_1_3 = st.integers(1, 3)
S_1_5 = st.integers(1, 5)
S_1_6 = st.integers(1, 6)
S_0_2 = st.integers(0, 2)
S_JURIS = st.sampled_from(JURISDICTIONS)
S_PLACES = subset(PLACES)
S_ORIGINS = subset(("US", "CN", "FR", "EU"))
S_COUNTRY = st.sampled_from(COUNTRIES)
S_DEVELOPER = st.sampled_from((*DEVELOPERS, None))
S_DEVELOPERS = subset(DEVELOPERS)
S_OPERATOR = st.sampled_from(OPERATORS)
S_RETENTION = st.sampled_from((None, 0, 30, 90))
S_TRAINS = st.sampled_from((None, False, True))
CHIPS = ("H100", "L4", "MI300X")
REGIONS = ("eu-west", "us-east")
S_HARDWARE = st.none() | st.builds(
    Hardware, chip=st.none() | st.sampled_from(CHIPS), memory_gb=st.none() | st.sampled_from((24.0, 80.0, 192.0))
)
S_REGION = st.none() | st.sampled_from(REGIONS)
S_PREFER = st.builds(
    Prefer,
    chips=st.none() | st.permutations(CHIPS).map(tuple),
    min_memory_gb=st.none() | st.sampled_from((24.0, 80.0, 141.0)),
    ingress_region=COIN,
)
S_MAX_RETENTION = st.sampled_from((0, 30))
S_CERTS_HELD = subset(CERTS, 0, 3)
S_CERTS_REQUIRED = subset(CERTS, 1, 2)
S_CONCURRENCY = st.sampled_from((None, 0, 4, 10))
S_OPS = st.sampled_from(
    (("chat", "completions"), ("chat", "completions"), ("chat",), ("embeddings",), ("chat", "embeddings"))
)
S_EXTRAS = subset(("tools", "vision", "json"), 0, 3)
S_NEEDS = subset(("tools", "vision", "json"), 0, 2)
S_CONTEXT = st.sampled_from((None, 1000, 4000, 32000))
S_PRICE = st.sampled_from(PRICES)
S_PREF_PRICE = st.sampled_from((-1.0, *PRICES))
S_OBJECTIVE = st.sampled_from(OBJECTIVES)
S_WEIGHT = st.sampled_from((0.0, 0.3, 0.5, 1.0))
S_THRESHOLD = st.sampled_from((0.0, 0.5, 0.8, 1.0))
S_WHEN = st.sampled_from((When(), When(min_prompt_tokens=5000), When(tenants=("t",)), When(tenants=("other",))))
S_LATENCY = st.sampled_from((5.0, 100.0, 400.0, 2000.0))
S_UTILISATION = st.sampled_from((0.0, 0.5, 0.8, 1.0))
S_IN_FLIGHT = st.integers(0, 12)
S_OPERATION = st.sampled_from(("chat", "chat", "chat", "completions", "embeddings"))
S_PROMPT = st.sampled_from((0, 10, 100, 500, 900, 3000, 6000, 40000))
S_MAX_TOKENS = st.sampled_from((None, None, 0, 100, 1000))
S_ORIGIN_RULE = st.builds(
    OriginRule,
    origin_countries=subset(("CN", "US", "EU"), 0, 2),
    developers=subset(DEVELOPERS, 0, 1),
    allowed_tiers=st.none() | S_TIERS,
    allowed_jurisdictions=st.none() | S_PLACES,
    deny_developer_operated=COIN,
)
S_ORIGIN_RULES = st.lists(S_ORIGIN_RULE, min_size=1, max_size=2).map(tuple)


def maybe(draw: st.DrawFn, strategy: st.SearchStrategy[Any], default: Any = None) -> Any:
    """The default three times out of four, so that generated constraints are neither always absent nor
    always so tight that nothing survives."""
    return draw(strategy) if draw(QUARTER) == 0 else default


def pick(draw: st.DrawFn, names: list[str], lo: int, hi: int) -> list[str]:
    """Between lo and hi distinct names, in drawn order."""
    count = draw(st.integers(lo, min(hi, len(names)))) if hi > lo else lo
    pool = list(names)
    out = []
    for _ in range(count):
        out.append(pool.pop(draw(st.integers(0, len(pool) - 1))))
    return out


def backend_of(draw: st.DrawFn, name: str) -> Backend:
    return Backend(
        name=name,
        adapter="simulated",
        tier=draw(S_TIER),
        hosting=Hosting(
            operator=draw(S_OPERATOR),
            jurisdiction=draw(S_JURIS),
            retention_days=draw(S_RETENTION),
            trains_on_data=draw(S_TRAINS),
            region=draw(S_REGION),
            certifications=draw(S_CERTS_HELD),
        ),
        capacity=Capacity(max_concurrency=draw(S_CONCURRENCY)),
        hardware=draw(S_HARDWARE),
    )


def model_of(draw: st.DrawFn, name: str, backend_names: list[str]) -> Model:
    origin = None
    if draw(QUARTER):
        origin = Origin(developer=draw(S_DEVELOPER), country=draw(S_COUNTRY))
    deployments = tuple(
        Deployment(
            backend=b,
            upstream_model=f"{name}-{b}",
            price=Price(input_per_mtok=draw(S_PRICE), output_per_mtok=draw(S_PRICE)),
        )
        for b in pick(draw, backend_names, 1, 3)
    )
    return Model(
        name=name,
        deployments=deployments,
        capabilities=draw(S_OPS) + draw(S_EXTRAS),
        context_window=draw(S_CONTEXT),
        origin=origin,
    )


COMPLIANCE_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "allowed_jurisdictions": S_PLACES,
    "denied_jurisdictions": S_PLACES,
    "allowed_origin_countries": S_ORIGINS,
    "denied_origin_countries": S_ORIGINS,
    "allowed_developers": S_DEVELOPERS,
    "denied_developers": S_DEVELOPERS,
    "allowed_tiers": S_TIERS,
    "max_retention_days": S_MAX_RETENTION,
    "no_training": st.just(True),
    "allowed_operator_countries": S_ORIGINS,
    "denied_operator_countries": S_ORIGINS,
    "required_certifications": S_CERTS_REQUIRED,
    "origin_rules": S_ORIGIN_RULES,
}


def compliance_of(draw: st.DrawFn) -> Compliance:
    """Zero to two of the compliance fields set, so some candidates survive and some do not."""
    chosen = pick(draw, list(COMPLIANCE_FIELDS), 0, 2)
    return Compliance(**{name: draw(COMPLIANCE_FIELDS[name]) for name in chosen})


def constraints_of(draw: st.DrawFn) -> Constraints:
    return Constraints(
        allowed_jurisdictions=maybe(draw, S_PLACES),
        allowed_origin_countries=maybe(draw, S_ORIGINS),
        allowed_tiers=maybe(draw, S_TIERS),
        max_price_per_mtok=maybe(draw, S_PRICE),
    )


def rules_of(draw: st.DrawFn, *, objectives: bool) -> tuple[Rule, ...]:
    out = []
    for i in range(draw(S_0_2)):
        then = Then(
            objective=maybe(draw, S_OBJECTIVE) if objectives else None,
            constraints=constraints_of(draw) if draw(COIN) else None,
        )
        out.append(Rule(name=f"rule-{i}", when=draw(S_WHEN), then=then))
    return tuple(out)


@dataclass(frozen=True)
class World:
    policy: PolicySet
    index: PolicyIndex
    features: RequestFeatures
    live: LiveState

    @property
    def tenant(self) -> Tenant:
        return self.index.tenants["t"]


@st.composite
def worlds(
    draw: st.DrawFn,
    *,
    objective: str | None = None,
    spillover: bool | None = None,
    fallback: bool | None = None,
    rule_objectives: bool = True,
    with_preferences: bool = True,
) -> World:
    backend_names = [f"b{i}" for i in range(draw(S_1_6))]
    bs = [backend_of(draw, n) for n in backend_names]
    model_names = [f"m{i}" for i in range(draw(S_1_6))]
    ms = [model_of(draw, n, backend_names) for n in model_names]
    use_fallback = draw(COIN) if fallback is None else fallback
    use_spill = draw(COIN) if spillover is None else spillover
    spill = None
    if use_spill:
        spill = Spillover(tiers=tuple(draw(S_TIER_ORDER)[: draw(S_1_3)]), threshold=draw(S_THRESHOLD))
    main = Route(
        name="main",
        models=tuple(pick(draw, model_names, 1, 3)),
        objective=objective or draw(S_OBJECTIVE),  # type: ignore[arg-type]
        weights=Weights(cost=draw(S_WEIGHT), latency=draw(S_WEIGHT)),
        spillover=spill,
        fallback=("alt",) if use_fallback else (),
        max_attempts=draw(S_1_5),
    )
    alt = Route(name="alt", models=tuple(pick(draw, model_names, 1, 3)), objective=draw(S_OBJECTIVE))
    policy = PolicySet(
        # Operators as entities: Acme belongs to Meta (deny_developer_operated matches Meta's models there).
        operators=(
            Operator(name="DeepSeek", headquarters="CN"),
            Operator(name="Meta", headquarters="US"),
            Operator(name="Acme", headquarters="FR", parent="Meta"),
        ),
        backends=tuple(bs),
        models=tuple(ms),
        routes=(main, alt),
        tenants=(Tenant(name="t", compliance=compliance_of(draw)), Tenant(name="other")),
        rules=rules_of(draw, objectives=rule_objectives),
    )
    labels = [f"{m}@{b}" for m in model_names for b in backend_names]
    live = LiveState(
        unhealthy=frozenset(pick(draw, backend_names, 0, 2) if draw(COIN) else ()),
        latency_ms={k: draw(S_LATENCY) for k in pick(draw, backend_names + labels, 0, 4)},
        in_flight={k: draw(S_IN_FLIGHT) for k in pick(draw, backend_names, 0, 3)},
        utilisation={k: draw(S_UTILISATION) for k in pick(draw, backend_names, 0, 3)},
    )
    prefs = None
    if with_preferences and draw(st.integers(0, 2)) == 0:
        prefs = Preferences(
            objective=maybe(draw, S_OBJECTIVE),
            max_price_per_mtok=maybe(draw, S_PREF_PRICE),
            jurisdictions=maybe(draw, S_PLACES),
            origins=maybe(draw, S_ORIGINS),
            order=tuple(pick(draw, [*model_names, "no-such-model"], 1, 3)) if draw(QUARTER) == 0 else None,
        )
    features = RequestFeatures(
        route="main",
        operation=draw(S_OPERATION),
        prompt_tokens=draw(S_PROMPT),
        max_tokens=draw(S_MAX_TOKENS),
        needs=frozenset(draw(S_NEEDS)) if draw(st.integers(0, 2)) == 0 else frozenset(),
        preferences=prefs,
    )
    return World(policy=policy, index=PolicyIndex(policy), features=features, live=live)


# ---------------------------------------------------------------------------------------------------------------
# Independent oracles.


def _within(place: str, allowed: tuple[str, ...]) -> bool:
    """Restated from the places contract: every country the place may be in is one the list covers."""
    if not place:
        return False
    members = BUILTIN.blocs.get(place.upper(), frozenset({place.upper()}))
    room: set[str] = set()
    for p in allowed:
        room |= BUILTIN.blocs.get(p.upper(), frozenset({p.upper()}))
    return members <= room


def applied_rules(w: World) -> list[Rule]:
    out = []
    for r in w.policy.rules:
        if r.when.tenants is not None and "t" not in r.when.tenants:
            continue
        if r.when.min_prompt_tokens is not None and w.features.prompt_tokens < r.when.min_prompt_tokens:
            continue
        out.append(r)
    return out


def violations(t: Target, w: World) -> list[str]:
    """Every constraint `t` breaks, in the order the engine reports them."""
    out: list[str] = []
    if compliance_reason(t, w.tenant.compliance) is not None:
        out.append("compliance")
    juris = (t.backend.hosting.jurisdiction or "").upper()
    country = ((t.origin.country if t.origin else None) or "").upper()
    price = max(t.deployment.price.input_per_mtok, t.deployment.price.output_per_mtok)
    for r in applied_rules(w):
        c = r.then.constraints
        if c is None:
            continue
        if (
            (c.allowed_jurisdictions is not None and not _within(juris, c.allowed_jurisdictions))
            or (c.allowed_origin_countries is not None and not _within(country, c.allowed_origin_countries))
            or (c.allowed_tiers is not None and t.backend.tier not in c.allowed_tiers)
            or (c.max_price_per_mtok is not None and price > c.max_price_per_mtok)
        ):
            out.append("rule")
            break
    p = w.features.preferences
    if p is not None and (
        (p.jurisdictions is not None and not _within(juris, p.jurisdictions))
        or (p.origins is not None and not _within(country, p.origins))
        or (p.max_price_per_mtok is not None and price > p.max_price_per_mtok)
    ):
        out.append("prefs")
    f = w.features
    if not f.needs <= set(t.model.capabilities):
        out.append("capabilities")
    if t.model.context_window is not None and f.prompt_tokens + (f.max_tokens or 0) > t.model.context_window:
        out.append("context")
    if t.backend.name in w.live.unhealthy:
        out.append("health")
    return out


def reason_kind(reason: str) -> str:
    prefixes = {
        "model lacks": "capabilities",
        "context window is": "context",
        "backend is ejected": "health",
        "a rule allows only": "rule",
        "price above the rule's": "rule",
        "you asked for": "prefs",
        "price above your ceiling": "prefs",
    }
    return next((kind for prefix, kind in prefixes.items() if reason.startswith(prefix)), "compliance")


def candidates(w: World, route_name: str = "main") -> dict[str, Target]:
    """label -> target for the route's candidates and then its fallbacks' (first occurrence wins)."""
    idx = w.index
    route = idx.routes[route_name]
    out: dict[str, Target] = {}
    # The index's targets carry what compliance reads, resolved from the policy (operator entities,
    # inherited origins); which deployments are candidates is restated here.
    resolved = {t.label: t for targets in idx.targets.values() for t in targets}
    for name in (route_name, *route.fallback):
        for m in (idx.models[n] for n in idx.routes[name].models):
            op_cap = w.features.operation
            if op_cap not in m.capabilities:
                continue
            for d in m.deployments:
                label = f"{m.name}@{d.backend}"
                out.setdefault(label, resolved[label])
    return out


def preference_error(w: World) -> str | None:
    """The `param` of the error a request's preferences deserve, or None."""
    p, c = w.features.preferences, w.tenant.compliance
    if p is None:
        return None
    # Only widening an allow-list is refused up front; asking for denied places narrows to nothing.
    for asked, allowed, param in (
        (p.jurisdictions, c.allowed_jurisdictions, "strait.jurisdictions"),
        (p.origins, c.allowed_origin_countries, "strait.origins"),
    ):
        if asked is None:
            continue
        if allowed is not None and not all(_within(a, allowed) for a in asked):
            return param
    route = w.index.routes["main"]
    known = set(route.models) | {m for f in route.fallback for m in w.index.routes[f].models}
    if p.order is not None and not set(p.order) <= known:
        return "strait.order"
    if p.max_price_per_mtok is not None and p.max_price_per_mtok < 0:
        return "strait.max_price_per_mtok"
    return None


def attempt(w: World, index: PolicyIndex | None = None, features: RequestFeatures | None = None) -> Any:
    try:
        return decide(index or w.index, PRINCIPAL, features or w.features, w.live, decision_id="x")
    except (PermissionDenied, InvalidRequest) as exc:
        return exc


def snapshot(result: Any) -> Any:
    if isinstance(result, RoutePlan):
        d = result.decision
        return ("plan", [t.label for t in result.targets], msgspec.to_builtins(d.rows), d.plan, d.objective, d.rules)
    return (type(result).__name__, result.status, result.code, result.param, result.message)


# ---------------------------------------------------------------------------------------------------------------
# (a) Every target in the plan satisfies every constraint; every excluded row really violates one.


@SETTINGS
@given(worlds())
def test_plan_is_inside_every_constraint_and_exclusions_are_real(w: World) -> None:
    result = attempt(w)
    cands = candidates(w)
    expected_param = preference_error(w)
    if expected_param is not None:
        assert isinstance(result, PermissionDenied | InvalidRequest), "a bad preference was accepted"
        assert result.param == expected_param
        return
    if not cands:
        assert isinstance(result, InvalidRequest) and result.code == "unsupported_operation"
        return
    # The stages a refusal names, in order: compliance (the tenant's, the rules', the request's), then the
    # capabilities the request uses, then the context window.
    usable = [t for t in cands.values() if not {"compliance", "rule", "prefs"} & set(violations(t, w))]
    capable = [t for t in usable if "capabilities" not in violations(t, w)]
    fitting = [t for t in capable if "context" not in violations(t, w)]
    if isinstance(result, PermissionDenied | InvalidRequest):
        assert result.param in ("model", "messages")
        for label in cands:
            assert f"{label}: " in result.message
        if not usable:
            assert (result.status, result.code) == (403, "no_compliant_candidate"), result.message
        elif not capable:
            assert (result.status, result.code) == (400, "capability_missing"), result.message
        else:
            assert not fitting, f"refused ({result.code}) though {[t.label for t in fitting]} could serve"
            assert (result.status, result.code) == (400, "context_length_exceeded"), result.message
            largest = max(t.model.context_window or 0 for t in capable)
            assert f"maximum context length is {largest} tokens" in result.message
        return
    assert fitting, "a plan where no candidate passes compliance, capabilities and context"
    assert isinstance(result, RoutePlan)
    assert result.decision.rules == tuple(r.name for r in applied_rules(w))
    # Panic mode exactly when no candidate is clean and some are only ejected: ejection is then ignored.
    panic = result.decision.panic
    only_ejected = [t for t in cands.values() if violations(t, w) == ["health"]]
    assert panic == (not any(violations(t, w) == [] for t in cands.values()) and bool(only_ejected))

    def faults(t: Target) -> list[str]:
        return [v for v in violations(t, w) if not (panic and v == "health")]

    for t in result.targets:
        assert compliance_reason(t, w.tenant.compliance) is None
        assert w.features.needs <= set(t.model.capabilities)
        window = t.model.context_window
        assert window is None or w.features.prompt_tokens + (w.features.max_tokens or 0) <= window
        assert panic or t.backend.name not in w.live.unhealthy
        assert faults(t) == []
    rows = result.decision.rows
    assert {r.deployment for r in rows} == set(cands), "the decision table must show every candidate"
    for row in rows:
        found = faults(cands[row.deployment])
        if row.excluded is None:
            assert found == [], f"{row.deployment} kept despite {found}"
            assert row.rank is not None
        else:
            assert found, f"{row.deployment} excluded ({row.excluded}) but violates nothing"
            assert reason_kind(row.excluded) == found[0], (row.excluded, found)
            assert row.rank is None


# ---------------------------------------------------------------------------------------------------------------
# (b) Preferences never widen.


def _with_attempts(policy: PolicySet, n: int) -> PolicyIndex:
    routes = tuple(msgspec.structs.replace(r, max_attempts=n) for r in policy.routes)
    return PolicyIndex(msgspec.structs.replace(policy, routes=routes))


S_NARROW_PREFS = st.builds(
    Preferences,
    jurisdictions=st.none() | S_PLACES,
    origins=st.none() | S_ORIGINS,
    max_price_per_mtok=st.none() | S_PRICE,
)


@SETTINGS
@given(worlds(), st.data())
def test_preferences_only_narrow(w: World, data: st.DataObject) -> None:
    if w.features.preferences is None:
        # Give this example preferences too, so every run compares both sides.
        prefs = data.draw(S_NARROW_PREFS)
        w = World(w.policy, w.index, msgspec.structs.replace(w.features, preferences=prefs), w.live)
    wide = _with_attempts(w.policy, 100)
    without = attempt(w, wide, msgspec.structs.replace(w.features, preferences=None))
    narrowed = attempt(w)
    if isinstance(narrowed, PermissionDenied | InvalidRequest):
        return
    assert isinstance(without, RoutePlan), "preferences produced a plan where the tenant's policy gives none"
    kept = {r.deployment for r in narrowed.decision.rows if r.excluded is None}
    if narrowed.decision.panic and not without.decision.panic:
        # Narrowing left only ejected candidates: they are tried (panic mode), but nothing the tenant's
        # policy excludes for any other reason.
        allowed = {r.deployment for r in without.decision.rows if r.excluded in (None, EJECTED)}
        assert kept <= allowed
        return
    assert set(narrowed.decision.plan) <= set(without.decision.plan)
    # Survivors too, not only the truncated plan.
    assert kept <= {r.deployment for r in without.decision.rows if r.excluded is None}


# ---------------------------------------------------------------------------------------------------------------
# (b2) The budget downgrade plan obeys the tenant's compliance exactly like the primary plan.


def _downgrading(w: World, on_exhausted: str = "downgrade") -> PolicyIndex:
    """The world's policy with tenant `t` moved to route `alt` when its budget is spent."""
    budgets = msgspec.convert(
        {"tenant": {"usd_per_day": 1.0}, "on_exhausted": on_exhausted, "downgrade_route": "alt"}, Budgets
    )
    tenants = tuple(msgspec.structs.replace(t, budgets=budgets) if t.name == "t" else t for t in w.policy.tenants)
    return PolicyIndex(msgspec.structs.replace(w.policy, tenants=tenants))


@SETTINGS
@given(worlds())
def test_the_downgrade_plan_obeys_the_tenants_compliance_like_the_primary_plan(w: World) -> None:
    index = _downgrading(w)
    primary = attempt(w, index)
    assert not isinstance(primary, RoutePlan) or attempt(w, _downgrading(w, "block")).downgrade is None
    if not isinstance(primary, RoutePlan):
        return  # refused before any budget is looked at: there is nothing to downgrade
    try:
        down: Any = primary.downgrade
    except (PermissionDenied, InvalidRequest) as exc:
        down = exc
    event(f"downgrade: {type(down).__name__}")
    # Exactly the decision of a request naming the downgrade route: same key, request and live signals.
    direct = attempt(w, index, msgspec.structs.replace(w.features, route="alt"))
    assert snapshot(down) == snapshot(direct)
    if isinstance(down, RoutePlan):
        assert primary.downgrade is down, "decided once, then kept"
    compliance = w.tenant.compliance
    cands = candidates(w, "alt")
    if isinstance(down, PermissionDenied):
        # Refused with every candidate's reason, the compliance ones among them.
        for label, t in cands.items():
            reason = compliance_reason(t, compliance)
            assert f"{label}: " in down.message
            if reason is not None:
                event("downgrade: refused, compliance among the reasons")
                assert f"{label}: {reason}" in down.message
        return
    if not isinstance(down, RoutePlan):
        return
    assert down.route.name == "alt" and down.requested == "alt"
    for t in down.targets:
        assert compliance_reason(t, compliance) is None, f"{t.label} is outside the tenant's compliance"
    rows = down.decision.rows
    assert {r.deployment for r in rows} == set(cands)
    for row in rows:
        reason = compliance_reason(cands[row.deployment], compliance)
        if reason is not None:
            event("downgrade: a candidate excluded by compliance")
            assert row.excluded == reason and row.rank is None


# ---------------------------------------------------------------------------------------------------------------
# (c) Ranking is deterministic, and order of unrelated declarations does not matter.


@SETTINGS
@given(worlds(), st.randoms(use_true_random=False))
def test_decisions_are_deterministic(w: World, rnd: random.Random) -> None:
    first = snapshot(attempt(w))
    assert snapshot(attempt(w)) == first, "same index, same inputs, different answer"
    # A fresh index answers the same.
    assert snapshot(attempt(w, PolicyIndex(w.policy))) == first
    # An index other requests (other operations, tenants) were decided on answers the same.
    warm = PolicyIndex(w.policy)
    for op in ("embeddings", "completions", "chat"):
        attempt(w, warm, RequestFeatures(route="main", operation=op))  # type: ignore[arg-type]
    for tenant_name in ("other", "t"):
        with contextlib.suppress(PermissionDenied, InvalidRequest):
            decide(warm, Principal(tenant=tenant_name, key_id="k", allowed_routes=None), w.features, w.live)
    assert snapshot(attempt(w, warm)) == first
    # Shuffling the backends and tenants sections (not candidates' declared order) changes nothing.
    backends_ = list(w.policy.backends)
    tenants_ = list(w.policy.tenants)
    rnd.shuffle(backends_)
    rnd.shuffle(tenants_)
    shuffled = msgspec.structs.replace(w.policy, backends=tuple(backends_), tenants=tuple(tenants_))
    assert snapshot(attempt(w, PolicyIndex(shuffled))) == first


@SETTINGS
@given(st.one_of(worlds(), worlds(objective="ordered", spillover=False)))
def test_the_ranking_shortcut_decides_as_the_whole_sort(w: World) -> None:
    """`_rank` skips the sort key when nothing can change the order (one survivor; `ordered` without
    preferences): the plan, the table (scores, ranks, spill columns) and refusals are the sort's."""
    fast = snapshot(attempt(w))
    with mock.patch.object(engine, "_rank", engine._rank_sorted):
        assert snapshot(attempt(w)) == fast


# ---------------------------------------------------------------------------------------------------------------
# (d) The plan never exceeds max_attempts, and holds no deployment twice.


@SETTINGS
@given(worlds())
def test_plan_length_is_bounded_by_max_attempts(w: World) -> None:
    result = attempt(w)
    if not isinstance(result, RoutePlan):
        return
    survivors = [r for r in result.decision.rows if r.excluded is None]
    assert len(result.targets) <= result.route.max_attempts
    assert len(result.targets) == min(result.route.max_attempts, len(survivors))
    assert len(set(result.decision.plan)) == len(result.decision.plan)
    assert list(result.decision.plan) == [t.label for t in result.targets]
    # The plan is the head of the ranking.
    by_rank = sorted(survivors, key=lambda r: r.rank or 0)
    assert [r.rank for r in by_rank] == list(range(1, len(survivors) + 1))
    assert [r.deployment for r in by_rank][: len(result.targets)] == list(result.decision.plan)


# ---------------------------------------------------------------------------------------------------------------
# (e) With objective cost, estimated costs never go down within a spill group.


def _utilisation(t: Target, live: LiveState) -> float:
    cap, flying = t.backend.capacity.max_concurrency, live.in_flight.get(t.backend.name)
    counted = flying / cap if cap and flying is not None else 0.0
    return max(live.utilisation.get(t.backend.name, 0.0), counted)


@SETTINGS
@given(worlds(objective="cost", spillover=False, fallback=False, rule_objectives=False, with_preferences=False))
def test_cost_objective_orders_by_estimated_cost(w: World) -> None:
    result = attempt(w)
    if not isinstance(result, RoutePlan):
        return
    rows = {r.deployment: r for r in result.decision.rows}
    costs = [rows[label].est_cost_usd for label in result.decision.plan]
    assert all(c is not None for c in costs)
    assert costs == sorted(costs)  # type: ignore[type-var]
    # And the cheapest survivor leads.
    survivors = [r.est_cost_usd or 0.0 for r in rows.values() if r.excluded is None]
    assert costs[0] == min(survivors)
    out = w.features.max_tokens or 256
    for t in result.targets:
        price = t.deployment.price
        expected = (w.features.prompt_tokens * price.input_per_mtok + out * price.output_per_mtok) / 1e6
        assert abs((rows[t.label].est_cost_usd or 0.0) - expected) < 1e-7


@SETTINGS
@given(worlds(objective="cost", spillover=True, fallback=False, rule_objectives=False, with_preferences=False))
def test_cost_objective_with_spillover_orders_groups_then_cost(w: World) -> None:
    result = attempt(w)
    if not isinstance(result, RoutePlan):
        return
    spill = result.route.spillover
    assert spill is not None
    rows = {r.deployment: r for r in result.decision.rows}

    def group(t: Target) -> int:
        rank = spill.tiers.index(t.backend.tier) if t.backend.tier in spill.tiers else len(spill.tiers)
        return rank + (len(spill.tiers) + 1 if _utilisation(t, w.live) >= spill.threshold else 0)

    keys = [(group(t), rows[t.label].est_cost_usd or 0.0) for t in result.targets]
    assert keys == sorted(keys), keys


# ---------------------------------------------------------------------------------------------------------------
# (f) `prefer` (hardware, nearness to the ingress region) is soft: it excludes nothing and only orders.


def _preference(t: Target, prefer: Prefer, ingress: str | None) -> tuple[int, int, int]:
    """Restated from the documented order: enough memory per chip, then the chip's place in the list,
    then in the ingress region; undeclared hardware or region never matches."""
    hw = t.backend.hardware
    memory = 0
    if prefer.min_memory_gb is not None:
        memory = 0 if hw is not None and hw.memory_gb is not None and hw.memory_gb >= prefer.min_memory_gb else 1
    chips = [c.lower() for c in prefer.chips or ()]
    chip = (chips.index(hw.chip.lower()) if hw and hw.chip and hw.chip.lower() in chips else len(chips)) if chips else 0
    region = t.backend.hosting.region
    near = 0 if not prefer.ingress_region or (ingress is not None and region == ingress) else 1
    return (memory, chip, near)


@SETTINGS
@given(worlds(spillover=False, fallback=False, with_preferences=False), S_PREFER, S_REGION)
def test_route_preferences_exclude_nothing_and_order_the_plan(w: World, prefer: Prefer, ingress: str | None) -> None:
    routes = tuple(msgspec.structs.replace(r, prefer=prefer, affinity=None) for r in w.policy.routes)
    index = PolicyIndex(msgspec.structs.replace(w.policy, routes=routes))
    features = msgspec.structs.replace(w.features, ingress_region=ingress)
    without = attempt(w, PolicyIndex(w.policy), features)
    preferred = attempt(w, index, features)
    if not isinstance(without, RoutePlan):
        assert snapshot(preferred)[:3] == snapshot(without)[:3]  # the same refusal
        return
    assert isinstance(preferred, RoutePlan)
    assert [(r.deployment, r.excluded) for r in preferred.decision.rows] == [
        (r.deployment, r.excluded) for r in without.decision.rows
    ]
    rank = {r.deployment: r.rank for r in preferred.decision.rows if r.rank is not None}
    cands = candidates(w)
    ranked = sorted(rank, key=lambda label: rank[label])
    keys = [_preference(cands[label], prefer, ingress) for label in ranked]
    assert keys == sorted(keys), list(zip(ranked, keys, strict=True))
